"""grain pipelines: from a source string to this process's slice of every global batch.

Source strings (`config.data.train`, `config.data.eval`): `synthetic[:SPLIT]` (the embedded
data set, `vlrep/data/synthetic.py`); ArrayRecord and TFDS sources plug into `make_source`.
The training stream is the source shuffled with `config.seed` and repeated (reshuffled each
epoch); global batch `b` is elements [b*B, (b+1)*B) of that stream, and process `p` of `P`
reads the contiguous slice p*B/P .. (p+1)*B/P of it. So a batch's content depends on the seed
and the step only, never on the number of processes or devices, and the iterator's state
(saved in every checkpoint) is a position in that stream.
"""

from __future__ import annotations

import sys
from typing import Any

import grain
import ml_collections
import numpy as np

from vlrep.data.synthetic import SyntheticShapes
from vlrep.data.tokenizer import ByteTokenizer, get_tokenizer

SOURCES = ('synthetic[:train|test]',)


def make_source(spec: str, image_size: int) -> Any:
  """A random-access source (len + getitem returning dicts with `image` and `caption`)."""
  name, _, arg = spec.partition(':')
  if name == 'synthetic':
    return SyntheticShapes(arg or 'train', image_size)
  raise ValueError(f'Unknown data source {spec!r}; known: {", ".join(SOURCES)}')


class _ProcessSlice(grain.MapDataset):
  """Element k of this process is element g(k) of the global stream (see module docstring)."""

  def __init__(self, parent: grain.MapDataset, global_batch: int, process_index: int,
               process_count: int):
    super().__init__(parent)
    if global_batch % process_count:
      raise ValueError(f'batch_size {global_batch} does not divide over {process_count} processes')
    self._global_batch, self._process_count = global_batch, process_count
    self._local_batch = global_batch // process_count
    self._offset = process_index * self._local_batch

  def __len__(self) -> int:
    return len(self._parent) // self._process_count

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    batch, within = divmod(index, self._local_batch)
    return self._parent[batch * self._global_batch + self._offset + within]

  def __str__(self) -> str:
    return f'ProcessSlice(offset={self._offset}, local_batch={self._local_batch})'


class _Tokenize(grain.transforms.Map):
  """{image, caption} -> {images: uint8 [H, W, 3], tokens: int32 [L]}."""

  def __init__(self, tokenizer: ByteTokenizer, max_len: int):
    self._tokenizer, self._max_len = tokenizer, max_len

  def map(self, example: dict[str, Any]) -> dict[str, np.ndarray]:
    tokens = self._tokenizer.encode([example['caption']], self._max_len)[0]
    return {'images': example['image'], 'tokens': tokens}


def train_dataset(config: ml_collections.ConfigDict, process_index: int,
                  process_count: int) -> grain.IterDataset:
  """This process's infinite stream of training batches (dicts of numpy arrays)."""
  source = make_source(config.data.train, config.data.image_size)
  stream = grain.MapDataset.source(source).seed(config.seed).shuffle().repeat(None)
  local = _ProcessSlice(stream, config.batch_size, process_index, process_count)
  tokenize = _Tokenize(get_tokenizer(config.data.tokenizer), config.data.max_text_len)
  batches = local.map(tokenize).batch(config.batch_size // process_count, drop_remainder=True)
  # Elements are whole batches here: keep only a couple ahead, so that filling the buffer
  # does not compete with the train step for the CPU.
  threads = int(config.data.worker_threads)
  return batches.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                   prefetch_buffer_size=max(threads, 1) + 1))


def eval_examples(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The first `config.data.eval_examples` of the eval source, in order, as numpy arrays.

  Returns `images` uint8 [N, H, W, 3], `captions` (list of N str), any `labels/*` arrays and
  `zero_shot_tasks` (the source's {task: (class names, templates)}, empty if it has none).
  """
  source = make_source(config.data.eval, config.data.image_size)
  count = min(int(config.data.eval_examples), len(source))
  examples = [source[i] for i in range(count)]
  out: dict[str, Any] = {'images': np.stack([e['image'] for e in examples]),
                         'captions': [e['caption'] for e in examples],
                         'zero_shot_tasks': getattr(source, 'zero_shot_tasks', {})}
  for key in examples[0]:
    if key.startswith('labels/'):
      out[key] = np.stack([e[key] for e in examples])
  return out
