"""grain pipeline: batch content independent of process count, exact resume from state.

Also for ArrayRecord sources with random crops, across epochs, with a corrupt record, with
worker processes, and for TFDS sources through `tfds.testing.mock_data`.
"""

import hashlib
import json
import os

import grain
import numpy as np
import pytest

from vlrep.data import pipeline, sources
from vlrep.data.bench import write_records
from vlrep.data.synthetic import SyntheticShapes


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
    sources.make_source('imagenet', 32)


# ArrayRecord sources: 20 records and batch 8, so that a few batches wrap several epochs.
_RECORDS, _CORRUPT = 20, 5


def _digest(batch):
  return hashlib.sha256(batch['images'].tobytes() + batch['tokens'].tobytes()).hexdigest()


@pytest.fixture
def records_config(config, tmp_path):
  path = os.path.join(tmp_path, 'train.array_record')
  write_records(path, _RECORDS, image_size=24, corrupt=[_CORRUPT])
  config.data.train = f'arrayrecord:{path}'
  config.data.eval = f'arrayrecord:{path}'
  config.data.augment = 'random_resized_crop'
  return config


def test_arrayrecord_resume_across_epochs_is_exact(records_config):
  straight, _ = _batches(records_config, n=8)
  _, iterator = _batches(records_config, n=3)
  resumed, _ = _batches(records_config, n=5, state=iterator.get_state())
  assert [_digest(b) for b in straight[3:]] == [_digest(b) for b in resumed]
  # Later epochs see new crops of the same records, not a replay of the first epoch.
  assert len({_digest(b) for b in straight}) == len(straight)


def test_corrupt_record_is_skipped_the_same_for_any_process_count(records_config):
  before = pipeline.skipped_count()
  whole, _ = _batches(records_config, n=8)
  after_one = pipeline.skipped_count()
  halves = [_batches(records_config, p, 2, n=8)[0] for p in range(2)]
  after_two = pipeline.skipped_count()
  for step in range(8):
    for key in ('images', 'tokens'):
      joined = np.concatenate([halves[0][step][key], halves[1][step][key]])
      np.testing.assert_array_equal(whole[step][key], joined)
  order = grain.MapDataset.range(_RECORDS).seed(records_config.seed).shuffle().repeat(None)
  expected = sum(order[i] == _CORRUPT for i in range(8 * 8))
  assert expected >= 3  # three epochs and a bit
  assert after_one - before == expected and after_two - after_one == expected
  assert not any(b'broken' in bytes(b['tokens'].astype(np.uint8)) for b in whole)


def test_worker_processes_give_the_same_batches_and_resume(records_config):
  straight, _ = _batches(records_config, n=4)
  records_config.data.workers = 2
  _, iterator = _batches(records_config, n=2)
  state = iterator.get_state()
  json.dumps(state)  # the checkpoint stores it as JSON
  iterator.close()
  resumed, iterator = _batches(records_config, n=2, state=state)
  iterator.close()
  assert [_digest(b) for b in straight[2:]] == [_digest(b) for b in resumed]


def test_eval_examples_from_records_are_centered_first_captions(records_config):
  records_config.data.eval_examples = 8
  examples = pipeline.eval_examples(records_config)
  assert examples['images'].shape == (8, 16, 16, 3)
  # Record 5 is corrupt and left out; the first caption of each record is kept.
  assert examples['captions'][:5] == [SyntheticShapes('train', 24)[i]['caption']
                                      for i in range(5)]
  assert examples['zero_shot_tasks'] == {}


def test_tfds_source_trains_and_evaluates(config):
  tfds = pytest.importorskip('tensorflow_datasets')
  config.data.train = config.data.eval = 'tfds:mnist:train'
  config.data.tfds_caption_key = 'label'
  with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
    (batch, *_), _ = _batches(config, n=3)
    examples = pipeline.eval_examples(config)
  assert batch['images'].shape == (8, 16, 16, 3)
  assert examples['images'].shape == (12, 16, 16, 3) and examples['captions'][0].isdigit()


@pytest.mark.parametrize('cores, threads, workers, expected', [
    (2, 0, 0, (1, 0)), (4, 0, 0, (2, 0)), (6, 0, 0, (3, 0)), (8, 0, 0, (2, 2)),
    (96, 0, 0, (2, 24)), (240, 0, 0, (2, 32)), (240, 0, -1, (16, 0)), (2, 3, 4, (3, 4)),
    (64, 1, 0, (1, 16))])
def test_input_workers_follow_the_host_cores_when_zero(config, cores, threads, workers,
                                                       expected):
  config.data.worker_threads, config.data.workers = threads, workers
  assert pipeline.input_workers(config.data, cores) == expected
