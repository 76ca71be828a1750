"""Turns a user's image-caption pairs into sharded ArrayRecord files the training pipeline reads.

`python -m vlrep.data.ingest --input=PATH --output=DIR` accepts a CSV/TSV with `image` and
`caption` columns (image paths relative to the file; rows repeating an image add captions to one
record), a folder of images with same-named `.txt` caption files (one caption a line), a
COCO-format captions JSON (`annotations/captions_train2017.json`: images beside it, or in
`train2017/` for COCO's own layout), or a glob of webdataset tar shards as img2dataset writes
them (`key.jpg`, `key.txt`, `key.json`); `vlrep.data.ingest_inputs` reads these layouts into
samples. Every image is validated (decoded in full, size-checked) in parallel worker processes
and stored as its original encoded bytes in a `vlrep.data.records` record; broken rows are
skipped and counted by reason, and only an input with no valid row at all is an error. The
output is `DIR/data-XXXXX-of-YYYYY.array_record` plus `DIR/manifest.json`
(`vlrep.data.ingest_output` writes them), and is byte-identical for the same input: records
keep the input's order (CSV rows, COCO's images list, sorted paths).
Skip reasons: missing_image, empty_image, unreadable_image, not_an_image, unsupported_format,
truncated_image, image_too_large, missing_caption, empty_caption, bad_caption_encoding,
corrupt_tar_member, corrupt_tar (a shard, or its rest, unreadable), bad_csv_row; bad or
duplicate captions beside a good one are dropped and counted under `dropped_captions`. `--video`
ingests captioned clips instead (`vlrep.data.ingest_video`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import io
import itertools
import multiprocessing
import os
import sys
import time
import warnings
from typing import Any, Iterable, Iterator, Sequence

from absl import app, flags
from array_record.python import array_record_module
from PIL import Image, ImageOps

from vlrep.data import ingest_inputs, ingest_output, records
from vlrep.runtime import paths

DEFAULT_MAX_PIXELS = 64_000_000
DEFAULT_MAX_IMAGE_BYTES = 256 << 20
# Formats the training pipeline's decoder (PIL) reads reliably; MPO is a camera JPEG.
IMAGE_FORMATS = frozenset({'JPEG', 'MPO', 'PNG', 'WEBP', 'BMP', 'GIF', 'TIFF'})
_CHUNK = 16  # samples per task sent to a worker: amortises pickling without hurting balance


class NoValidRecordsError(ValueError):
  """Every row of the input was skipped."""


class _Skip(Exception):
  """A row is skipped; `args[0]` is the reason counted in the manifest."""


@dataclasses.dataclass(frozen=True)
class _Options:
  max_pixels: int
  max_side: int
  max_image_bytes: int


def _decode_caption(raw: bytes) -> str:
  try:
    text = raw.decode('utf-8')
  except UnicodeDecodeError:
    raise _Skip('bad_caption_encoding') from None
  return text.lstrip('\ufeff').strip()


def _captions(sample: ingest_inputs.Sample, dropped: collections.Counter) -> list[str]:
  """The sample's distinct non-empty captions; bad ones beside good ones go to `dropped`."""
  if sample.caption_path is not None:
    try:
      with open(sample.caption_path, 'rb') as file:
        raw = file.read()
    except OSError:
      raise _Skip('missing_caption') from None
    texts = [line.strip() for line in _decode_caption(raw).splitlines()]
    captions = list(dict.fromkeys(text for text in texts if text))
    if not captions:
      raise _Skip('empty_caption')
    return captions
  captions, problems = [], []
  for raw in sample.captions:
    try:
      text = _decode_caption(raw)
      if not text:
        raise _Skip('empty_caption')
    except _Skip as skip:
      problems.append(skip.args[0])
      continue
    if text in captions:
      problems.append('duplicate_caption')
    else:
      captions.append(text)
  if not captions:
    raise _Skip(problems[0] if problems else 'missing_caption')
  dropped.update(problems)
  return captions


