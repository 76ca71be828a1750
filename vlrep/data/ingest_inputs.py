"""Reads the four input layouts `vlrep.data.ingest` accepts into a stream of `Sample`s.

A CSV/TSV with `image` and `caption` columns (image paths relative to the file; rows repeating
an image add captions to one sample), a folder of images with same-named `.txt` caption files
(one caption a line), a COCO-format captions JSON (`{"images": [{"id", "file_name"}],
"annotations": [{"image_id", "caption"}]}`, `coco_samples`), or a brace-and-glob pattern of
webdataset tar shards as img2dataset writes them (`key.jpg`, `key.txt`, `key.json`). Listing is
cheap and in input order (CSV rows, COCO's images list, sorted paths): files are only named here
and read by the validating workers, except tar members, which carry their bytes. Nothing is
decoded or validated; a row already known to be broken becomes a `Sample` with its skip reason,
or, where it has no key, a count in `skipped`.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import os
import re
import tarfile
from typing import Any, Iterable, Iterator, Sequence

from vlrep.runtime import paths

IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp', 'bmp', 'gif')


@dataclasses.dataclass(frozen=True)
class Sample:
  """One would-be record, as cheap to pickle as possible: files are read by the worker."""
  key: str
  image_path: str | None = None
  image_bytes: bytes | None = None
  captions: tuple[bytes, ...] = ()  # raw caption texts, one caption each
  caption_path: str | None = None  # or a text file holding one caption a line
  skip: str | None = None  # a reason already known when the input was listed


def detect_format(input_path: str) -> str:
  """`folder`, `csv` (also TSV), `coco` (a captions JSON) or `tar` (a glob of shards)."""
  if os.path.isdir(input_path):
    return 'folder'
  if input_path.lower().endswith('.json'):
    return 'coco'
  if input_path.lower().endswith(('.csv', '.tsv')):
    return 'csv'
  return 'tar'


def read_samples(input_path: str, fmt: str, skipped: collections.Counter,
                 max_image_bytes: int) -> Iterable[Sample]:
  """The samples of `input_path` in format `fmt`; rows without a key are counted in `skipped`.

  Raises ValueError on a CSV without `image` and `caption` columns and FileNotFoundError if a
  tar glob matches nothing, both before anything is yielded.
  """
  if fmt == 'csv':
    return csv_samples(input_path, skipped)
  if fmt == 'folder':
    return folder_samples(input_path)
  if fmt == 'coco':
    return coco_samples(input_path, skipped)
  return tar_samples(tar_paths(input_path), skipped, max_image_bytes)


def csv_samples(path: str, skipped: collections.Counter) -> list[Sample]:
  """Rows grouped by image path, in first-appearance order: repeats are extra captions."""
  delimiter = '\t' if path.lower().endswith('.tsv') else ','
  base = os.path.dirname(os.path.abspath(path))
  csv.field_size_limit(1 << 24)
  # surrogateescape keeps non-UTF-8 captions readable so they are counted, not fatal.
  with open(path, newline='', encoding='utf-8-sig', errors='surrogateescape') as file:
    reader = csv.reader(file, delimiter=delimiter)
    header = [name.strip().lower() for name in next(reader, [])]
    for column in ('image', 'caption'):
      if column not in header:
        raise ValueError(f'{path}: header has no {column!r} column (columns: {header})')
    image_column, caption_column = header.index('image'), header.index('caption')
    groups: dict[str, tuple[str, list[bytes]]] = {}
    while True:
      try:
        row = next(reader)
      except StopIteration:
        break
      except csv.Error:
        skipped['bad_csv_row'] += 1
        continue
      if not any(field.strip() for field in row):
        continue
      image = row[image_column].strip() if image_column < len(row) else ''
      caption = row[caption_column] if caption_column < len(row) else ''
      if not image:
        skipped['missing_image'] += 1
        continue
      full = os.path.normpath(os.path.join(base, image))
      groups.setdefault(full, (image, []))[1].append(caption.encode('utf-8', 'surrogateescape'))
  return [Sample(key, image_path=full, captions=tuple(captions))
          for full, (key, captions) in groups.items()]


def coco_image_dir(path: str) -> str:
  """Where a COCO captions file's `file_name`s are: `ROOT/SPLIT/` for COCO's own layout
  (`ROOT/annotations/captions_SPLIT.json`), else the JSON's own directory."""
  directory = os.path.dirname(os.path.abspath(path))
  split = re.fullmatch(r'captions_(\w+)\.json', os.path.basename(path))
  if split and os.path.basename(directory) == 'annotations':
    return os.path.join(os.path.dirname(directory), split.group(1))
  return directory


