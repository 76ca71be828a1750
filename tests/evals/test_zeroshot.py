"""Zero-shot classifier: prompt ensembling and top-k with single and multi-hot labels."""

import numpy as np

from vlrep.evals import zeroshot


def test_class_embeddings_average_templates_and_renormalise():
  table = {'a red': [1.0, 0.0], 'the red': [0.6, 0.8], 'a blue': [0.0, 1.0], 'the blue': [0.0, 1.0]}
  encode = lambda prompts: np.asarray([table[p] for p in prompts])
  emb = zeroshot.class_embeddings(encode, ['red', 'blue'], ['a {}', 'the {}'])
  expected_red = np.array([1.6, 0.8]) / np.linalg.norm([1.6, 0.8])
  np.testing.assert_allclose(emb, [expected_red, [0.0, 1.0]], rtol=1e-6)


def test_topk_with_single_and_multi_hot_labels():
  image_emb = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
  class_emb = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
  # Scores: image0 -> class0, image1 -> class1, image2 ties 0/1 (stable: class0 first).
  assert zeroshot.topk_accuracy(image_emb, class_emb, np.array([0, 1, 1]), k=1) == 2 / 3
  assert zeroshot.topk_accuracy(image_emb, class_emb, np.array([0, 1, 1]), k=2) == 1.0
  multi = np.array([[1, 0, 0], [1, 0, 1], [0, 1, 0]], bool)
  assert zeroshot.topk_accuracy(image_emb, class_emb, multi, k=1) == 1 / 3
