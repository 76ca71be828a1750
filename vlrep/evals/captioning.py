"""Captioning metrics (CIDEr-D and BLEU-4) for evaluating generated image captions.

These are written by hand instead of depending on ``pycocoevalcap``, which is
~100 MB (it bundles Java jars) and whose PTB tokenizer needs a Java runtime.
``normalize_caption`` is only a regex approximation of that tokenizer; given
the same tokenised strings, ``cider_d`` and ``bleu4`` reproduce
``pycocoevalcap`` exactly: ``tests/evals/test_captioning.py`` checks them to
1e-6 against values hard-coded from pycocoevalcap 1.2's ``Cider`` / ``Bleu(4)``
on fixed corpora, and (when pycocoevalcap is installed) against the live
library on a seeded random corpus.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

# PTB splits English clitics off their word ("dog's" -> "dog 's",
# "don't" -> "do n't"); doing the same keeps n-grams closer to COCO's.
_CLITIC = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
# As in PTB, inner "-", "." and "/" stay in the token ("t-shirt", "3.5") and
# $ % & # are tokens of their own; every other non-word character is dropped,
# which covers COCO's punctuation list (quotes, brackets, . , ? ! : ; -).
_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|\w+(?:[-./]\w+)*|[$%&#]")

_MAX_N = 4  # both metrics use 1..4-grams


def normalize_caption(text: str) -> str:
  """Lower-case, tokenise and strip punctuation, roughly like COCO's pipeline.

  COCO runs the Stanford PTB tokenizer (Java) with ``-lowerCase`` and then drops
  punctuation tokens. That tokenizer is deliberately not used here; this regex
  version agrees on ordinary captions but differs on rarer input, e.g. COCO
  keeps brackets as ``-lrb-``/``-rrb-`` (its filter list is upper-case), keeps
  the final period of ``u.s.`` and splits ``5:30pm`` into ``5:30 pm``.
  Returns space-separated tokens.
  """
  text = _CLITIC.sub(r" \1", text.lower())
  return " ".join(_TOKEN.findall(text))


def _ngram_counts(tokens: Sequence[str], max_n: int = _MAX_N) -> Counter:
  return Counter(
    tuple(tokens[i : i + k])
    for k in range(1, max_n + 1)
    for i in range(len(tokens) - k + 1)
  )


def _tokenised_pairs(
  predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]
) -> list[tuple[list[str], list[list[str]]]]:
  """Validates inputs and returns (prediction tokens, reference tokens) per image."""
  if not predictions and not references:
    raise ValueError("cannot score an empty corpus")
  missing = [k for k in references if k not in predictions]
  extra = [k for k in predictions if k not in references]
  if missing or extra:
    # Ids are arbitrary hashables (possibly mixed types), so list in input order.
    raise ValueError(
      "predictions and references must have the same ids; "
      f"missing predictions for {len(missing)} id(s) {missing[:10]}, "
      f"no references for {len(extra)} id(s) {extra[:10]}"
    )
  pairs = []
  for key, refs in references.items():
    pred = predictions[key]
    # A bare string would silently be scored as a list of 1-character refs.
    if not isinstance(pred, str) or isinstance(refs, str):
      raise TypeError(
        f"id {key!r}: expected a str prediction and a list of str references"
      )
    if len(refs) == 0:
      raise ValueError(f"id {key!r} has no reference captions")
    pairs.append(
      (
        normalize_caption(pred).split(),
        [normalize_caption(r).split() for r in refs],
      )
    )
  return pairs


def cider_d(
  predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]
) -> float:
  """Corpus CIDEr-D, equal to ``pycocoevalcap.cider.Cider().compute_score``.

  The result depends on the whole corpus: document frequencies come from the
  references of exactly these images, so scores from different subsets are not
  comparable and a single-image corpus always scores 0 (idf is log(1) = 0).
  """
  pairs = _tokenised_pairs(predictions, references)
  sigma = 6.0

  # An n-gram counts once per image, however many of its references contain it.
  doc_freq: Counter = Counter()
  for _, refs in pairs:
    doc_freq.update(set().union(*(_ngram_counts(r) for r in refs)))
  log_num_images = math.log(len(pairs))

  def tfidf(tokens: list[str]) -> tuple[dict, list[float], int]:
    counts = _ngram_counts(tokens)
    # n-grams absent from all references get df=1, i.e. the maximal idf.
    vec = {
      g: tf * (log_num_images - math.log(max(1.0, doc_freq[g])))
      for g, tf in counts.items()
    }
    norms = [0.0] * _MAX_N
    for g, w in vec.items():
      norms[len(g) - 1] += w * w
    # pycocoevalcap's "length" for the penalty is the bigram count, i.e.
    # len-1 (0 for empty or 1-word). Only differs from len when a side is
    # empty, where the similarity is 0 anyway; kept for fidelity.
    bigrams = sum(tf for g, tf in counts.items() if len(g) == 2)
    return vec, [math.sqrt(x) for x in norms], bigrams

  image_scores = []
  for pred, refs in pairs:
    vec_h, norm_h, len_h = tfidf(pred)
    per_order = [0.0] * _MAX_N
    for ref in refs:
      vec_r, norm_r, len_r = tfidf(ref)
      penalty = math.exp(-((len_h - len_r) ** 2) / (2 * sigma**2))
      sims = [0.0] * _MAX_N
      for g, w_h in vec_h.items():
        w_r = vec_r.get(g, 0.0)
        # The "-D" clipping: the candidate's weight is capped at the
        # reference's, so repeating an n-gram cannot inflate the score.
        sims[len(g) - 1] += min(w_h, w_r) * w_r
      for n in range(_MAX_N):
        # A zero norm means an all-zero vector, whose dot product is 0.
        if norm_h[n] != 0 and norm_r[n] != 0:
          sims[n] /= norm_h[n] * norm_r[n]
        per_order[n] += sims[n] * penalty
    # Mean over n-gram orders, mean over references, then CIDEr-D's x10.
    image_scores.append(sum(per_order) / _MAX_N / len(refs) * 10.0)
  return math.fsum(image_scores) / len(image_scores)


def bleu4(
  predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]
) -> float:
  """Corpus BLEU-4, equal to ``pycocoevalcap.bleu.Bleu(4).compute_score(...)[0][3]``.

  Counts are pooled over the corpus before taking precisions (not an average
  of per-image BLEU). Like pycocoevalcap, the smoothing constants make a corpus
  with no 4-gram candidates at all score about 1e-3 rather than 0.
  """
  pairs = _tokenised_pairs(predictions, references)
  correct = [0] * _MAX_N
  guess = [0] * _MAX_N
  pred_len = ref_len = 0
  for pred, refs in pairs:
    # Clip each candidate n-gram by its largest count in any single reference.
    max_ref_counts: Counter = Counter()
    for ref in refs:
      max_ref_counts |= _ngram_counts(ref)
    for g, count in _ngram_counts(pred).items():
      correct[len(g) - 1] += min(count, max_ref_counts[g])
    for k in range(_MAX_N):
      guess[k] += max(0, len(pred) - k)
    pred_len += len(pred)
    # 'closest' reference length; ties go to the shorter reference.
    ref_len += min((abs(len(r) - len(pred)), len(r)) for r in refs)[1]

  # Same smoothing constants and evaluation order as pycocoevalcap's scorer.
  tiny, small = 1e-15, 1e-9
  product = 1.0
  for k in range(_MAX_N):
    product *= (correct[k] + tiny) / (guess[k] + small)
  score = product ** (1.0 / _MAX_N)
  ratio = (pred_len + tiny) / (ref_len + small)
  if ratio < 1:
    score *= math.exp(1 - 1 / ratio)  # brevity penalty
  return float(score)


def distinct_fraction(predictions: Mapping[Hashable, str]) -> float:
  """Distinct captions (after `normalize_caption`) per image, in (0, 1]: 1 when every image
  has its own caption, 1/N when a captioner gives one caption for all N images (the collapse
  open_clip users report of CoCa captioning fine-tunes)."""
  if not predictions:
    raise ValueError("cannot count the distinct captions of no predictions")
  return len({normalize_caption(p) for p in predictions.values()}) / len(predictions)
