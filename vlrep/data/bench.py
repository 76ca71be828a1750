"""`python -m vlrep.data.bench --source=SPEC`: how many examples/s the training pipeline makes.

Builds `pipeline.train_dataset` from a config (default `configs/coca.py:tiny`) with the flags'
overrides, discards a first batch (start-up, worker spawn), then times `--batches` batches.
The last line printed is one JSON object (`examples_per_s`, `batches_per_s`, the settings),
to compare with the train step's consumption (`train/examples_per_s`). `--write_records=DIR`
first writes `--records` synthetic examples as JPEG ArrayRecords there, a stand-in for
ingested data: `--source=arrayrecord:DIR`.
"""

from __future__ import annotations

import io
import json
import time
from typing import Iterable

from absl import app, flags
from ml_collections import config_flags
from PIL import Image

from vlrep.data import pipeline, records
from vlrep.data.synthetic import SyntheticShapes
from vlrep.runtime import paths


def write_records(path: str, count: int, image_size: int = 128, corrupt: Iterable[int] = (),
                  captions_per_image: int = 2, quality: int = 90) -> str:
  """Writes `count` synthetic JPEG records to the ArrayRecord file `path`; returns it.

  Record i shows synthetic training example i with captions ['<caption>', '<caption> #1',
  ...]; records whose index is in `corrupt` hold garbage instead (for skip tests).
  """
  from array_record.python.array_record_module import ArrayRecordWriter
  corrupt = set(corrupt)
  source = SyntheticShapes('train', image_size)
  # group_size:1 makes a random read decompress one record, not a block of them.
  writer = ArrayRecordWriter(path, 'group_size:1')
  try:
    for i in range(count):
      if i in corrupt:
        writer.write(records.encode(f'{i}', b'not an image', ['broken']))
        continue
      example = source[i]
      buffer = io.BytesIO()
      Image.fromarray(example['image']).save(buffer, format='JPEG', quality=quality)
      captions = [example['caption']] + [f'{example["caption"]} #{k}'
                                         for k in range(1, captions_per_image)]
      writer.write(records.encode(f'{i}', buffer.getvalue(), captions))
  finally:
    writer.close()
  return path


def measure(config, batches: int) -> dict[str, float]:
  """Examples/s of this process's pipeline over `batches` batches after a warm-up batch."""
  iterator = iter(pipeline.train_dataset(config, 0, 1))
  next(iterator)
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  seconds = time.perf_counter() - start
  if hasattr(iterator, 'close'):
    iterator.close()  # stops mp_prefetch's worker processes
  return {'examples_per_s': batches * config.batch_size / seconds,
          'batches_per_s': batches / seconds, 'seconds': seconds}


def write_records_to(folder: str, count: int, image_size: int) -> str:
  """`--write_records`: `count` records in FOLDER/bench-00000.array_record (local or gs://);
  returns the file's path."""
  paths.makedirs(folder)
  path = paths.join(folder, 'bench-00000.array_record')
  # ArrayRecordWriter writes local files only: a gs:// file is uploaded once written.
  with paths.writing_locally(path) as local_path:
    write_records(local_path, count, image_size)
  return path


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if f.write_records:
    path = write_records_to(f.write_records, f.records, f.record_image_size)
    print(f'wrote {f.records} records to {path}', flush=True)
  config = f.config
  with config.unlocked():
    config.data.train = f.source
    for field, value in (('image_size', f.image_size), ('augment', f.augment),
                         ('worker_threads', f.worker_threads), ('workers', f.workers)):
      if value is not None:
        config.data[field] = value
    if f.batch_size:
      config.batch_size = f.batch_size
  result = measure(config, f.batches)
  result.update(source=f.source, image_size=config.data.image_size,
                batch_size=config.batch_size, augment=config.data.augment,
                batches=f.batches, cpus=pipeline.host_cores())
  # The values used: data.worker_threads / data.workers 0 are chosen from the host's cores.
  result['worker_threads'], result['workers'] = pipeline.input_workers(config.data)
  result['auto'] = [name for name in ('worker_threads', 'workers') if not config.data[name]]
  print(json.dumps(result, sort_keys=True), flush=True)


if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', 'configs/coca.py:tiny',
                                  'Config whose data section is measured.')
  flags.DEFINE_string('source', 'synthetic', 'data.train source string.')
  flags.DEFINE_integer('image_size', None, 'data.image_size (default: the config\'s).')
  flags.DEFINE_integer('batch_size', None, 'Global batch size (default: the config\'s).')
  flags.DEFINE_integer('batches', 20, 'Batches timed after one warm-up batch.')
  flags.DEFINE_string('augment', None, 'data.augment (default: the config\'s).')
  flags.DEFINE_integer('worker_threads', None, 'data.worker_threads (default: the config\'s).')
  flags.DEFINE_integer('workers', None, 'data.workers: grain worker processes, 0 = none.')
  flags.DEFINE_string('write_records', '', 'First write synthetic JPEG ArrayRecords here.')
  flags.DEFINE_integer('records', 2000, 'How many records --write_records writes.')
  flags.DEFINE_integer('record_image_size', 128, 'Side of the images --write_records writes.')
  app.run(main)
