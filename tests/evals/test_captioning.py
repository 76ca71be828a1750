"""Numeric tests for vlrep.evals.captioning (CIDEr-D, BLEU-4, caption normalisation)."""

import math
import random

import pytest

from vlrep.evals.captioning import bleu4, cider_d, normalize_caption

# ---------------------------------------------------------------------------
# Hand-derived values. Notation: N = number of images, so every n-gram that
# occurs in the references of exactly one image has idf weight w = log(N) - log(1).
# Per image, CIDEr-D = 10 * mean over n=1..4 of (cosine_n * length penalty),
# averaged over that image's references; an order with no n-grams contributes 0.
# ---------------------------------------------------------------------------


def test_cider_identical_long_captions_score_ten():
  # N=2, disjoint vocabularies: all weights are w, every order 1..4 has cosine 1,
  # penalty exp(0)=1 -> 10 * (1+1+1+1)/4 = 10 for each image.
  refs = {1: ["red car parked outside"], 2: ["small dog sleeps indoors"]}
  preds = {1: "red car parked outside", 2: "small dog sleeps indoors"}
  assert cider_d(preds, refs) == pytest.approx(10.0, abs=1e-9)


def test_cider_identical_two_word_captions_score_five():
  # N=2: "a" is in both images' references, so its idf is log2 - log2 = 0; "cat",
  # "dog", "a cat", "a dog" have weight w. Orders 1 and 2 have cosine 1, orders
  # 3 and 4 have no n-grams -> 10 * (1+1+0+0)/4 = 5 per image.
  refs = {"x": ["a cat"], "y": ["a dog"]}
  preds = {"x": "a cat", "y": "a dog"}
  assert cider_d(preds, refs) == pytest.approx(5.0, abs=1e-9)


def test_cider_single_image_corpus_is_zero():
  # idf = log(1) - log(df) = 0 for every n-gram, so all vectors vanish.
  assert cider_d({0: "a cat on a mat"}, {0: ["a cat on a mat"]}) == 0.0


def test_cider_partial_overlap_with_length_penalty():
  # Image A: the 4-word prediction is a prefix of the 5-word reference. All
  # n-grams have weight w, so cosine_n = matches / sqrt(|hyp_n| * |ref_n|):
  #   n=1: 4/sqrt(4*5), n=2: 3/sqrt(3*4), n=3: 2/sqrt(2*3), n=4: 1/sqrt(1*2).
  # Length difference 1 -> penalty exp(-1 / (2 * 6^2)). Image B is identical -> 10.
  refs = {"A": ["man rides brown horse today"], "B": ["dog eats dry food"]}
  preds = {"A": "man rides brown horse", "B": "dog eats dry food"}
  cos = [4 / math.sqrt(20), 3 / math.sqrt(12), 2 / math.sqrt(6), 1 / math.sqrt(2)]
  score_a = 10 * math.exp(-1 / 72) * sum(cos) / 4
  assert cider_d(preds, refs) == pytest.approx((score_a + 10.0) / 2, abs=1e-9)


def test_cider_clips_repeated_ngrams():
  # Image A: hyp "cat cat" has tf-idf cat=2w, "cat cat"=w (df 0 -> max idf w);
  # ref "cat sat" has cat=w, sat=w, "cat sat"=w. Unigram numerator is
  # min(2w, w)*w = w^2 (clipped), norms 2w and sqrt(2)w -> 1/(2*sqrt 2);
  # bigram overlap 0 -> A = 10 * (1/(2*sqrt 2)) / 4. Image B identical, 2 words -> 5.
  refs = {"A": ["cat sat"], "B": ["dog runs"]}
  preds = {"A": "cat cat", "B": "dog runs"}
  score_a = 10 / (8 * math.sqrt(2))
  assert cider_d(preds, refs) == pytest.approx((score_a + 5.0) / 2, abs=1e-9)


def test_cider_averages_over_references():
  # Image A matches its first reference exactly (orders 1,2 cosine 1) and shares
  # nothing with its second: (10 * 2/4 + 0) / 2 refs = 2.5. Image B -> 5.
  refs = {"A": ["cat sat", "bird flew"], "B": ["dog runs"]}
  preds = {"A": "cat sat", "B": "dog runs"}
  assert cider_d(preds, refs) == pytest.approx((2.5 + 5.0) / 2, abs=1e-9)