def coco_samples(path: str, skipped: collections.Counter) -> list[Sample]:
  """One sample per entry of `images` (in the file's order, keyed by `file_name`) with the
  captions of its `annotations`; an image with none is skipped as missing_caption, and each
  `image_id` with captions that `images` lacks is counted as missing_image. A file without those
  lists or fields raises ValueError naming what is missing."""
  with open(path, encoding='utf-8') as file:
    data = json.load(file)
  if not isinstance(data, dict) or not isinstance(data.get('images'), list) or \
      not isinstance(data.get('annotations'), list):
    raise ValueError(f'{path}: a COCO captions file needs "images" and "annotations" lists')
  def field(entry: Any, name: str, kind: str) -> Any:
    if not isinstance(entry, dict) or name not in entry:
      raise ValueError(f'{path}: an entry of "{kind}" has no "{name}": {entry!r:.200}')
    return entry[name]
  captions: dict[Any, list[bytes]] = {}
  for annotation in data['annotations']:
    text = field(annotation, 'caption', 'annotations')
    captions.setdefault(field(annotation, 'image_id', 'annotations'), []).append(
        str(text).encode('utf-8', 'surrogateescape'))
  base, samples = coco_image_dir(path), []
  for image in data['images']:
    key, name = field(image, 'id', 'images'), field(image, 'file_name', 'images')
    texts = captions.pop(key, [])
    samples.append(Sample(name, image_path=os.path.join(base, name), captions=tuple(texts))
                   if texts else Sample(name, skip='missing_caption'))
  if captions:  # ids with captions but no image: would-be records, as a CSV row is
    skipped['missing_image'] += len(captions)
  return samples


def folder_samples(root: str) -> Iterator[Sample]:
  """Images under `root` (sorted relative paths) with the `.txt` file of the same stem."""
  images, texts = [], set()
  for directory, subdirectories, files in os.walk(root):
    subdirectories[:] = [name for name in subdirectories if not name.startswith('.')]
    for name in files:
      if name.startswith('.'):
        continue
      relative = os.path.relpath(os.path.join(directory, name), root).replace(os.sep, '/')
      extension = name.rpartition('.')[2].lower()
      if extension in IMAGE_EXTENSIONS:
        images.append(relative)
      elif extension == 'txt':
        texts.add(relative)
  captioned = set()
  for relative in sorted(images):
    text = relative.rpartition('.')[0] + '.txt'
    path = os.path.join(root, relative)
    if text in texts:
      captioned.add(text)
      yield Sample(relative, image_path=path, caption_path=os.path.join(root, text))
    else:
      yield Sample(relative, skip='missing_caption')
  for text in sorted(texts - captioned):
    yield Sample(text, skip='missing_image')


def expand_braces(pattern: str) -> list[str]:
  """Shell-style `{a,b}` and `{000..009}` expansion (zero padding kept), left to right."""
  match = re.search(r'\{([^{}]*)\}', pattern)
  if not match:
    return [pattern]
  body = match.group(1)
  numbers = re.fullmatch(r'(\d+)\.\.(\d+)', body)
  if numbers:
    first, last = numbers.groups()
    width = len(first) if first.startswith('0') else 0
    options = [str(n).zfill(width) for n in range(int(first), int(last) + 1)]
  elif ',' in body:
    options = body.split(',')
  else:  # not an expansion (`{x}`): keep it literally
    return [pattern[:match.end()] + rest for rest in expand_braces(pattern[match.end():])]
  head, tail = pattern[:match.start()], pattern[match.end():]
  return [expanded for option in options for expanded in expand_braces(head + option + tail)]