def _read_image(sample: ingest_inputs.Sample, options: _Options) -> bytes:
  if sample.image_bytes is not None:
    return sample.image_bytes
  try:
    if os.path.getsize(sample.image_path) > options.max_image_bytes:
      raise _Skip('image_too_large')
    with open(sample.image_path, 'rb') as file:
      return file.read()
  except FileNotFoundError:
    raise _Skip('missing_image') from None
  except OSError:
    raise _Skip('unreadable_image') from None


def _downscale(image: Image.Image, max_side: int) -> bytes:
  """JPEG (quality 95) of `image` fitted in max_side x max_side, upright, alpha on white."""
  image = ImageOps.exif_transpose(image)  # re-encoding drops the EXIF orientation tag
  if image.mode in ('RGBA', 'LA', 'PA') or 'transparency' in image.info:
    rgba = image.convert('RGBA')
    image = Image.new('RGB', rgba.size, (255, 255, 255))
    image.paste(rgba, mask=rgba.getchannel('A'))
  else:
    image = image.convert('RGB')
  image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
  buffer = io.BytesIO()
  image.save(buffer, 'JPEG', quality=95)
  return buffer.getvalue()


def _validate_image(data: bytes, options: _Options) -> bytes:
  """The bytes to store: `data` itself, or a downscaled JPEG under --max_side."""
  if not data:
    raise _Skip('empty_image')
  with warnings.catch_warnings():
    # PIL's own decompression-bomb guard fires from the header alone: count it, don't warn.
    warnings.simplefilter('error', Image.DecompressionBombWarning)
    reason = 'not_an_image'
    try:
      image = Image.open(io.BytesIO(data))
      reason = 'truncated_image'  # the header parsed: a cut or corrupt body fails in load()
      width, height = image.size
      if image.format in IMAGE_FORMATS and 0 < width * height <= options.max_pixels:
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
      raise _Skip('image_too_large') from None
    except Exception:  # PIL raises many types on garbage input
      raise _Skip(reason) from None
  if image.format not in IMAGE_FORMATS:
    raise _Skip('unsupported_format')
  if width * height > options.max_pixels:
    raise _Skip('image_too_large')
  if not width * height:
    raise _Skip('not_an_image')
  if options.max_side and max(width, height) > options.max_side:
    return _downscale(image, options.max_side)
  return data


def _process(sample: ingest_inputs.Sample,
             options: _Options) -> tuple[bytes | None, str | None, int, dict]:
  """(record, None, captions, dropped) for a valid sample, else (None, reason, 0, {})."""
  dropped = collections.Counter()
  try:
    if sample.skip:
      raise _Skip(sample.skip)
    image = _validate_image(_read_image(sample, options), options)
    captions = _captions(sample, dropped)
  except _Skip as skip:
    return None, skip.args[0], 0, {}
  return records.encode(sample.key, image, captions), None, len(captions), dict(dropped)


def _process_chunk(samples: Sequence[ingest_inputs.Sample], options: _Options) -> list[tuple]:
  previous = Image.MAX_IMAGE_PIXELS
  # PIL refuses images over twice this outright; keep its guard consistent with ours.
  Image.MAX_IMAGE_PIXELS = options.max_pixels
  try:
    return [_process(sample, options) for sample in samples]
  finally:
    Image.MAX_IMAGE_PIXELS = previous


def _results(samples: Iterable[ingest_inputs.Sample], options: _Options,
             workers: int) -> Iterator[tuple]:
  """`_process` of every sample, in input order, over `workers` processes."""
  samples = iter(samples)
  chunks = iter(lambda: list(itertools.islice(samples, _CHUNK)), [])
  if workers <= 1:
    for chunk in chunks:
      yield from _process_chunk(chunk, options)
    return
  # forkserver: workers need no copy of a parent that may run threads (JAX), and the
  # preload imports the heavy dependencies once rather than once a worker. Not this module
  # itself: under `python -m` workers re-run it as their main, and runpy warns if it is loaded.
  context = multiprocessing.get_context('forkserver')
  context.set_forkserver_preload([records.__name__, Image.__name__, array_record_module.__name__])
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
    pending = collections.deque()
    for chunk in chunks:
      pending.append(pool.submit(_process_chunk, chunk, options))
      if len(pending) >= 4 * workers:  # bounded: tar samples carry their image bytes
        yield from pending.popleft().result()
    while pending:
      yield from pending.popleft().result()


