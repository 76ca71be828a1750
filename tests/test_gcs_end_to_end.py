"""A run on a bucket, end to end, against a GCS server on loopback (tests/gcs_server.py).

Ingest to gs://, train from gs:// data into a gs:// workdir, `kill -9` the run mid-way,
rerun the same command (it resumes bit-exactly: the final parameters equal an uninterrupted
run's), evaluate, `vlrep.load`, export to the bucket and load the export. Two processes
writing one checkpoint sharded between them into a bucket: tests/launch/test_spanning_axes.py.
"""

import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import vlrep
from conftest import REPO, override_flags
from vlrep import train
from vlrep.data import ingest
from vlrep.data.synthetic import SyntheticShapes
from vlrep.evals import evaluate
from vlrep.runtime import paths
from vlrep.weights import export, init_from


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
  config.total_steps = 12
  config.log_every_steps = 4
  config.checkpoint_every_steps = 2
  config.eval_every_steps = 0  # evaluated afterwards, by vlrep.evaluate
  config.keep_checkpoints = 10
  return config


def _retrieval_only(config, data):
  """The run's config with one evaluation, retrieval on the bucket's data."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    retrieval = config.evals.retrieval
    retrieval.data = f'arrayrecord:{data}'
    config.evals = type(config.evals)({'retrieval': retrieval})
  return config


def _committed_steps(workdir):
  folder = paths.join(workdir, 'checkpoints')
  return sorted(int(n) for n in paths.listdir(folder)
          if n.isdigit() and paths.exists(paths.join(folder, n, 'commit_success.txt')))


def _assert_same_params(a, b):
  a, b = export.named_arrays(a), export.named_arrays(b)
  assert list(a) == list(b)
  for (name, x), y in zip(a.items(), b.values()):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)


def test_train_kill_resume_evaluate_load_export_on_a_bucket(config, gs_data, bucket, tmp_path):
  config = _config(config, gs_data)
  workdir = f'{bucket}/run'
  command = [sys.executable, '-m', 'vlrep.train', '--config=configs/coca.py:tiny',
             f'--workdir={workdir}', *override_flags(config)]
  log = tmp_path / 'killed.log'  # a file, not a pipe nobody reads while the run goes on
  with open(log, 'w') as output:
    killed = subprocess.Popen(command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT)
  deadline = time.time() + 300
  while 6 not in _committed_steps(workdir):
    assert killed.poll() is None and time.time() < deadline, log.read_text()[-3000:]
    time.sleep(0.02)
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  assert max(_committed_steps(workdir)) < config.total_steps, 'the run ended before the kill'
  # The reference for bit-exactness is the killed run's own step 6. Its commit marker is then
  # removed: the state a kill during that save leaves on a bucket (a step folder without
  # commit_success.txt), which the rerun must ignore, resume before and write again.
  at_6 = export.host_arrays(vlrep.load(workdir, step=6).params)
  for step in _committed_steps(workdir):
    if step >= 6:
      paths.remove(f'{workdir}/checkpoints/{step}/commit_success.txt')
  assert max(_committed_steps(workdir)) == 4

  train.train_and_evaluate(config, workdir)  # the same command again, in this process
  assert _committed_steps(workdir) == [2, 4, 6, 8, 10, 12]
  _assert_same_params(vlrep.load(workdir, step=6).params, at_6)
  # metrics.jsonl was rewritten, never truncated: the killed run's first log line is kept.
  logged = [json.loads(line) for line in paths.read_text(f'{workdir}/metrics.jsonl').split('\n')
            if line]
  assert logged[0]['step'] == 4 and logged[-1]['step'] == 12
  assert any(name.startswith('events.out.tfevents')
             for name in paths.listdir(f'{workdir}/tensorboard'))

  # vlrep.evaluate on the bucket (its data too) writes results.json there.
  results = evaluate.evaluate(workdir, config=_retrieval_only(evaluate.run_config(workdir),
                                                              gs_data))
  assert json.loads(paths.read_text(f'{workdir}/results.json')) == results
  assert set(results) == {f'retrieval/{d}_r@{k}' for d in ('i2t', 't2i') for k in (1, 5, 10)}

  model = vlrep.load(workdir)
  model.save(f'{bucket}/export')
  assert paths.listdir(f'{bucket}/export') == ['config.json', 'params.safetensors']
  _assert_same_params(vlrep.load(f'{bucket}/export').params, model.params)
  # A new run can start from it: config.init_from's arrays, configs/saved.py's config.
  _assert_same_params(init_from.named_arrays(f'{bucket}/export'), export.host_arrays(model.params))
  saved = importlib.util.spec_from_file_location('saved', os.path.join(REPO, 'configs/saved.py'))
  module = importlib.util.module_from_spec(saved)
  saved.loader.exec_module(module)
  assert (json.loads(module.get_config(f'{bucket}/export').model.to_json())
          == json.loads(model.config.model.to_json()))