def tar_paths(pattern: str) -> list[str]:
  """The sorted, distinct files a brace-and-glob pattern names."""
  found = set()
  for expanded in expand_braces(paths.check(pattern)):
    found.update(path for path in paths.glob(expanded) if paths.isfile(path))
  if not found:
    raise FileNotFoundError(f'no files match {pattern!r}')
  return sorted(found)


def _tar_sample(key: str, members: dict[str, Any], table_captions: dict[str, bytes]) -> Sample:
  if 'skip' in members:  # a member of this sample could not be read
    return Sample(key, skip=members['skip'])
  image = next((members[ext] for ext in IMAGE_EXTENSIONS if ext in members), None)
  if image is None:
    return Sample(key, skip='missing_image')
  caption = members.get('txt', table_captions.get(key))
  if caption is None:
    return Sample(key, skip='missing_caption')
  return Sample(key, image_bytes=image, captions=(caption,))


def tar_samples(tar_files: Sequence[str], skipped: collections.Counter,
                max_image_bytes: int) -> Iterator[Sample]:
  """Samples of each shard in order: a sample is a run of members sharing a key."""
  for path in tar_files:
    yield from tar_file_samples(path, skipped, max_image_bytes)


def img2dataset_rows(tar_path: str, skipped: collections.Counter) -> dict[str, bytes]:
  """img2dataset's `X.parquet` beside shard `X.tar`, if there is one: its rows that failed
  (status other than `success`: no image in the shard) are counted in `skipped` under their
  status (`failed_to_download`, `failed_to_resize`, ...), and {key: caption} of the others
  is returned, for samples whose shard has no `.txt` member (img2dataset without
  `--caption_col`'s text files, or with captions only in the table)."""
  parquet = re.sub(r'\.tar$', '.parquet', tar_path)
  if parquet == tar_path or not paths.isfile(parquet):
    return {}
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top  (img2dataset sets only)
  with paths.open_file(parquet, 'rb') as file:
    table = pq.read_table(file).to_pydict()
  keys, statuses = table.get('key', []), table.get('status', [])
  captions = table.get('caption', [None] * len(keys))
  out = {}
  for key, status, caption in zip(keys, statuses or ['success'] * len(keys), captions):
    if status != 'success':
      skipped[str(status)] += 1
    elif key is not None and caption is not None:
      out[str(key)] = str(caption).encode('utf-8')
  return out


def tar_file_samples(path: str, skipped: collections.Counter,
                     max_image_bytes: int) -> Iterator[Sample]:
  """The samples of one shard (local or gs://), in order; with img2dataset's parquet table
  beside it, its failed rows are counted and its captions fill in missing `.txt` members."""
  table_captions = img2dataset_rows(path, skipped)
  try:
    file = paths.open_file(path, 'rb')
  except OSError:
    skipped['corrupt_tar'] += 1
    return
  with file:
    try:
      tar = tarfile.open(fileobj=file, mode='r:*')
    except (tarfile.TarError, OSError, EOFError):
      skipped['corrupt_tar'] += 1
      return
    with tar:
      key, members = None, {}
      iterator = iter(tar)
      while True:
        try:
          member = next(iterator)
        except StopIteration:
          break
        except (tarfile.TarError, OSError, EOFError):
          skipped['corrupt_tar'] += 1  # the rest of the shard is unreadable
          break
        if not member.isfile():
          continue
        directory, _, name = member.name.removeprefix('./').rpartition('/')
        stem, _, extension = name.partition('.')
        member_key = f'{directory}/{stem}' if directory else stem
        extension = extension.lower()
        if member_key != key:
          if key is not None:
            yield _tar_sample(key, members, table_captions)
          key, members = member_key, {}
        if extension not in IMAGE_EXTENSIONS and extension != 'txt':
          continue  # .json and other metadata
        if extension != 'txt' and member.size > max_image_bytes:
          members.setdefault('skip', 'image_too_large')
          continue
        try:
          members[extension] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError):
          members['skip'] = 'corrupt_tar_member'
          break  # a member cut short: nothing after it can be read either
      if key is not None:
        yield _tar_sample(key, members, table_captions)
