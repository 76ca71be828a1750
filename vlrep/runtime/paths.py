"""User paths, local or `gs://`: the one module that decides how a path is read or written.

Every path a user gives (`--workdir`, `data.train`'s ArrayRecord files, `init_from`, exports,
`tfds_data_dir`, ingest `--output`, ...) goes through here. A local path behaves as plain
`os` calls would; a `gs://` path goes through `etils.epath` (gcsfs underneath when
TensorFlow is absent); any other scheme (`s3://`, `http://`, ...) is refused by name, since
parts of the stack would silently mistreat it (Orbax 0.12 writes every non-gs:// path as a
local one, array_record reads 0 records from `s3://`). Object stores have no append, rename
or random writes, so the module also owns the workarounds: `writing_locally` (write a local
file, then upload it: ArrayRecordWriter and safetensors cannot write to a bucket),
`reading_locally` (the reverse) and `Mirror` (a local folder copied to the bucket, for files
that grow: `metrics.jsonl` is appended locally and re-uploaded whole, TensorBoard events are
written by tensorboardX's local writer, never its own GCS writer, which uploads its buffer
again from `__del__` at interpreter exit).
"""

from __future__ import annotations

import contextlib
import glob as glob_lib
import os
import posixpath
import re
import shutil
import tempfile
import threading
import time
from typing import IO, Any, Iterator

REMOTE_SCHEMES = ('gs',)
_COPY_CHUNK = 16 << 20
_SCHEME = re.compile(r'^([A-Za-z][A-Za-z0-9+.-]*)://')


class UnsupportedPathError(ValueError):
  """A URL whose scheme vlrep cannot read and write end to end."""


def scheme(path: str) -> str | None:
  """'gs' for 'gs://b/x', None for a local path."""
  match = _SCHEME.match(os.fspath(path))
  return match.group(1) if match else None  # case kept: 'GS://' is no bucket


def check(path: str) -> str:
  """`path` itself if it is local or gs://; UnsupportedPathError naming the scheme if not."""
  path = os.fspath(path)
  found = scheme(path)
  if found is not None and found not in REMOTE_SCHEMES:
    raise UnsupportedPathError(
        f'{path!r}: {found}:// paths are not supported (local paths and gs:// only)')
  return path


def is_remote(path: str) -> bool:
  return scheme(check(path)) is not None


def _epath(path: str, fresh: bool = False):
  """`path` as an `etils.epath.Path`; `fresh`: first forget gcsfs's cached listings, which
  would otherwise hide what other processes (or hosts) wrote since they were made."""
  from etils import epath  # pylint: disable=g-import-not-at-top  (only remote paths need it)
  if fresh:
    import fsspec  # pylint: disable=g-import-not-at-top
    # The instance etils.epath uses (fsspec caches filesystems by their arguments).
    fsspec.filesystem('gcs', finalize_on_close=True).invalidate_cache()
  return epath.Path(path)


def absolute(path: str) -> str:
  """A local path made absolute (`~` expanded); a gs:// path unchanged (no trailing '/')."""
  if is_remote(path):
    return path.rstrip('/')
  return os.path.abspath(os.path.expanduser(path))


def local(path: str) -> str:
  """A local path with `~` expanded; a gs:// path unchanged."""
  return path if is_remote(path) else os.path.expanduser(path)


def join(path: str, *parts: str) -> str:
  return posixpath.join(path, *parts) if is_remote(path) else os.path.join(path, *parts)


def basename(path: str) -> str:
  return posixpath.basename(path.rstrip('/')) if is_remote(path) else os.path.basename(path)


def exists(path: str) -> bool:
  return _epath(path, fresh=True).exists() if is_remote(path) else os.path.exists(local(path))


def isfile(path: str) -> bool:
  return _epath(path, fresh=True).is_file() if is_remote(path) else os.path.isfile(local(path))


