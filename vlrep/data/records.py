"""The image-caption record: the bytes of one ArrayRecord entry written by `vlrep.data.ingest`.

A record is a msgpack map `{'key': str, 'image': bytes, 'captions': [str, ...]}`: the image
as an encoded file (JPEG, PNG, WebP, ...; decoded by the training pipeline) and one or more
captions. msgpack rather than a tf.train.Example because it needs no TensorFlow (flax
already depends on it), is compact for bytes, and is readable from any language.
"""

from __future__ import annotations

from typing import Any, Sequence

import msgpack


def encode(key: str, image: bytes, captions: Sequence[str]) -> bytes:
  """One record's bytes."""
  return msgpack.packb({'key': key, 'image': bytes(image), 'captions': list(captions)},
                       use_bin_type=True)


def decode(record: bytes) -> dict[str, Any]:
  """{'key', 'image', 'captions'} of a record; ValueError if it is not a valid record."""
  try:
    value = msgpack.unpackb(record, raw=False)
  except Exception as error:  # msgpack raises several unrelated types on corrupt input
    raise ValueError(f'corrupt record: {error}') from None
  if (not isinstance(value, dict) or not isinstance(value.get('image'), bytes)
      or not isinstance(value.get('captions'), list) or not value['captions']):
    raise ValueError('corrupt record: expected {key, image: bytes, captions: [str, ...]}')
  return value