def test_bleu_identical_caption_is_one():
  assert bleu4({0: "a cat on a mat"}, {0: ["a cat on a mat"]}) == pytest.approx(1.0, abs=1e-8)


def test_bleu_brevity_penalty():
  # All precisions are 1; candidate length 4 vs reference length 6 -> exp(1 - 6/4).
  score = bleu4({0: "a b c d"}, {0: ["a b c d e f"]})
  assert score == pytest.approx(math.exp(-0.5), abs=1e-8)


def test_bleu_closest_reference_length_ties_go_to_shorter():
  # Lengths 3 and 5 are both 1 away from 4; pycocoevalcap picks 3, so there is
  # no brevity penalty (picking 5 would give exp(1 - 5/4) ~ 0.78). Every
  # candidate n-gram occurs in the second reference, so all precisions are 1.
  score = bleu4({0: "a b c d"}, {0: ["a b c", "a b c d e"]})
  assert score == pytest.approx(1.0, abs=1e-8)


def test_bleu_smoothing_quirk_without_four_grams():
  # No 3- or 4-gram candidates: those precisions become (0 + 1e-15) / (0 + 1e-9)
  # = 1e-6 each, so BLEU-4 = (1 * 1 * 1e-6 * 1e-6) ** 0.25 = 1e-3, not 0.
  assert bleu4({0: "a cat"}, {0: ["a cat"]}) == pytest.approx(1e-3, rel=1e-6)


# ---------------------------------------------------------------------------
# Normalisation and input validation.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
  "raw, expected",
  [
    # Expected strings are what COCO's Java PTB tokenizer plus its punctuation
    # filter produced for these inputs (checked once by hand against it).
    ("A man's dog, running!", "a man 's dog running"),
    ("Don't stop -- the t-shirt costs 3.5 dollars.", "do n't stop the t-shirt costs 3.5 dollars"),
    ("it's a dog's life, isn't it?", "it 's a dog 's life is n't it"),
    ("Two people; one is eating a hot-dog?", "two people one is eating a hot-dog"),
    ('"double quotes"  here\n', "double quotes here"),
    ("$5 pizza 50% off #1", "$ 5 pizza 50 % off # 1"),
    ("", ""),
  ],
)
def test_normalize_caption(raw, expected):
  assert normalize_caption(raw) == expected


def test_metrics_normalize_raw_strings():
  refs_raw = {1: ["A red car, parked outside."], 2: ["Small DOG sleeps indoors!"]}
  preds_raw = {1: "a red car parked outside", 2: "small dog... sleeps indoors"}
  refs = {k: [normalize_caption(r) for r in v] for k, v in refs_raw.items()}
  preds = {k: normalize_caption(v) for k, v in preds_raw.items()}
  assert cider_d(preds_raw, refs_raw) == cider_d(preds, refs)
  assert bleu4(preds_raw, refs_raw) == bleu4(preds, refs)


@pytest.mark.parametrize("metric", [cider_d, bleu4])
def test_mismatched_ids_raise(metric):
  with pytest.raises(ValueError, match=r"missing predictions .*'b'.*no references .*'c'"):
    metric({"a": "x y", "c": "x y"}, {"a": ["x y"], "b": ["x y"]})


@pytest.mark.parametrize("metric", [cider_d, bleu4])
def test_bad_inputs_raise(metric):
  with pytest.raises(ValueError, match="empty"):
    metric({}, {})
  with pytest.raises(ValueError, match="no reference"):
    metric({0: "a cat", 1: "a dog"}, {0: ["a cat"], 1: []})
  with pytest.raises(TypeError):  # a bare string instead of a list of references
    metric({0: "a cat", 1: "a dog"}, {0: ["a cat"], 1: "a dog"})


# ---------------------------------------------------------------------------
# Parity with pycocoevalcap. Reference values were produced with pycocoevalcap
# 1.2 (PyPI): Cider().compute_score(gts, res)[0] and
# Bleu(4).compute_score(gts, res)[0][3], with gts = the reference lists below and
# res = {id: [prediction]}, all strings already tokenised (so no PTB/Java step).
# ---------------------------------------------------------------------------

