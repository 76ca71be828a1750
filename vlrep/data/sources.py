"""Data sources: from a source string (`data.train`, `data.eval`) to a random-access source.

A source has `len` and `getitem` returning a dict with `image` (a video source: `frames`, see
`vlrep.data.video`) and either `caption` (str) or `captions` (list of str). Images are
whatever is cheapest to hand over: the synthetic set draws uint8 [S, S, 3] arrays at the
requested size, ArrayRecord records carry the encoded file's bytes and TFDS sets return their
decoded arrays (any size, grey or RGB); the transform stage (`vlrep/data/transforms.py`)
decodes and resizes all of them alike. Reading a record does no image work, so a corrupt
record fails in the transform stage, where training skips it. Sources are picklable, so
grain worker processes can read them.
"""

from __future__ import annotations

from typing import Any, Sequence

import grain
import numpy as np

from vlrep.data import records
from vlrep.data.synthetic import SyntheticShapes
from vlrep.data.synthetic_video import SyntheticMotion
from vlrep.runtime import paths as paths_lib

SOURCES = ('synthetic[:train|test]', 'synthetic_video[:train|test]',
           'arrayrecord:PATH (directory, file or glob)', 'tfds:NAME[/CONFIG][:SPLIT]')


def array_record_paths(pattern: str) -> list[str]:
  """The `.array_record` files named by a directory, a file or a glob, sorted."""
  pattern = paths_lib.check(pattern)
  if paths_lib.isdir(pattern):
    paths = paths_lib.glob(paths_lib.join(pattern, '*.array_record*'))
  elif paths_lib.isfile(pattern):
    paths = [paths_lib.local(pattern)]
  else:
    paths = paths_lib.glob(pattern)
  if not paths:
    raise FileNotFoundError(f'No ArrayRecord files at {pattern!r} (a directory of '
                            '.array_record files, one file or a glob)')
  # Sorted so that the record order, and with it every batch, is the same on every host.
  return sorted(paths)


class ArrayRecordSource:
  """Records written by `vlrep.data.ingest`: {'key', 'image': encoded bytes, 'captions'}."""

  def __init__(self, pattern: str):
    self.paths = array_record_paths(pattern)
    self._records = grain.sources.ArrayRecordDataSource(self.paths)

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return records.decode(self._records[index])

  def __repr__(self) -> str:
    return f'ArrayRecordSource({len(self.paths)} files, {len(self)} records)'


def _nested(example: dict[str, Any], key: str) -> Any:
  for part in key.split('/'):
    example = example[part]
  return example


def _as_texts(value: Any, names: Sequence[str] | None) -> list[str]:
  """Captions of one example as str, whatever TFDS returned (bytes, arrays, class ids)."""
  values = np.asarray(value).reshape(-1).tolist()
  texts = []
  for v in values:
    if isinstance(v, bytes):
      v = v.decode('utf-8')
    elif names is not None and isinstance(v, int):
      v = names[v]  # a ClassLabel: its name is the caption (e.g. mnist in tests)
    texts.append(str(v))
  return texts


class TfdsSource:
  """A TFDS split read with `tfds.data_source` (ArrayRecord files; no TensorFlow needed)."""

  def __init__(self, name: str, split: str, image_key: str, caption_key: str,
               data_dir: str | None, label_key: str = ''):
    import tensorflow_datasets as tfds  # optional dependency: only tfds: sources need it
    self.name, self.split = name, split
    self.image_key, self.caption_key, self.label_key = image_key, caption_key, label_key
    self._data = tfds.data_source(name, split=split,
                                  data_dir=paths_lib.local(paths_lib.check(data_dir)) or None)
    feature = self._data.dataset_info.features
    for part in caption_key.split('/'):
      feature = feature[part]
      if hasattr(feature, 'feature'):  # Sequence(...) of text: look inside
        feature = feature.feature
    self._names = list(feature.names) if hasattr(feature, 'names') else None

  def __len__(self) -> int:
    return len(self._data)

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = self._data[index]
    try:
      image, captions = _nested(example, self.image_key), _nested(example, self.caption_key)
    except (KeyError, TypeError) as error:
      raise ValueError(f'{self.name}: no feature {error} (data.tfds_image_key='
                       f'{self.image_key!r}, data.tfds_caption_key={self.caption_key!r})'
                       ) from None
    out = {'image': image, 'captions': _as_texts(captions, self._names)}
    if self.label_key:  # `data.label_key`: a ClassLabel feature's index (classification)
      try:
        out[self.label_key] = np.asarray(_nested(example, self.label_key))
      except (KeyError, TypeError):
        raise KeyError(f'{self.name}: no feature {self.label_key!r} (data.label_key)') from None
    return out

  def __repr__(self) -> str:
    return f'TfdsSource({self.name!r}, split={self.split!r}, {len(self)} examples)'


def make_source(spec: str, image_size: int, *, tfds_image_key: str = 'image',
                tfds_caption_key: str = 'captions/text', tfds_data_dir: str = '',
                tfds_label_key: str = '') -> Any:
  """The random-access source named by `spec` (see `SOURCES`).

  Raises ValueError for an unknown form and FileNotFoundError for missing ArrayRecord files.
  """
  name, _, arg = spec.partition(':')
  if name == 'synthetic':
    return SyntheticShapes(arg or 'train', image_size)
  if name == 'synthetic_video':
    return SyntheticMotion(arg or 'train', image_size)
  if name == 'arrayrecord' and arg:
    return ArrayRecordSource(arg)
  if name == 'tfds' and arg:
    dataset, _, split = arg.partition(':')
    return TfdsSource(dataset, split or 'train', tfds_image_key, tfds_caption_key,
                      tfds_data_dir, tfds_label_key)
  raise ValueError(f'Unknown data source {spec!r} (data.train / data.eval); known: '
                   f'{", ".join(SOURCES)}')


def source_from_config(config: Any, spec: str) -> Any:
  """`make_source` with the TFDS options of `config.data`."""
  data = config.data
  return make_source(spec, data.image_size, tfds_image_key=data.tfds_image_key,
                     tfds_caption_key=data.tfds_caption_key, tfds_data_dir=data.tfds_data_dir,
                     tfds_label_key=data.label_key)
