"""Ingest as an Apache Beam pipeline: `python -m vlrep.data.ingest ... --runner=DirectRunner`.

The same decode-validate-encode as the local ingest (`ingest._process`), distributed by
Beam's runner (DirectRunner, DataflowRunner, FlinkRunner, SparkRunner with their usual
pipeline options), and the same output, byte for byte: each valid record is keyed by the
shard the local ingest would put it in, which depends on its rank among the valid records
in input order. Ranks come from counting the valid records of each block of input positions
(a block: 1,000 CSV rows or folder files, or 1,000 members of one tar shard), prefix sums
over the blocks as a side input, and a sort within each block. Each shard's records are then
grouped, sorted by rank, written to a local temporary ArrayRecord file and copied to the
output (local or gs://; array_record's own Beam sink writes only to local disks). Counts
(records, captions, skips and dropped captions by reason) are Beam counters, read back into
the manifest. Tar shards are opened by the workers (on a bucket too); CSV rows and folder
files are listed by the launching process, as the local ingest lists them.

Beam is an optional dependency (`pip install '.[beam]'`): it pins pillow < 13 and
protobuf < 7, so it lives in its own environment rather than the test one.
"""

from __future__ import annotations

import collections
import os
import tempfile
from typing import Any, Iterable, Iterator, Sequence

from array_record.python import array_record_module

from vlrep.data import ingest, ingest_inputs, ingest_output
from vlrep.runtime import paths

NAMESPACE = 'vlrep.ingest'
BLOCK = 1000  # input positions per rank block


def _counter(name: str):
  import apache_beam as beam  # pylint: disable=g-import-not-at-top
  return beam.metrics.Metrics.counter(NAMESPACE, name)


def _tar_samples(item: tuple[int, str], max_image_bytes: int) -> Iterator[tuple[tuple, Any]]:
  """((shard index, member index), sample) of one tar shard, read by a worker."""
  index, path = item
  skipped = collections.Counter()
  for position, sample in enumerate(ingest_inputs.tar_file_samples(path, skipped,
                                                                   max_image_bytes)):
    yield (index, position), sample
  for reason, count in skipped.items():
    _counter(f'skipped/{reason}').inc(count)


def _validate(item: tuple[tuple, Any], options: ingest._Options) -> Iterator[tuple[tuple, bytes]]:
  """(position, record) of a valid sample; a skipped one only counts its reason."""
  position, sample = item
  (record, reason, captions, dropped), = ingest._process_chunk([sample], options)  # pylint: disable=protected-access
  if record is None:
    _counter(f'skipped/{reason}').inc()
    return
  _counter('records').inc()
  _counter('captions').inc(captions)
  for why, count in dropped.items():
    _counter(f'dropped/{why}').inc(count)
  yield position, record


