"""Retrieval recall@K, including several captions per image and identical-text hits."""

import numpy as np

from vlrep.evals import retrieval


def test_recall_by_hand():
  image_emb = np.eye(3)
  # text 0 -> image 0 (correct), text 1 -> nearest image 2 (wrong), text 2 -> image 2.
  text_emb = np.array([[1.0, 0.0, 0.0], [0.0, 0.6, 0.8], [0.0, 0.0, 1.0]])
  correct = retrieval.correct_pairs(np.array([0, 1, 2]), 3)
  out = retrieval.recall_at_k(image_emb, text_emb, correct, ks=(1, 2))
  assert out['t2i_r@1'] == 2 / 3 and out['t2i_r@2'] == 1.0
  # Image side: image 1 -> text 1 (0.6 beats 0), image 2 -> text 2 (1.0 beats 0.8): all right.
  assert out['i2t_r@1'] == 1.0


def test_several_captions_per_image():
  correct = retrieval.correct_pairs(np.array([0, 0, 1]), 2)
  np.testing.assert_array_equal(correct, [[1, 0], [1, 0], [0, 1]])


def test_identical_text_counts_as_hit():
  texts = ['red circle', 'blue square', 'red circle']
  correct = retrieval.correct_pairs(np.arange(3), 3, texts, identical_text_is_hit=True)
  np.testing.assert_array_equal(correct, [[1, 0, 1], [0, 1, 0], [1, 0, 1]])
