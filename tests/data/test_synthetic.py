"""The embedded data set: determinism, captions agree with the drawn groups, disjoint splits."""

import hashlib

import numpy as np
import pytest

from vlrep.data import synthetic
from vlrep.data.synthetic import SyntheticShapes


def test_example_is_a_pure_function_of_split_and_index():
  a, b = SyntheticShapes('train', 32), SyntheticShapes('train', 32)
  for i in (0, 7, 123_456):
    np.testing.assert_array_equal(a[i]['image'], b[i]['image'])
    assert a[i]['caption'] == b[i]['caption']
  assert a[0]['image'].shape == (32, 32, 3) and a[0]['image'].dtype == np.uint8


def test_examples_are_the_same_on_every_machine():
  # Pinned: a change here means every user's data set changed.
  example = SyntheticShapes('test', 64)[0]
  assert example['caption'] == 'three small white crosses'
  digest = hashlib.sha256(example['image'].tobytes()).hexdigest()[:16]
  assert digest == 'e452d3c9f1bef03f'


def test_held_out_split_differs_from_train():
  train, test = SyntheticShapes('train', 32), SyntheticShapes('test', 32)
  train_images = {train[i]['image'].tobytes() for i in range(200)}
  assert not any(test[i]['image'].tobytes() in train_images for i in range(200))


def test_test_labels_agree_with_the_full_caption():
  test = SyntheticShapes('test', 32)
  for i in range(50):
    example = test[i]
    words = example['caption'].split()
    for task, (names, _) in synthetic.ZERO_SHOT_TASKS.items():
      named = [n for n, on in zip(names, example[f'labels/{task}']) if on]
      assert named, (task, example['caption'])
      for name in named:
        assert name.split()[0] in words or name + 'es' in words or name + 's' in words


def test_caption_grammar():
  groups = [dict(shape='circle', colour='red', size='small', count=2),
            dict(shape='cross', colour='blue', size='large', count=1)]
  assert synthetic.caption(groups) == 'two small red circles and one large blue cross'
  assert synthetic.caption(groups, count=False, size=False, shape=False) == (
      'red shapes and a blue shape')
  assert synthetic.caption(groups, count=False, size=False, colour=False) == (
      'circles and a cross')


def test_bad_split_and_index():
  with pytest.raises(ValueError, match='split'):
    SyntheticShapes('validation')
  with pytest.raises(IndexError):
    SyntheticShapes('test')[10_000]