def _block(position: tuple) -> tuple:
  return (*position[:-1], position[-1] // BLOCK)


def _offsets(counts: Sequence[tuple[tuple, int]]) -> dict[tuple, int]:
  """{block: valid records in all earlier blocks}, plus {(): the total}."""
  out, total = {}, 0
  for block, count in sorted(counts):
    out[block], total = total, total + count
  out[()] = total
  return out


def shard_count(total: int, num_shards: int | None) -> int:
  """How many shards `ingest_output.ShardWriter` writes for `total` records."""
  return min(num_shards, total) if num_shards else -(-total // ingest_output.RECORDS_PER_SHARD)


def _shard_of(rank: int, num_shards: int | None) -> int:
  return rank % num_shards if num_shards else rank // ingest_output.RECORDS_PER_SHARD


def _ranked(item: tuple[tuple, Iterable], offsets: dict[tuple, int],
            num_shards: int | None) -> Iterator[tuple[int, tuple[int, bytes]]]:
  block, records = item
  for within, (_, record) in enumerate(sorted(records, key=lambda r: r[0])):
    rank = offsets[block] + within
    yield _shard_of(rank, num_shards), (rank, record)


def _write_shard(item: tuple[int, Iterable], output_dir: str, offsets: dict[tuple, int],
                 num_shards: int | None) -> str:
  shard, records = item
  name = f'data-{shard:05d}-of-{shard_count(offsets[()], num_shards):05d}.array_record'
  with tempfile.TemporaryDirectory(prefix='vlrep-beam-shard-') as folder:
    local = os.path.join(folder, name)
    # group_size:1, as the local ingest: every record its own chunk (random access).
    writer = array_record_module.ArrayRecordWriter(local, 'group_size:1')
    for _, record in sorted(records, key=lambda r: r[0]):
      writer.write(record)
    writer.close()
    paths.upload(local, paths.join(output_dir, name))
  return name


def ingest_beam(input_path: str, output_dir: str, *, pipeline_args: Sequence[str],
                num_shards: int | None = None, max_pixels: int = ingest.DEFAULT_MAX_PIXELS,
                max_side: int = 0, max_image_bytes: int = ingest.DEFAULT_MAX_IMAGE_BYTES,
                overwrite: bool = False) -> dict[str, Any]:
  """`ingest.ingest` as a Beam pipeline run with `pipeline_args` (e.g. --runner=...)."""
  import apache_beam as beam  # pylint: disable=g-import-not-at-top
  from apache_beam.metrics.metric import MetricsFilter  # pylint: disable=g-import-not-at-top
  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=g-import-not-at-top

  if num_shards is not None and num_shards < 1:
    raise ValueError(f'num_shards must be positive, not {num_shards}')
  fmt = ingest_inputs.detect_format(input_path)
  listed = collections.Counter()  # skips found while listing the input, before the pipeline
  options = ingest._Options(int(max_pixels), int(max_side), int(max_image_bytes))  # pylint: disable=protected-access
  output_dir = paths.check(output_dir)
  if fmt == 'tar':
    shards = list(enumerate(ingest_inputs.tar_paths(input_path)))
  else:
    samples = list(ingest_inputs.read_samples(input_path, fmt, listed, max_image_bytes))
  ingest_output.prepare_output(output_dir, overwrite)

  pipeline = beam.Pipeline(options=PipelineOptions(list(pipeline_args)))
  if fmt == 'tar':
    keyed = (pipeline | 'shards' >> beam.Create(shards)
             | 'read tars' >> beam.FlatMap(_tar_samples, int(max_image_bytes)))
  else:
    keyed = pipeline | 'samples' >> beam.Create([((i,), s) for i, s in enumerate(samples)])
  valid = (keyed | 'spread' >> beam.Reshuffle()
           | 'validate' >> beam.FlatMap(_validate, options))
  offsets = beam.pvalue.AsSingleton(
      valid | 'block' >> beam.Map(lambda kv: (_block(kv[0]), 1))
      | 'count' >> beam.CombinePerKey(sum)
      | 'all counts' >> beam.combiners.ToList() | 'offsets' >> beam.Map(_offsets))
  _ = (valid | 'by block' >> beam.Map(lambda kv: (_block(kv[0]), kv))
       | 'group blocks' >> beam.GroupByKey()
       | 'rank' >> beam.FlatMap(_ranked, offsets, num_shards)
       | 'group shards' >> beam.GroupByKey()
       | 'write' >> beam.Map(_write_shard, output_dir, offsets, num_shards))
  result = pipeline.run()
  result.wait_until_finish()

  counts = collections.Counter(listed)
  dropped = collections.Counter()
  for counter in result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))['counters']:
    name, value = counter.key.metric.name, counter.committed
    if name.startswith('skipped/'):
      counts[name[len('skipped/'):]] += value
    elif name.startswith('dropped/'):
      dropped[name[len('dropped/'):]] += value
    else:
      counts[f'={name}'] += value  # records, captions
  records, captions = counts.pop('=records', 0), counts.pop('=captions', 0)
  if not records:
    raise ingest.NoValidRecordsError(
        f'no valid image-caption pairs in {input_path}; skipped {sum(counts.values())}: '
        f'{ingest_output.format_counts(counts) or "nothing"}')
  total = shard_count(records, num_shards)
  manifest = {'source': input_path, 'format': fmt, 'records': records, 'captions': captions,
              'skipped': dict(sorted((k, v) for k, v in counts.items() if v)),
              'dropped_captions': dict(sorted((k, v) for k, v in dropped.items() if v)),
              'shards': [f'data-{i:05d}-of-{total:05d}.array_record' for i in range(total)],
              'created_with': 'vlrep.data.ingest'}
  ingest_output.write_manifest(output_dir, manifest)
  return manifest
