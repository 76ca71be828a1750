"""Image<->text retrieval recall@K.

Texts are matched to images by `text_image_ids` (each caption belongs to one image; an
image may have several captions, as in COCO/Flickr30K). An image->text query is a hit when
any of its K nearest captions is one of its own; a text->image query when any of its K
nearest images is its own. With `identical_text_is_hit`, a caption counts as correct for
every image that has a caption with exactly the same text, which is the fair protocol for
data (like the synthetic set) whose generator repeats captions.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def correct_pairs(text_image_ids: np.ndarray, num_images: int, texts: Sequence[str] | None = None,
                  identical_text_is_hit: bool = False) -> np.ndarray:
  """bool [num_texts, num_images]: which image is a correct answer for which text."""
  num_texts = len(text_image_ids)
  correct = np.zeros((num_texts, num_images), bool)
  correct[np.arange(num_texts), text_image_ids] = True
  if identical_text_is_hit:
    if texts is None:
      raise ValueError('identical_text_is_hit needs the texts')
    _, text_keys = np.unique(np.asarray(texts, dtype=object).astype(str), return_inverse=True)
    image_has_text = np.zeros((num_images, text_keys.max() + 1), bool)
    image_has_text[text_image_ids, text_keys] = True
    correct = image_has_text[:, text_keys].T
  return correct


def rank(query_emb: np.ndarray, candidate_emb: np.ndarray,
         k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(indices int [Q, k], scores float32 [Q, k]): each query's best candidates, best first.

  Scores are dot products (cosine similarity for normalised embeddings); ties keep the
  candidates' order, so the ranking is the same on every machine. k=None ranks them all.
  """
  return rank_scores(np.asarray(query_emb, np.float32) @ np.asarray(candidate_emb, np.float32).T,
                     k)


def rank_scores(scores: np.ndarray, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """`rank` of given scores [Q, C] (e.g. FILIP's token-wise similarities)."""
  scores = np.asarray(scores, np.float32)
  order = np.argsort(-scores, axis=1, kind='stable')[:, :k]
  return order, np.take_along_axis(scores, order, axis=1)


def recall_at_k(image_emb: np.ndarray, text_emb: np.ndarray, correct: np.ndarray,
                ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
  """{'i2t_r@K', 't2i_r@K'} for embeddings [N, E], [M, E] and `correct` [M, N]."""
  image_emb, text_emb = (np.asarray(x, np.float32) for x in (image_emb, text_emb))
  return recall_from_scores(image_emb @ text_emb.T, text_emb @ image_emb.T, correct, ks)


def recall_from_scores(image_to_text: np.ndarray, text_to_image: np.ndarray,
                       correct: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
  """`recall_at_k` of scores: image_to_text [N, M] ranks texts for each image,
  text_to_image [M, N] images for each text (FILIP's two directions differ)."""
  by_text, _ = rank_scores(text_to_image, max(ks))
  by_image, _ = rank_scores(image_to_text, max(ks))
  out = {}
  for k in ks:
    t2i_hits = np.take_along_axis(correct, by_text[:, :k], axis=1).any(axis=1)
    i2t_hits = np.take_along_axis(correct.T, by_image[:, :k], axis=1).any(axis=1)
    out[f'i2t_r@{k}'] = float(i2t_hits.mean())
    out[f't2i_r@{k}'] = float(t2i_hits.mean())
  return out
