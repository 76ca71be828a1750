"""Video examples: T frames sampled uniformly from a clip, decoded, and video files read.

A video example's `frames` are what its source holds: the synthetic set's uint8
[F, S, S, 3] array, or an ArrayRecord video record's list of encoded frame images
(`vlrep.data.records`). T frames are chosen at read time (`sample_indices`: the middle frame
of each of T equal segments, so the choice covers the whole clip and is the same every
read), so one ingested set serves any T. Video files are decoded with PyAV (`av`, the
maintained Python bindings of FFmpeg, whose wheels bundle FFmpeg, so no system FFmpeg is
needed: the `video` extra) only at ingest time (`read_video_file`); training and
evaluation read the stored frames.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import ml_collections
import numpy as np

from vlrep.data import sources, transforms


def sample_indices(num_frames: int, count: int) -> np.ndarray:
  """int [count]: `count` frame indices spread uniformly over a clip of `num_frames` (the
  middle of each of `count` equal segments); a clip shorter than `count` repeats frames."""
  if num_frames < 1 or count < 1:
    raise ValueError(f'cannot sample {count} frames from a clip of {num_frames}')
  return ((np.arange(count) + 0.5) * num_frames / count).astype(np.int64)


def decode_frames(frames: Any, count: int, size: int) -> np.ndarray:
  """uint8 [count, size, size, 3]: `count` uniformly sampled frames of a video example's
  `frames` (an array [F, H, W, 3] or a list of encoded images), each center-resized."""
  if frames is None or not len(frames):
    raise ValueError('a video example needs frames (an array or a list of encoded images)')
  return np.stack([transforms.decode_image(frames[i], size)
                   for i in sample_indices(len(frames), count)])


def read_video_file(path: str, max_frames: int, max_side: int = 0) -> list[bytes]:
  """Up to `max_frames` frames of a video file, uniformly sampled, as JPEG bytes (quality
  95), downscaled to fit `max_side` if it is > 0. Raises `av.error.FFmpegError` (or
  ValueError for a file with no video frame) on what FFmpeg cannot decode."""
  import av  # optional dependency: only ingesting video files needs it
  from PIL import Image  # pylint: disable=g-import-not-at-top
  # Two passes: a container's frame count is often missing or wrong, so count by decoding.
  with av.open(path) as container:
    if not container.streams.video:
      raise ValueError(f'{path}: no video stream')
    total = sum(1 for _ in container.decode(video=0))
  if not total:
    raise ValueError(f'{path}: no video frames')
  keep = set(sample_indices(total, min(total, max_frames)).tolist())
  frames = []
  with av.open(path) as container:
    for index, frame in enumerate(container.decode(video=0)):
      if index in keep:
        image = frame.to_image()
        if max_side:
          image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.convert('RGB').save(buffer, 'JPEG', quality=95)
        frames.append(buffer.getvalue())
  return frames


def video_examples(config: ml_collections.ConfigDict, spec: str, num_examples: int,
                   start: int, frames: int) -> dict[str, Any]:
  """Examples `start .. start+num_examples` of a video source, in order: `videos` uint8
  [N, frames, S, S, 3] (S = `data.image_size`), `references` (all captions of each),
  `captions` (the first), the source's `labels/*` arrays and `zero_shot_tasks`.

  Undecodable records are left out with a warning, as `pipeline.eval_examples` does. All N
  clips are held decoded: meant for evaluation sets of thousands of short clips.
  """
  spec = spec or config.data.eval
  source = sources.source_from_config(config, spec)
  stop = min(start + int(num_examples or config.data.eval_examples), len(source))
  videos, references, labels = [], [], {}
  for index in range(start, stop):
    try:
      example = source[index]
      if 'frames' not in example:  # not a decoding error: the wrong kind of source
        raise TypeError(f'eval source {spec!r} holds images, not videos (its examples have '
                        f'no frames: {sorted(example)})')
      video = decode_frames(example['frames'], frames, config.data.image_size)
      refs = transforms.captions_of(example)
    except transforms.DECODE_ERRORS as error:
      logging.warning('eval: skipping undecodable video %d of %s: %s', index, spec, error)
      continue
    videos.append(video)
    references.append(refs)
    for key, value in example.items():
      if key.startswith('labels/'):
        labels.setdefault(key, []).append(value)
  if not videos:
    raise ValueError(f'eval source {spec!r} has no videos from {start}')
  return {'videos': np.stack(videos), 'references': references,
          'captions': [refs[0] for refs in references],
          'zero_shot_tasks': getattr(source, 'zero_shot_tasks', {}),
          **{key: np.stack(values) for key, values in labels.items()}}
