"""Video clips with captions -> ArrayRecord video records: `python -m vlrep.data.ingest --video`.

The input is a folder whose entries are clips, each with a same-named `.txt` caption file
beside it (one caption a line): a sub-folder of frame images (in name order), or a video
file (`VIDEO_EXTENSIONS`), decoded with PyAV (`vlrep.data.video.read_video_file`). A clip
keeps up to `max_frames` frames spread uniformly over it (all of a shorter clip), each stored
as an encoded image in a `vlrep.data.records` video record: a folder's frames as their
original bytes (validated as `vlrep.data.ingest` validates images, downscaled past
`max_side`), a video file's as JPEG; readers sample their T frames from these
(`vlrep.data.video.sample_indices`). Broken clips are skipped and counted by reason as
image ingest does, with its reasons for a caption or a frame image (a clip goes with any
broken frame) and these: missing_clip (a caption with no clip), no_frames (an empty folder,
or a video with no video frame), unreadable_video (what FFmpeg cannot open or decode),
video_too_large (a file over `max_image_bytes`). Output: the shards and `manifest.json`, as
image ingest writes them. Clips are decoded in this one process.
"""

from __future__ import annotations

import collections
import os
from typing import Any, Iterator

from vlrep.data import ingest, ingest_output, records, video
from vlrep.data.ingest_inputs import IMAGE_EXTENSIONS, Sample
from vlrep.runtime import paths

VIDEO_EXTENSIONS = ('mp4', 'webm', 'mkv', 'avi', 'mov', 'm4v')
DEFAULT_MAX_FRAMES = 32


def clip_samples(root: str) -> Iterator[Sample]:
  """A `Sample` per clip of `root` (sorted names): `image_path` is the folder or video file."""
  if not os.path.isdir(root):
    raise ValueError(f'--video needs a folder of clips (frame folders or video files), '
                     f'not {root!r}')
  names = sorted(n for n in os.listdir(root) if not n.startswith('.'))
  texts = {n.rpartition('.')[0] for n in names if n.lower().endswith('.txt')}
  used = set()
  for name in names:
    path = os.path.join(root, name)
    stem, _, extension = name.rpartition('.')
    if os.path.isdir(path):
      stem = name
    elif extension.lower() not in VIDEO_EXTENSIONS:
      continue
    used.add(stem)
    yield (Sample(name, image_path=path, caption_path=os.path.join(root, stem + '.txt'))
           if stem in texts else Sample(name, skip='missing_caption'))
  for stem in sorted(texts - used):
    yield Sample(stem + '.txt', skip='missing_clip')


def _frames(sample: Sample, options: ingest._Options, max_frames: int) -> list[bytes]:
  path = sample.image_path
  if os.path.isdir(path):
    files = sorted(n for n in os.listdir(path) if not n.startswith('.')
                   and n.rpartition('.')[2].lower() in IMAGE_EXTENSIONS)
    if not files:
      raise ingest._Skip('no_frames')
    keep = video.sample_indices(len(files), min(len(files), max_frames))
    return [ingest._validate_image(ingest._read_image(
        Sample(sample.key, image_path=os.path.join(path, files[i])), options), options)
            for i in keep]
  if os.path.getsize(path) > options.max_image_bytes:
    raise ingest._Skip('video_too_large')
  try:
    import av  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError("video files are decoded with PyAV: pip install 'vlrep[video]'") from None
  try:
    return video.read_video_file(path, max_frames, options.max_side)
  except (av.error.FFmpegError, OSError):  # FFmpeg's errors are ValueErrors too: first
    raise ingest._Skip('unreadable_video') from None
  except ValueError:
    raise ingest._Skip('no_frames') from None


def ingest_video(input_path: str, output_dir: str, *, num_shards: int | None = None,
                 max_frames: int = DEFAULT_MAX_FRAMES, max_pixels: int = ingest.DEFAULT_MAX_PIXELS,
                 max_side: int = 0, max_image_bytes: int = ingest.DEFAULT_MAX_IMAGE_BYTES,
                 overwrite: bool = False) -> dict[str, Any]:
  """Writes `output_dir`'s video shards and manifest from the clips of `input_path`; returns
  the manifest. Raises NoValidRecordsError if every clip was skipped."""
  if max_frames < 1:
    raise ValueError(f'max_frames must be >= 1, not {max_frames}')
  if num_shards is not None and num_shards < 1:
    raise ValueError(f'num_shards must be positive, not {num_shards}')
  samples = list(clip_samples(input_path))
  output_dir = paths.check(output_dir)
  ingest_output.prepare_output(output_dir, overwrite)
  options = ingest._Options(int(max_pixels), int(max_side), int(max_image_bytes))
  skipped, dropped = collections.Counter(), collections.Counter()
  with paths.local_folder(output_dir) as folder:
    writer, captions = ingest_output.ShardWriter(folder, num_shards), 0
    try:
      for sample in samples:
        try:
          if sample.skip:
            raise ingest._Skip(sample.skip)
          frames = _frames(sample, options, max_frames)
          texts = ingest._captions(sample, dropped)
        except ingest._Skip as skip:
          skipped[skip.args[0]] += 1
          continue
        writer.write(records.encode_video(sample.key, frames, texts))
        captions += len(texts)
    except BaseException:
      writer.close(keep=False)
      raise
    if not writer.count:
      writer.close(keep=False)
      raise ingest.NoValidRecordsError(
          f'no valid captioned clips in {input_path}; skipped {sum(skipped.values())}: '
          f'{ingest_output.format_counts(skipped) or "nothing"}')
    manifest = {'source': input_path, 'format': 'video', 'max_frames': max_frames,
                'records': writer.count, 'captions': captions,
                'skipped': dict(sorted(skipped.items())),
                'dropped_captions': dict(sorted(dropped.items())),
                'shards': writer.close(keep=True), 'created_with': 'vlrep.data.ingest --video'}
    if paths.is_remote(output_dir):
      paths.copy_tree(folder, output_dir, manifest['shards'])
  ingest_output.write_manifest(output_dir, manifest)
  return manifest