PARITY_CASES = {
  "multi_reference": (
    {
      "img1": "a man riding a wave on top of a surfboard",
      "img2": "a plate of food with broccoli and rice",
      "img3": "two giraffes standing next to a tree",
      "img4": "a red bus driving down a city street",
    },
    {
      "img1": [
        "a surfer riding a large wave in the ocean",
        "a man on a surfboard riding a wave",
        "a person surfing on top of a wave",
        "surfer in a wetsuit catching a wave",
        "a man riding a wave on a surfboard",
      ],
      "img2": [
        "a plate with rice broccoli and chicken",
        "a white plate topped with food and vegetables",
        "broccoli and rice on a dinner plate",
      ],
      "img3": [
        "two giraffes standing near a tall tree",
        "a pair of giraffes eating leaves from a tree",
        "giraffes in a field next to trees",
        "two giraffes next to a tree in a zoo",
      ],
      "img4": [
        "a double decker bus on a city street",
        "a red bus is driving down the street",
        "a bus traveling down a busy road",
      ],
    },
    2.664826115823548,
    0.5444894331530885,
  ),
  "repeated_captions": (
    {
      0: "a man riding a wave on a surfboard",
      1: "a man riding a wave on a surfboard",
      2: "a man riding a wave on a surfboard",
      3: "a a a a man man",
    },
    {
      0: ["a man riding a wave on a surfboard", "a man riding a wave on a surfboard"],
      1: ["a dog sitting on a couch", "a dog sitting on a couch", "a brown dog on a sofa"],
      2: ["a man riding a wave on a surfboard", "a woman riding a wave"],
      3: ["a man and a woman", "a man with a man"],
    },
    4.23345687202451,
    0.6149075408617671,
  ),
  "no_overlap": (
    {
      10: "purple elephants juggle quietly",
      20: "",
      30: "a cat sleeping on a bed",
    },
    {
      10: ["a train pulling into a station", "a train at the station"],
      20: ["a kitchen with a stove and an oven"],
      30: ["a cat laying on a bed", "a black cat sleeping on a white bed", "cat on the bed"],
    },
    1.18992520675401,
    0.18917785040977947,
  ),
  "length_extremes": (
    {
      "a": "dog",
      "b": "a very long caption that keeps going on and on with many words "
      "about a small brown dog in a park",
      "c": "a small dog runs",
      "d": "a dog in the park",
      "e": "park",
    },
    {
      "a": ["a dog", "a small brown dog playing in the grass"],
      "b": ["a small brown dog in a park", "dog"],
      "c": ["a small dog", "a small dog runs fast"],
      "d": ["a dog in the park"],
      "e": ["park", "a park", "the park"],
    },
    3.9202129214135213,
    0.4403950253697234,
  ),
}


@pytest.mark.parametrize("name", sorted(PARITY_CASES))
def test_parity_with_pycocoevalcap_fixed_corpora(name):
  preds, refs, expected_cider, expected_bleu = PARITY_CASES[name]
  # The stored values were computed on these exact strings, so normalisation
  # must leave them untouched for the comparison to be meaningful.
  for text in [*preds.values(), *(r for rs in refs.values() for r in rs)]:
    assert normalize_caption(text) == text
  assert cider_d(preds, refs) == pytest.approx(expected_cider, abs=1e-6)
  assert bleu4(preds, refs) == pytest.approx(expected_bleu, abs=1e-6)
  # Corpus scores must not depend on id order.
  reversed_refs = dict(reversed(list(refs.items())))
  assert cider_d(preds, reversed_refs) == pytest.approx(expected_cider, abs=1e-6)
  assert bleu4(preds, reversed_refs) == pytest.approx(expected_bleu, abs=1e-6)


def test_parity_with_live_pycocoevalcap_random_corpus():
  pytest.importorskip("pycocoevalcap")
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider

  rng = random.Random(1234)
  vocab = ["a", "the", "man", "woman", "dog", "cat", "on", "in", "with", "red",
             "riding", "sitting", "table", "street", "bus", "of", "and", "near"]

  def caption() -> str:
    return " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 14)))

  refs = {i: [caption() for _ in range(rng.randint(1, 5))] for i in range(50)}
  # Some predictions copy a reference so that higher-order n-grams match too.
  preds = {i: rng.choice(rs) if rng.random() < 0.3 else caption() for i, rs in refs.items()}
  res = {i: [p] for i, p in preds.items()}

  expected_cider, _ = Cider().compute_score(refs, res)
  expected_bleu = Bleu(4).compute_score(refs, res, verbose=0)[0][3]
  assert cider_d(preds, refs) == pytest.approx(float(expected_cider), abs=1e-9)
  assert bleu4(preds, refs) == pytest.approx(expected_bleu, abs=1e-9)
