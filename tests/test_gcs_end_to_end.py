"""A run on a bucket, end to end, against a GCS server on loopback (tests/gcs_server.py).

Ingest to gs://, train from gs:// data into a gs:// workdir, `kill -9` the run mid-way,
rerun the same command (it resumes bit-exactly: the final parameters equal an uninterrupted
run's), evaluate, `vlrep.load`, export to the bucket and load the export; and two processes
(launch/local.sh) writing one checkpoint sharded between them into the bucket.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

import vlrep
from conftest import REPO, override_flags
from vlrep import evaluate, export, paths, train
from vlrep.data import ingest
from vlrep.data.synthetic import SyntheticShapes


def _pairs_csv(folder, count=40) -> str:
  """`count` synthetic training images as PNG files and a CSV of their captions."""
  source = SyntheticShapes('train', 16)
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, 'pairs.csv'), 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['image', 'caption'])
    for i in range(count):
      example = source[i]
      Image.fromarray(example['image']).save(os.path.join(folder, f'{i}.png'))
      writer.writerow([f'{i}.png', example['caption']])
  return os.path.join(folder, 'pairs.csv')


@pytest.fixture
def gs_data(bucket, tmp_path):
  """Ingested straight to the bucket; the same bytes as a local ingest of the same input."""
  pairs = _pairs_csv(str(tmp_path / 'in'))
  local = str(tmp_path / 'local')
  ingest.ingest(pairs, local, num_shards=2, workers=1)
  manifest = ingest.ingest(pairs, f'{bucket}/data', num_shards=2, workers=1)
  assert sorted(paths.listdir(f'{bucket}/data')) == sorted(os.listdir(local))
  for name in os.listdir(local):
    with paths.open_file(f'{bucket}/data/{name}', 'rb') as f:
      assert f.read() == open(os.path.join(local, name), 'rb').read(), name
  assert manifest['records'] == 40
  return f'{bucket}/data'


def _config(config, data):
  config.data.train = f'arrayrecord:{data}'
  config.evals.retrieval.data = f'arrayrecord:{data}'  # one evaluation reads the bucket
  config.total_steps = 24
  config.log_every_steps = 4
  config.checkpoint_every_steps = 2
  config.eval_every_steps = 24  # only at the end
  return config


def _committed_steps(workdir):
  folder = paths.join(workdir, 'checkpoints')
  return [int(n) for n in paths.listdir(folder)
          if n.isdigit() and paths.exists(paths.join(folder, n, 'commit_success.txt'))]


def _assert_same_params(a, b, exact=True):
  for (name, x), y in zip(export.named_arrays(a).items(), export.named_arrays(b).values()):
    if exact:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)
    else:
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-3, atol=5e-5,
                                 err_msg=name)


def test_train_kill_resume_evaluate_load_export_on_a_bucket(config, gs_data, bucket, tmp_path):
  config = _config(config, gs_data)
  workdir = f'{bucket}/run'
  command = [sys.executable, '-m', 'vlrep.train', '--config=configs/coca.py:tiny',
             f'--workdir={workdir}', *override_flags(config)]
  killed = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while not [s for s in _committed_steps(workdir) if s >= 4]:
    assert killed.poll() is None and time.time() < deadline, killed.stderr.read()[-3000:]
    time.sleep(0.05)
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  at_kill = max(_committed_steps(workdir))
  assert at_kill < config.total_steps, 'the run ended before it could be killed'

  resumed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-4000:]
  assert f'resumed from {workdir}/checkpoints at step' in resumed.stderr
  results = json.loads(paths.read_text(f'{workdir}/results.json'))
  assert 'retrieval/i2t_r@1' in results
  # metrics.jsonl was rewritten, never truncated: the killed run's first log line is kept.
  logged = [json.loads(line) for line in paths.read_text(f'{workdir}/metrics.jsonl').split('\n')
            if line]
  assert logged[0]['step'] == 4 and logged[-1]['step'] == 24
  assert any(name.startswith('events.out.tfevents')
             for name in paths.listdir(f'{workdir}/tensorboard'))

  # Bit-exact: the same parameters as a run that never stopped (same devices and mesh).
  reference = str(tmp_path / 'reference')
  config.eval_every_steps = 0
  train.train_and_evaluate(config, reference)
  model = vlrep.load(workdir)
  _assert_same_params(model.params, vlrep.load(reference).params)

  # Evaluating the saved run on the bucket gives the training run's final results.
  assert evaluate.evaluate(workdir) == pytest.approx(results, abs=1e-6)

  model.save(f'{bucket}/export')
  assert paths.listdir(f'{bucket}/export') == ['config.json', 'params.safetensors']
  _assert_same_params(vlrep.load(f'{bucket}/export').params, model.params)


def test_two_processes_write_one_sharded_checkpoint_to_a_bucket(config, gs_data, bucket,
                                                                tmp_path):
  config = _config(config, gs_data)
  config.total_steps = 2
  config.eval_every_steps = 0
  config.mesh.data, config.mesh.fsdp = 1, -1  # parameters split over both processes
  workdir = f'{bucket}/run'
  command = ['bash', os.path.join(REPO, 'launch', 'local.sh'), '--processes=2',
             '--devices_per_process=4', '--', '--config=configs/coca.py:tiny',
             f'--workdir={workdir}', *override_flags(config)]
  result = subprocess.run(command, cwd=REPO, env=dict(os.environ, PYTHON=sys.executable),
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
  assert _committed_steps(workdir) == [2]
  # The checkpoint holds arrays written by both processes: it restores whole, and equals
  # one process's run of the same config (up to the order of the gradient sums).
  reference = str(tmp_path / 'reference')
  train.train_and_evaluate(config, reference)
  _assert_same_params(vlrep.load(workdir).params, vlrep.load(reference).params, exact=False)
