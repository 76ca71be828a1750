"""Source strings: synthetic, ArrayRecord (dir, file, glob), TFDS via mock_data, bad specs."""

import os

import numpy as np
import pytest

from vlrep.data import sources
from vlrep.data.bench import write_records


@pytest.fixture
def record_dir(tmp_path):
  write_records(os.path.join(tmp_path, 'a-00000.array_record'), 3, image_size=24)
  write_records(os.path.join(tmp_path, 'a-00001.array_record'), 2, image_size=24)
  return str(tmp_path)


@pytest.mark.parametrize('form', ['dir', 'file', 'glob'])
def test_arrayrecord_forms(record_dir, form):
  pattern = {'dir': record_dir, 'file': os.path.join(record_dir, 'a-00000.array_record'),
             'glob': os.path.join(record_dir, 'a-*.array_record')}[form]
  source = sources.make_source(f'arrayrecord:{pattern}', 16)
  assert len(source) == (3 if form == 'file' else 5)
  item = source[1]
  assert item['image'][:2] == b'\xff\xd8'  # encoded JPEG: decoded by the transform stage
  assert item['captions'][0] and item['key'] == '1'


def test_tokenizer_trainer_reads_captions(record_dir):
  # The SentencePiece trainer reads `item.get('captions') or [item['caption']]`.
  for spec in (f'arrayrecord:{record_dir}', 'synthetic'):
    item = sources.make_source(spec, 16)[0]
    captions = item.get('captions') or [item['caption']]
    assert captions and all(isinstance(c, str) for c in captions)


def test_missing_path_is_named(tmp_path):
  missing = os.path.join(tmp_path, 'nothing')
  with pytest.raises(FileNotFoundError, match='nothing'):
    sources.make_source(f'arrayrecord:{missing}', 16)


@pytest.mark.parametrize('spec', ['imagenet', 'arrayrecord', 'tfds'])
def test_unknown_source_lists_the_known_forms(spec):
  with pytest.raises(ValueError, match=f"'{spec}'.*data.train.*arrayrecord:PATH"):
    sources.make_source(spec, 16)


def test_tfds_mock_data_maps_the_configured_keys():
  # coco_captions' mock needs TensorFlow; mnist's does not. Its label names stand in for
  # captions through data.tfds_caption_key, as any ClassLabel feature would.
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    source = sources.make_source('tfds:mnist:train', 16, tfds_caption_key='label')
    assert len(source) == 6
    item = source[0]
  assert item['image'].shape == (28, 28, 1)
  assert item['captions'][0] in [str(d) for d in range(10)]


def test_nested_keys_and_text_values():
  example = {'image': np.zeros((2, 2, 3), np.uint8),
             'captions': {'text': np.array([b'a cat', 'a dog'], object)}}
  assert sources._nested(example, 'captions/text') is example['captions']['text']
  assert sources._as_texts(example['captions']['text'], None) == ['a cat', 'a dog']
  assert sources._as_texts(np.int64(2), ['zero', 'one', 'two']) == ['two']


def test_train_validate_names_a_missing_path(config, tmp_path):
  from vlrep import train  # heavy import: only this test needs it
  config.data.train = f'arrayrecord:{tmp_path}/missing-*.array_record'
  with pytest.raises(FileNotFoundError, match='missing-'):
    train.validate(config)