def summary_line(manifest: dict[str, Any], directory: str) -> str:
  """`wrote N records (M captions) to K shards in DIR; skipped S: reason=count, ...`."""
  skipped = manifest['skipped']
  line = (f"wrote {manifest['records']} records ({manifest['captions']} captions) to "
          f"{len(manifest['shards'])} shards in {directory}; skipped {sum(skipped.values())}")
  if skipped:
    line += ': ' + ingest_output.format_counts(skipped)
  if manifest['dropped_captions']:
    line += (f"; dropped {sum(manifest['dropped_captions'].values())} captions: "
             + ingest_output.format_counts(manifest['dropped_captions']))
  return line


class _Progress:
  """One `\\r`-rewritten stderr line, at most every half second."""

  def __init__(self, enabled: bool):
    self._enabled, self._start, self._last = enabled, time.monotonic(), 0.0

  def update(self, written: int, skipped: int, final: bool = False) -> None:
    now = time.monotonic()
    if self._enabled and (final or now - self._last >= 0.5):
      self._last, rate = now, (written + skipped) / max(now - self._start, 1e-9)
      end = '\n' if final else ''
      sys.stderr.write(f'\ringested {written}, skipped {skipped} ({rate:.0f}/s){end}')
      sys.stderr.flush()


def ingest(input_path: str, output_dir: str, *, num_shards: int | None = None,
           workers: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
           max_side: int = 0, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
           overwrite: bool = False, progress: bool = False) -> dict[str, Any]:
  """Writes `output_dir`'s shards and manifest from `input_path`; returns the manifest.

  Raises NoValidRecordsError if every row was skipped, ValueError on a CSV without `image` and
  `caption` columns, FileNotFoundError if a tar glob matches nothing and FileExistsError if
  `output_dir` is not empty and `overwrite` is False.
  """
  if num_shards is not None and num_shards < 1:
    raise ValueError(f'num_shards must be positive, not {num_shards}')
  fmt = ingest_inputs.detect_format(input_path)
  skipped = collections.Counter()
  samples = ingest_inputs.read_samples(input_path, fmt, skipped, max_image_bytes)
  output_dir = paths.check(output_dir)
  ingest_output.prepare_output(output_dir, overwrite)
  options = _Options(int(max_pixels), int(max_side), int(max_image_bytes))
  dropped = collections.Counter()
  with paths.local_folder(output_dir) as folder:
    manifest = _write_shards(input_path, samples, folder, num_shards, workers, options,
                             progress, skipped, dropped)
    if paths.is_remote(output_dir):
      paths.copy_tree(folder, output_dir, manifest['shards'])
  manifest = {'source': input_path, 'format': fmt, **manifest}
  ingest_output.write_manifest(output_dir, manifest)
  return manifest


def _write_shards(input_path: str, samples: Iterable, folder: str, num_shards: int | None,
                  workers: int | None, options: _Options, progress: bool,
                  skipped: collections.Counter, dropped: collections.Counter) -> dict[str, Any]:
  """Validates `samples` into ArrayRecord shards in the local `folder`; the manifest's
  counts. Raises NoValidRecordsError (deleting the shards) if none was valid."""
  writer, captions = ingest_output.ShardWriter(folder, num_shards), 0
  bar = _Progress(progress)
  try:
    for record, reason, count, dropped_here in _results(samples, options,
                                                        workers or os.cpu_count() or 1):
      if record is None:
        skipped[reason] += 1
      else:
        writer.write(record)
        captions += count
        dropped.update(dropped_here)
      bar.update(writer.count, sum(skipped.values()))
  except BaseException:
    writer.close(keep=False)
    raise
  bar.update(writer.count, sum(skipped.values()), final=True)
  if not writer.count:
    writer.close(keep=False)
    raise NoValidRecordsError(
        f'no valid image-caption pairs in {input_path}; skipped {sum(skipped.values())}: '
        f'{ingest_output.format_counts(skipped) or "nothing"}')
  return {'records': writer.count, 'captions': captions, 'skipped': dict(sorted(skipped.items())),
          'dropped_captions': dict(sorted(dropped.items())), 'shards': writer.close(keep=True),
          'created_with': 'vlrep.data.ingest'}


