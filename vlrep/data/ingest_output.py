"""What an ingest run writes: `DIR/data-XXXXX-of-YYYYY.array_record` and `DIR/manifest.json`.

`ShardWriter` deals records to `num_shards` shards round-robin, or, without a count, to
contiguous runs of `RECORDS_PER_SHARD`; it writes them under temporary names and gives them
their final names, which hold the shard count, once every record is in (or deletes them when
the run fails). `prepare_output` clears a previous run's shards and manifest and nothing
else; `write_manifest` writes the counts. The local ingest (`vlrep.data.ingest`), its video
form (`vlrep.data.ingest_video`) and the Beam pipeline (`vlrep.data.ingest_beam`, which names
and numbers its shards as `ShardWriter` does) all write this layout.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from array_record.python import array_record_module

from vlrep.runtime import paths

RECORDS_PER_SHARD = 10_000
MANIFEST = 'manifest.json'


class ShardWriter:
  """Round-robin over `num_shards` shards, or contiguous RECORDS_PER_SHARD runs if None.

  Shards are written under temporary names, as their final names hold the shard count.
  """

  def __init__(self, directory: str, num_shards: int | None):
    self._directory, self._num_shards, self._writers, self.count = directory, num_shards, [], 0

  def _path(self, index: int) -> str:
    return os.path.join(self._directory, f'.data-{index:05d}.partial')

  def write(self, record: bytes) -> None:
    shard = (self.count % self._num_shards if self._num_shards
             else self.count // RECORDS_PER_SHARD)
    while len(self._writers) <= shard:
      # group_size:1 makes every record its own chunk: random access (grain) reads one record.
      self._writers.append(array_record_module.ArrayRecordWriter(
          self._path(len(self._writers)), 'group_size:1'))
    self._writers[shard].write(record)
    self.count += 1

  def close(self, keep: bool) -> list[str]:
    """The shards' final names if `keep`, else deletes them."""
    names = [f'data-{i:05d}-of-{len(self._writers):05d}.array_record'
             for i in range(len(self._writers))]
    for index, (writer, name) in enumerate(zip(self._writers, names)):
      writer.close()
      if keep:
        os.replace(self._path(index), os.path.join(self._directory, name))
      else:
        os.remove(self._path(index))
    return names


def prepare_output(directory: str, overwrite: bool) -> None:
  """Creates `directory`. One that is not empty raises FileExistsError unless `overwrite`,
  which removes a previous run's shards and manifest (never other files)."""
  paths.makedirs(directory)
  existing = paths.listdir(directory)
  if existing and not overwrite:
    raise FileExistsError(f'{directory} is not empty; pass --overwrite to replace its shards')
  for name in existing:  # only what an ingest run writes: never the user's other files
    if name == MANIFEST or re.fullmatch(r'\.?data-\d+(-of-\d+\.array_record|\.partial)', name):
      paths.remove(paths.join(directory, name))


def write_manifest(directory: str, manifest: dict[str, Any]) -> None:
  """Writes `directory`'s manifest.json (local or on a bucket)."""
  paths.write_text(paths.join(directory, MANIFEST), json.dumps(manifest, indent=2) + '\n')


def format_counts(counts: dict[str, int]) -> str:
  """`reason=count, ...` in name order (skip and drop counts, for messages)."""
  return ', '.join(f'{reason}={count}' for reason, count in sorted(counts.items()))
