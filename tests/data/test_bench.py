"""The data benchmark: measures a pipeline, and its command line ends with one JSON line."""

import json
import os
import subprocess
import sys

from conftest import REPO, load_config
from vlrep.data import bench, pipeline
from vlrep.runtime import paths


def test_measure_reports_a_rate(config):
  result = bench.measure(config, batches=2)
  assert result['examples_per_s'] > 0 and result['batches_per_s'] > 0


def test_command_line_writes_records_and_prints_json_last(tmp_path):
  records = os.path.join(tmp_path, 'records')
  out = subprocess.run(
      [sys.executable, '-m', 'vlrep.data.bench', f'--source=arrayrecord:{records}',
       f'--write_records={records}', '--records=20', '--record_image_size=24',
       '--image_size=16', '--batch_size=8', '--batches=2', '--augment=random_resized_crop'],
      cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result['examples_per_s'] > 0 and result['batch_size'] == 8
  assert result['source'] == f'arrayrecord:{records}'
  # data.worker_threads / data.workers are 0 (auto) in the tiny config: the choice is printed.
  assert result['auto'] == ['worker_threads', 'workers']
  assert (result['worker_threads'], result['workers']) == pipeline.input_workers(
      load_config('coca').data, result['cpus'])


def test_records_written_to_a_bucket_are_read_back_by_the_pipeline(bucket):
  """`--write_records=gs://...`: the file lands in the bucket (never a local 'gs:' folder) and
  `arrayrecord:gs://...` reads it."""
  folder = f'{bucket}/records'
  path = bench.write_records_to(folder, 5, image_size=24)
  assert path == f'{folder}/bench-00000.array_record'
  assert paths.listdir(folder) == ['bench-00000.array_record']
  assert not os.path.exists('gs:')
  assert len(pipeline.source_from_config(load_config('coca'), f'arrayrecord:{folder}')) == 5
