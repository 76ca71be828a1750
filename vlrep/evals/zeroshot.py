"""Zero-shot classification: class names x prompt templates -> a text classifier over images.

Each class's prompts are embedded, averaged and re-normalised (CLIP's prompt ensembling).
Labels may be single class indices [N] or multi-hot [N, C]; with multi-hot labels a
prediction is correct when the image shows that class (as in ImageNet-ReaL), which is what
images holding several objects need. `DEFAULT_TEMPLATES` is this project's prompt ensemble
for photo benchmarks, in the style of CLIP's (short, a few framings of "a photo of a {}").
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

DEFAULT_TEMPLATES = (
    'a photo of a {}.',
    'a photo of the {}.',
    'a close-up photo of a {}.',
    'a cropped photo of a {}.',
    'a low resolution photo of a {}.',
    'a bright photo of a {}.',
    'a dark photo of a {}.',
    'a drawing of a {}.',
)


def read_class_names(path: str) -> list[str]:
  """One class name per non-empty line, in label order."""
  from vlrep.runtime import paths  # pylint: disable=g-import-not-at-top
  names = [line.strip() for line in paths.read_text(path).splitlines() if line.strip()]
  if not names:
    raise ValueError(f'class names file {path!r} is empty')
  return names


def class_embeddings(encode_text: Callable[[list[str]], np.ndarray], class_names: Sequence[str],
                     templates: Sequence[str]) -> np.ndarray:
  """float32 [C, E]: per class, the normalised mean embedding of its filled templates."""
  prompts = [template.format(name) for name in class_names for template in templates]
  emb = np.asarray(encode_text(prompts), np.float32).reshape(len(class_names), len(templates), -1)
  mean = emb.mean(axis=1)
  return mean / np.linalg.norm(mean, axis=-1, keepdims=True)


def topk_accuracy(image_emb: np.ndarray, class_emb: np.ndarray, labels: np.ndarray,
                  k: int = 1) -> float:
  """Fraction of images whose k best-scoring classes include a correct one."""
  return topk_hits(image_emb @ class_emb.T, labels, k)


def topk_hits(scores: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
  """Fraction of rows of `scores` [N, C] whose k best classes include a correct one.

  `labels` are class indices [N] or multi-hot [N, C]; ties keep the class order.
  """
  topk = np.argsort(-np.asarray(scores), axis=1, kind='stable')[:, :k]
  if labels.ndim == 1:
    hits = (topk == labels[:, None]).any(axis=1)
  else:
    hits = np.take_along_axis(labels.astype(bool), topk, axis=1).any(axis=1)
  return float(hits.mean())