def isdir(path: str) -> bool:
  return _epath(path, fresh=True).is_dir() if is_remote(path) else os.path.isdir(local(path))


def makedirs(path: str) -> None:
  """Local: `os.makedirs(exist_ok=True)`. A bucket has no directories: nothing to do."""
  if not is_remote(path):
    os.makedirs(local(path), exist_ok=True)


def listdir(path: str) -> list[str]:
  """Names (not paths) in a directory, sorted; [] for a gs:// prefix with no objects."""
  if is_remote(path):
    directory = _epath(path, fresh=True)
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []
  return sorted(os.listdir(local(path)))


def glob(pattern: str) -> list[str]:
  """The paths a glob names, sorted (on gs://, wildcards from the first part that has one)."""
  if not is_remote(pattern):
    return sorted(glob_lib.glob(local(pattern)))
  parts = pattern.split('/')
  first = next((i for i, part in enumerate(parts) if re.search(r'[*?\[]', part)), None)
  if first is None:
    return [pattern] if exists(pattern) else []
  base, rest = '/'.join(parts[:first]), '/'.join(parts[first:])
  return sorted(str(p) for p in _epath(base, fresh=True).glob(rest))


def remove(path: str) -> None:
  if is_remote(path):
    _epath(path).unlink()
  else:
    os.remove(local(path))


def rmtree(path: str) -> None:
  if is_remote(path):
    _epath(path).rmtree()
  else:
    shutil.rmtree(local(path))


def open_file(path: str, mode: str = 'r', **kwargs: Any) -> IO:
  """`open` for local or gs:// paths; 'w' on gs:// replaces the object when closed.

  No append mode: gcsfs 'a' warns and overwrites, losing what the object held (use `Mirror`).
  """
  if 'a' in mode:
    raise ValueError('paths.open_file has no append mode (objects cannot be appended to); '
                     'use paths.Mirror')
  if is_remote(path):
    return _epath(path).open(mode, **kwargs)
  return open(local(path), mode, **kwargs)  # pylint: disable=unspecified-encoding


def read_text(path: str) -> str:
  with open_file(path, 'r') as f:
    return f.read()


def write_text(path: str, text: str) -> None:
  """Writes `text` whole; a reader sees the old or the new content, never a part.

  Local: a temporary file renamed over `path`; gs://: an object upload, atomic by itself.
  """
  with writing_locally(path) as partial:
    with open(partial, 'w') as f:
      f.write(text)


def upload(local_path: str, path: str) -> None:
  """Copies the local file `local_path` to `path` (gs:// or local)."""
  if is_remote(path):
    # Streamed (shards are large); the object appears whole when the stream closes.
    with open(local_path, 'rb') as source, _epath(path).open('wb') as target:
      shutil.copyfileobj(source, target, _COPY_CHUNK)
  else:
    shutil.copyfile(local_path, local(path))


def download(path: str, local_path: str) -> None:
  """Copies `path` (gs:// or local) to the local file `local_path`."""
  with open_file(path, 'rb') as source, open(local_path, 'wb') as target:
    shutil.copyfileobj(source, target, _COPY_CHUNK)


@contextlib.contextmanager
def writing_locally(path: str, mode: int = 0o644) -> Iterator[str]:
  """Yields a local file name to write; on success it becomes `path` whole.

  Local `path`: `path.partial` beside it, renamed (readers never see half a file). gs://: a
  temporary local file, uploaded, then deleted: for writers that only take local files
  (ArrayRecordWriter fails on gs://, safetensors writes with `open`).
  """
  if is_remote(path):
    with tempfile.TemporaryDirectory(prefix='vlrep-upload-') as folder:
      partial = os.path.join(folder, basename(path))
      yield partial
      upload(partial, path)
    return
  target = local(path)
  partial = target + '.partial'
  try:
    yield partial
    os.chmod(partial, mode)  # some writers (safetensors) create files owner-only
    os.replace(partial, target)
  finally:
    if os.path.exists(partial):
      os.remove(partial)


