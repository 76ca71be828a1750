"""grain pipelines: from a source string to this process's slice of every global batch.

Source strings (`config.data.train`, `config.data.eval`) are parsed by
`vlrep/data/sources.py`: `synthetic[:SPLIT]`, `arrayrecord:PATH`, `tfds:NAME[/CONFIG][:SPLIT]`.
The training stream is the source shuffled with `config.seed` and repeated (reshuffled each
epoch), then decoded and augmented with a generator seeded by (seed, position in the stream);
global batch `b` is elements [b*B, (b+1)*B) of that stream, and process `p` of `P` reads the
contiguous slice p*B/P .. (p+1)*B/P of it. So a batch's content depends on the seed and the
step only, never on the number of processes or devices, and the iterator's state (saved in
every checkpoint) is a position in that stream. A record that fails to decode is replaced by
the next one of the stream and counted (`skipped_count`, logged as `data/skipped`), never
fatal. `data.workers` > 0 moves batch making into grain worker processes (`mp_prefetch`),
whose state also checkpoints exactly.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Iterator, Sequence

import grain
import ml_collections
import numpy as np
from absl import flags

from vlrep.data import transforms
from vlrep.data.sources import source_from_config
from vlrep.data.tokenizer import get_tokenizer

# A record is tried this many stream positions ahead before a run gives up: by then the data
# is broken, not a few files.
_MAX_SUBSTITUTES = 64
_SKIP_ERRORS = transforms.DECODE_ERRORS
_LOGGED_SKIPS = 10

_skipped = 0
_skipped_lock = threading.Lock()  # also guards _decoded_eval_images
_decoded_eval_images = 0


def skipped_count() -> int:
  """Undecodable records in the batches this process has returned since it started.

  Process-local and not checkpointed: after a resume it counts from 0 again.
  """
  return _skipped


class _SkipFailed(grain.MapDataset):
  """Position i of the global stream: the first element i, i+1, ... that decodes.

  Substituting here, before `_ProcessSlice`, keeps a global batch independent of the process
  count: every process computes the same substitutes from global positions alone (a filter
  after slicing would shift each process's slice by its own skips). The substitute is the
  next element, so it appears twice; with rare bad records that costs nothing. A failed
  position is marked `skipped: 1` and counted once, by the process whose slice holds it.
  """

  def __init__(self, parent: grain.MapDataset):
    super().__init__(parent)
    self._logged = 0

  def __len__(self) -> int:
    return len(self._parent)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    error = None
    for offset in range(_MAX_SUBSTITUTES):
      try:
        example = self._parent[index + offset]
      except _SKIP_ERRORS as e:
        error = e
        if self._logged < _LOGGED_SKIPS:
          self._logged += 1
          logging.warning('skipping undecodable record at stream position %d: %s',
                          index + offset, e)
        continue
      return {**example, 'skipped': int(offset > 0)}
    raise RuntimeError(f'{_MAX_SUBSTITUTES} records in a row failed to decode, the last with: '
                       f'{error}')

  def __str__(self) -> str:
    return 'SkipFailed'


class _ProcessSlice(grain.MapDataset):
  """Element k of this process is element g(k) of the global stream (see module docstring).

  `rows` (sorted) are the rows of each global batch this process reads: by default the
  process's contiguous share; with a mesh axis that spans processes (tensor, fsdp) they are
  the rows of this process's devices (`sharding.process_rows`), possibly shared with others.
  """

  def __init__(self, parent: grain.MapDataset, global_batch: int, process_index: int,
               process_count: int, rows: Sequence[int] | None = None):
    super().__init__(parent)
    if rows is None:
      if global_batch % process_count:
        raise ValueError(f'batch_size {global_batch} does not divide over {process_count} '
                         'processes')
      local = global_batch // process_count
      rows = range(process_index * local, (process_index + 1) * local)
    self._global_batch, self._rows = global_batch, np.asarray(rows, np.int64)
    self.local_batch = len(self._rows)

  def __len__(self) -> int:
    return len(self._parent) // self._global_batch * self.local_batch

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    batch, within = divmod(index, self.local_batch)
    return self._parent[batch * self._global_batch + int(self._rows[within])]

  def __str__(self) -> str:
    return f'ProcessSlice(rows={self._rows[0]}..{self._rows[-1]}, local_batch={self.local_batch})'


class _CountSkips(grain.transforms.Map):
  """Moves a batch's `skipped` marks into this process's counter (after any workers)."""

  def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    global _skipped
    skipped = int(np.sum(batch.pop('skipped')))
    if skipped:
      with _skipped_lock:
        _skipped += skipped
    return batch


def train_dataset(config: ml_collections.ConfigDict, process_index: int,
                  process_count: int, rows: Sequence[int] | None = None) -> grain.IterDataset:
  """This process's infinite stream of training batches (dicts of numpy arrays): its share
  of each global batch, or the given `rows` of it (sorted)."""
  data = config.data
  source = source_from_config(config, data.train)
  stream = grain.MapDataset.source(source).seed(config.seed).shuffle().repeat(None)
  # On the global stream, so random_map's generator is seeded by (seed, global position).
  decode = transforms.DecodeAndAugment(data.image_size, data.augment, data.label_key,
                                        data.frames)
  stream = _SkipFailed(stream.random_map(decode))
  local = _ProcessSlice(stream, config.batch_size, process_index, process_count, rows)
  tokenize = transforms.Tokenize(get_tokenizer(data.tokenizer), data.max_text_len)
  batches = local.map(tokenize).batch(local.local_batch, drop_remainder=True)
  # Elements are whole batches here: keep only a couple ahead, so that filling the buffer
  # does not compete with the train step for the CPU.
  threads, workers = input_workers(data)
  out = batches.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                  prefetch_buffer_size=max(threads, 1) + 1))
  if workers:
    if not flags.FLAGS.is_parsed():
      # grain's workers read its absl flags; a program run with app.run has parsed them,
      # a library caller (tests, notebooks) has not: take their defaults.
      flags.FLAGS.mark_as_parsed()
    out = out.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                       per_worker_buffer_size=2))
  return out.map(_CountSkips())


def host_cores() -> int:
  """CPUs this process may run on (its affinity mask, e.g. a container's share), or all."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


def input_workers(data: ml_collections.ConfigDict, cores: int | None = None) -> tuple[int, int]:
  """(threads, worker processes) for `data.worker_threads` / `data.workers`: values > 0 as
  given, `workers` -1 = none, and 0 (the default) = chosen from the host's `cores`.

  Auto: below 8 cores no worker processes (on 2 cores they were slower than one thread: the
  train step needs the cores, README "Input speed") and one thread per 2 cores (1 on 2);
  from 8 cores up, a worker process per 4 cores (at most 32), which decode in parallel
  outside this process's GIL, each with 2 reading threads.
  """
  cores = host_cores() if cores is None else cores
  threads, workers = int(data.worker_threads), int(data.workers)
  if workers == 0:
    workers = 0 if cores < 8 else min(32, cores // 4)
  workers = max(workers, 0)  # -1: none
  if threads == 0:
    threads = 2 if workers else max(1, min(16, cores // 2))
  return threads, workers


def eval_source(config: ml_collections.ConfigDict, spec: str = '', label_key: str = '') -> Any:
  """The source of `eval_examples` (`spec` '' = `data.eval`)."""
  spec = spec or config.data.eval
  if label_key and spec.startswith('tfds:'):
    # TfdsSource gives a ClassLabel feature as its names (`data.tfds_caption_key`); a
    # classification set may have no caption feature at all.
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.data.tfds_caption_key = label_key
  return source_from_config(config, spec)


class EvalImages:
  """The decoded images of chosen examples of a source, read on demand.

  What `eval_examples(..., stream=True)` returns as `images`: a sequence that holds only the
  examples' indices, so an evaluation keeps at most one chunk of decoded images in memory
  whatever the set's size. `Pretrained`'s methods take it in place of an array and decode,
  chunk by chunk, only the rows that this process's devices hold (`take_rows`); `chunks(n)`
  yields uint8 [<=n, S, S, 3] arrays in order; slicing gives the images of a prefix (or any
  range) of the examples, still unread.
  """

  dtype = np.dtype(np.uint8)

  def __init__(self, source: Any, indices: Sequence[int], image_size: int):
    self._source, self._indices, self._image_size = source, list(indices), image_size

  def __len__(self) -> int:
    return len(self._indices)

  @property
  def row_shape(self) -> tuple[int, int, int]:
    return (self._image_size, self._image_size, 3)

  def __getitem__(self, rows: slice) -> 'EvalImages':
    if not isinstance(rows, slice):
      raise TypeError('EvalImages are read in chunks (chunks(n)), by take_rows or sliced, '
                      'not indexed')
    return EvalImages(self._source, self._indices[rows], self._image_size)

  def take_rows(self, rows: Sequence[int]) -> np.ndarray:
    """uint8 [len(rows), S, S, 3]: the images at these positions, decoded now."""
    global _decoded_eval_images
    images = np.zeros((len(rows), *self.row_shape), self.dtype)
    for k, row in enumerate(rows):
      images[k] = transforms.decode_image(self._source[self._indices[row]]['image'],
                                          self._image_size)
    with _skipped_lock:
      _decoded_eval_images += len(rows)
    return images

  def chunks(self, size: int) -> Iterator[np.ndarray]:
    for begin in range(0, len(self._indices), size):
      yield self.take_rows(range(begin, min(begin + size, len(self._indices))))

  def read(self) -> np.ndarray:
    """All of them at once (for small sets and tests)."""
    return self.take_rows(range(len(self)))


def eval_images_decoded() -> int:
  """How many evaluation images this process has decoded so far (`EvalImages`)."""
  return _decoded_eval_images


def eval_examples(config: ml_collections.ConfigDict, spec: str = '', num_examples: int = 0,
                  start: int = 0, label_key: str = '', stream: bool = False) -> dict[str, Any]:
  """Examples `start .. start+num_examples` of an eval source, in order, as numpy arrays.

  `spec` '' is `config.data.eval` and `num_examples` 0 is `config.data.eval_examples` (fewer
  if the source ends first). Images are center-resized to `data.image_size`; undecodable
  records are left out (with a warning), so every process and mesh sees the same examples.
  Returns `images` uint8 [N, H, W, 3] (with `stream`: an `EvalImages`, which decodes them
  again when read, in chunks, so that only one chunk is ever held), `captions` (the first
  caption of each, N str), `references` (all captions of each, N lists of str), any
  `labels/*` arrays of the source, `zero_shot_tasks` (the source's {task: (class names,
  templates)}, empty if it has none) and, with `label_key`, `label` (int [N] or multi-hot
  [N, C]) and `class_names`.

  `label_key` names the label: a key of the source's examples (the synthetic set's
  `labels/<task>`, class names from its zero-shot task) or a TFDS ClassLabel feature
  (`tfds:` sources; read as that feature's names and mapped back to indices).
  """
  spec = spec or config.data.eval
  num_examples = int(num_examples or config.data.eval_examples)
  tfds_label = bool(label_key) and spec.startswith('tfds:')
  source = eval_source(config, spec, label_key)
  stop = min(start + num_examples, len(source))
  images, references, labels, indices, index = [], [], {}, [], start
  while len(indices) < stop - start and index < len(source):
    try:
      example = source[index]
      image = transforms.decode_image(example['image'], config.data.image_size)
      # Streamed: decoded here only to leave out the same undecodable records; what is kept
      # of each example is its captions and labels (per key, not a dict per example).
      references.append(transforms.captions_of(example))
      for key, value in example.items():
        if key.startswith('labels/'):
          labels.setdefault(key, []).append(value)
      indices.append(index)
      if not stream:
        images.append(image)
    except _SKIP_ERRORS as error:
      logging.warning('eval: skipping undecodable record %d of %s: %s', index, spec, error)
    index += 1
  if not indices:
    raise ValueError(f'eval source {spec!r} has no examples from {start}')
  out: dict[str, Any] = {
      'images': EvalImages(source, indices, config.data.image_size) if stream
                else np.stack(images),
      'references': references, 'captions': [refs[0] for refs in references],
      'zero_shot_tasks': getattr(source, 'zero_shot_tasks', {}),
      **{key: np.stack(values) for key, values in labels.items()}}
  if tfds_label:
    names = _tfds_class_names(source.name, label_key, config.data.tfds_data_dir)
    index_of = {name: i for i, name in enumerate(names)}
    out['label'] = np.array([index_of[refs[0]] for refs in references], np.int32)
    out['class_names'] = names
  elif label_key:
    out.update(select_label(out, label_key, spec))
  return out


def select_label(examples: dict[str, Any], label_key: str, spec: str) -> dict[str, Any]:
  """{'label': examples[label_key], 'class_names' (if the source names them)} of a non-TFDS
  source's examples; `labels/<task>` is named by the source's zero-shot task."""
  if label_key not in examples:
    raise ValueError(f'eval source {spec!r} has no label {label_key!r} (its labels: '
                     f'{sorted(k for k in examples if k.startswith("labels/"))})')
  out = {'label': examples[label_key]}
  task = label_key.removeprefix('labels/')
  if task in examples['zero_shot_tasks']:
    out['class_names'] = list(examples['zero_shot_tasks'][task][0])
  return out


def _tfds_class_names(name: str, label_key: str, data_dir: str) -> list[str]:
  """The names of a TFDS ClassLabel feature (nested keys with '/')."""
  import tensorflow_datasets as tfds  # only tfds: sources get here
  feature = tfds.builder(name, data_dir=data_dir or None).info.features
  for part in label_key.split('/'):
    feature = feature[part]
  names = list(getattr(feature, 'names', None) or [])
  if not names:
    raise ValueError(f'{name}: feature {label_key!r} is not a ClassLabel')
  if len(set(names)) != len(names):
    raise ValueError(f'{name}: label names of {label_key!r} are not unique')
  return names