def main(argv: list[str]) -> None:
  flags_ = flags.FLAGS
  if len(argv) > 1 and not flags_.runner:
    raise app.UsageError(f'unexpected arguments: {argv[1:]} (pipeline options need --runner)')
  common = dict(num_shards=flags_.num_shards, max_pixels=flags_.max_pixels,
                max_side=flags_.max_side, max_image_bytes=flags_.max_image_bytes,
                overwrite=flags_.overwrite)
  try:
    if flags_.video:  # pylint: disable-next=g-import-not-at-top
      from vlrep.data.ingest_video import ingest_video
      manifest = ingest_video(flags_.input, flags_.output, max_frames=flags_.max_frames, **common)
    elif flags_.runner:
      from vlrep.data import ingest_beam  # pylint: disable=g-import-not-at-top
      manifest = ingest_beam.ingest_beam(flags_.input, flags_.output, **common,
                                         pipeline_args=[f'--runner={flags_.runner}', *argv[1:]])
    else:
      manifest = ingest(flags_.input, flags_.output, workers=flags_.workers, progress=True,
                        **common)
  except (ValueError, OSError) as error:  # usage errors and "nothing valid": one line, exit 1
    sys.exit(f'ingest: {error}')
  print(summary_line(manifest, flags_.output))


if __name__ == '__main__':
  flags.DEFINE_string('input', None, 'A CSV/TSV (image,caption), a folder of images with '
                      '.txt captions, a COCO captions .json, or a glob of webdataset tar '
                      'shards (braces allowed).')
  flags.DEFINE_string('output', None, 'Directory for the ArrayRecord shards and manifest.json.')
  flags.DEFINE_integer('num_shards', None, 'Shards, records dealt round-robin (never more '
                       'shards than records); default one per '
                       f'{ingest_output.RECORDS_PER_SHARD} records.')
  flags.DEFINE_integer('workers', None, 'Validation processes; default: one per core.')
  flags.DEFINE_integer('max_pixels', DEFAULT_MAX_PIXELS, 'Larger images are skipped.')
  flags.DEFINE_integer('max_side', 0, 'If > 0, images with a longer side are downscaled '
                       'and re-encoded as JPEG (quality 95); 0 keeps the original bytes.')
  flags.DEFINE_integer('max_image_bytes', DEFAULT_MAX_IMAGE_BYTES, 'Larger files are skipped.')
  flags.DEFINE_bool('overwrite', False, 'Replace the shards of a non-empty output directory.')
  flags.DEFINE_string('runner', '', 'Run as an Apache Beam pipeline on this runner '
                      '(DirectRunner, DataflowRunner, FlinkRunner, SparkRunner; needs '
                      "'.[beam]'); other flags unknown here are passed on as Beam pipeline "
                      'options. Default: this process and its --workers.')
  flags.DEFINE_bool('video', False, 'The input is a folder of clips (frame folders or video '
                    'files, each with a .txt caption): see vlrep/data/ingest_video.py.')
  from vlrep.data.ingest_video import DEFAULT_MAX_FRAMES  # pylint: disable=g-import-not-at-top
  flags.DEFINE_integer('max_frames', DEFAULT_MAX_FRAMES, 'With --video: frames kept per clip, '
                       'spread uniformly over it.')
  flags.mark_flags_as_required(['input', 'output'])
  # Run the imported module, not __main__: workers unpickle its functions by module name.
  from vlrep.data import ingest as _ingest  # pylint: disable=g-import-not-at-top
  # Flags this module does not know are Beam's pipeline options (with --runner).
  app.run(_ingest.main, flags_parser=lambda argv: flags.FLAGS(argv, known_only=True))