@contextlib.contextmanager
def reading_locally(path: str) -> Iterator[str]:
  """Yields a local file with `path`'s content (`path` itself when it is local)."""
  if not is_remote(path):
    yield local(path)
    return
  with tempfile.TemporaryDirectory(prefix='vlrep-download-') as folder:
    copy = os.path.join(folder, basename(path))
    download(path, copy)
    yield copy


@contextlib.contextmanager
def local_folder(path: str) -> Iterator[str]:
  """Yields a local folder to write `path`'s files in: `path` itself when it is local, else a
  temporary folder (deleted on exit) whose files the caller uploads (`copy_tree`)."""
  if not is_remote(path):
    yield local(path)
    return
  folder = tempfile.mkdtemp(prefix='vlrep-staging-')
  try:
    yield folder
  finally:
    shutil.rmtree(folder, ignore_errors=True)


def copy_tree(local_dir: str, path: str, names: list[str] | None = None) -> None:
  """Copies the files `names` (default: all, not recursive) of `local_dir` into `path`."""
  makedirs(path)
  for name in sorted(os.listdir(local_dir)) if names is None else names:
    source = os.path.join(local_dir, name)
    if os.path.isfile(source):
      upload(source, join(path, name))


class Mirror:
  """A local folder standing for a gs:// one: files are written locally, then uploaded.

  For files that grow while a run goes on. A local `path` is used as it is (`folder` is
  `path`; `sync` does nothing), so local runs write exactly as before. For gs://, `folder` is
  a temporary directory; `fetch(name)` first downloads an existing file (so a resumed run's
  `metrics.jsonl` keeps its earlier lines), `sync()` uploads every file whose size or
  modification time changed: at once if the last upload is `interval_s` old (a bucket takes
  about one write per second to an object), else from a timer thread when it is; `close()`
  uploads what is left and deletes the local copy. A killed process loses what it wrote in
  its last `interval_s`.
  """

  def __init__(self, path: str, interval_s: float = 2.0):
    self.path, self._interval_s = path, interval_s
    self._remote = is_remote(path)
    self.folder = (tempfile.mkdtemp(prefix='vlrep-mirror-') if self._remote
                   else local(path))
    os.makedirs(self.folder, exist_ok=True)
    self._uploaded: dict[str, tuple[int, int]] = {}
    self._last_sync = -float('inf')
    self._lock = threading.Lock()
    self._timer: threading.Timer | None = None

  def fetch(self, name: str) -> str:
    """The local path of `name`, holding the remote file's content if there is one."""
    target = os.path.join(self.folder, name)
    if self._remote and isfile(join(self.path, name)):
      download(join(self.path, name), target)
      stat = os.stat(target)
      self._uploaded[name] = (stat.st_size, stat.st_mtime_ns)
    return target

  def sync(self, force: bool = False) -> None:
    if not self._remote:
      return
    with self._lock:
      wait = self._last_sync + self._interval_s - time.monotonic()
      if wait > 0 and not force:
        if self._timer is None:  # upload when the interval is over
          self._timer = threading.Timer(wait, self.sync, kwargs={'force': True})
          self._timer.daemon = True
          self._timer.start()
        return
      if self._timer is not None:
        self._timer.cancel()
        self._timer = None
      self._last_sync = time.monotonic()
      self._upload_changed()

  def _upload_changed(self) -> None:
    for root, _, files in os.walk(self.folder):
      for file in files:
        source = os.path.join(root, file)
        name = os.path.relpath(source, self.folder).replace(os.sep, '/')
        stat = os.stat(source)
        if self._uploaded.get(name) != (stat.st_size, stat.st_mtime_ns):
          upload(source, join(self.path, name))
          self._uploaded[name] = (stat.st_size, stat.st_mtime_ns)

  def close(self) -> None:
    self.sync(force=True)
    if self._remote:
      shutil.rmtree(self.folder, ignore_errors=True)
