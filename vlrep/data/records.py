"""The image-caption record: the bytes of one ArrayRecord entry written by `vlrep.data.ingest`.

A record is a msgpack map `{'key': str, 'image': bytes, 'captions': [str, ...]}`: the image
as an encoded file (JPEG, PNG, WebP, ...; decoded by the training pipeline) and one or more
captions. A video record has `'frames': [bytes, ...]` (each frame an encoded image, in time
order) in place of `'image'`; readers sample the frames they need (`vlrep.data.video`). msgpack rather than a tf.train.Example because it needs no TensorFlow (flax
already depends on it), is compact for bytes, and is readable from any language.
"""

from __future__ import annotations

from typing import Any, Sequence

import msgpack


def encode(key: str, image: bytes, captions: Sequence[str]) -> bytes:
  """One record's bytes."""
  return msgpack.packb({'key': key, 'image': bytes(image), 'captions': list(captions)},
                       use_bin_type=True)


def encode_video(key: str, frames: Sequence[bytes], captions: Sequence[str]) -> bytes:
  """One video record's bytes: `frames` are encoded images in time order."""
  if not frames:
    raise ValueError(f'video record {key!r} has no frames')
  return msgpack.packb({'key': key, 'frames': [bytes(f) for f in frames],
                        'captions': list(captions)}, use_bin_type=True)


def decode(record: bytes) -> dict[str, Any]:
  """{'key', 'image' or 'frames', 'captions'} of a record; ValueError if it is not valid."""
  try:
    value = msgpack.unpackb(record, raw=False)
  except Exception as error:  # msgpack raises several unrelated types on corrupt input
    raise ValueError(f'corrupt record: {error}') from None
  frames = value.get('frames') if isinstance(value, dict) else None
  video = isinstance(frames, list) and frames and all(isinstance(f, bytes) for f in frames)
  if (not isinstance(value, dict) or not (isinstance(value.get('image'), bytes) or video)
      or not isinstance(value.get('captions'), list) or not value['captions']):
    raise ValueError('corrupt record: expected {key, image: bytes (or frames: [bytes, ...]), '
                     'captions: [str, ...]}')
  return value
