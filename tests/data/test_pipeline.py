"""grain pipeline: batch content independent of process count, exact resume from state."""

import numpy as np
import pytest

from vlrep.data import pipeline


def _batches(config, process_index=0, process_count=1, n=3, state=None):
  iterator = iter(pipeline.train_dataset(config, process_index, process_count))
  if state is not None:
    iterator.set_state(state)
  return [next(iterator) for _ in range(n)], iterator


def test_batches_have_the_model_shapes(config):
  (batch, *_), _ = _batches(config, n=1)
  assert batch['images'].shape == (8, 16, 16, 3) and batch['images'].dtype == np.uint8
  assert batch['tokens'].shape == (8, config.data.max_text_len)
  assert batch['tokens'].dtype == np.int32


def test_global_batch_does_not_depend_on_process_count(config):
  whole, _ = _batches(config)
  halves = [_batches(config, p, 2)[0] for p in range(2)]
  for step in range(3):
    for key in ('images', 'tokens'):
      joined = np.concatenate([halves[0][step][key], halves[1][step][key]])
      np.testing.assert_array_equal(whole[step][key], joined)


def test_seed_changes_the_order(config):
  a, _ = _batches(config, n=1)
  config.seed = 1
  b, _ = _batches(config, n=1)
  assert not np.array_equal(a[0]['tokens'], b[0]['tokens'])


def test_restored_iterator_continues_exactly(config):
  straight, _ = _batches(config, n=5)
  _, iterator = _batches(config, n=2)
  state = iterator.get_state()
  resumed, _ = _batches(config, n=3, state=state)
  for expected, got in zip(straight[2:], resumed):
    np.testing.assert_array_equal(expected['tokens'], got['tokens'])
    np.testing.assert_array_equal(expected['images'], got['images'])


def test_eval_examples_are_the_first_of_the_held_out_split(config):
  examples = pipeline.eval_examples(config)
  assert examples['images'].shape == (12, 16, 16, 3)
  assert len(examples['captions']) == 12
  assert examples['labels/colour'].shape == (12, 6)


def test_unknown_source_is_named(config):
  with pytest.raises(ValueError, match="'imagenet'"):
    pipeline.make_source('imagenet', 32)
