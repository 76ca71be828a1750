"""launch/local.sh: 2 processes x 4 devices train like 1 process x 8, and resume on 1 process.

The multi-process run is real: two `python -m vlrep.train` processes joined over loopback
by `jax.distributed` (gloo CPU collectives), each reading its half of every global batch,
writing one shared checkpoint and evaluating together.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, load_config, override_flags, shrink
from vlrep import train

OVERRIDES = {'batch_size': 16, 'total_steps': 4, 'log_every_steps': 1,
             'checkpoint_every_steps': 2, 'eval_every_steps': 2, 'data.eval_examples': 16,
             'eval_batch_size': 8}


def _config():
  config = shrink(load_config('coca'))
  for field, value in OVERRIDES.items():
    target, *rest = field.split('.')
    if rest:
      config[target][rest[0]] = value
    else:
      config[target] = value
  return config


def _records(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]


def _losses(records):
  return {r['step']: r['train/loss'] for r in records if 'train/loss' in r}


@pytest.fixture(scope='module')
def single_process(tmp_path_factory):
  """The reference: one process with all 8 devices, 4 steps, evaluated at steps 2 and 4."""
  config = _config()
  workdir = str(tmp_path_factory.mktemp('single'))
  train.train_and_evaluate(config, workdir)
  return config, _records(workdir)


def test_two_processes_train_like_one_and_resume_on_one(single_process, tmp_path):
  config, reference = single_process
  workdir = str(tmp_path / 'run')
  command = ['bash', os.path.join(REPO, 'launch', 'local.sh'), '--processes=2',
             '--devices_per_process=4', '--', '--config=configs/coca.py:tiny',
             f'--workdir={workdir}', *override_flags(config, total_steps=2)]
  env = dict(os.environ, PYTHON=sys.executable)
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
  output = result.stdout + result.stderr
  assert result.returncode == 0, output[-4000:]
  assert '[p0]' in output and '[p1]' in output

  # Same losses as the single process, from each process's half of every batch.
  launched = _records(workdir)
  expected = _losses(reference)
  np.testing.assert_allclose([_losses(launched)[s] for s in (1, 2)], [expected[1], expected[2]],
                             rtol=2e-4)
  # Evaluated together: the same numbers as the single process's evaluation at step 2.
  results = json.load(open(os.path.join(workdir, 'results.json')))
  at_step_2 = next(r for r in reference if r['step'] == 2 and 'retrieval/i2t_r@1' in r)
  for key, value in results.items():
    assert value == pytest.approx(at_step_2[key], abs=1e-6), key

  # The checkpoint both processes wrote resumes in one process and continues the same way.
  config = config.copy_and_resolve_references()
  config.eval_every_steps = 0
  train.train_and_evaluate(config, workdir)
  np.testing.assert_allclose([_losses(_records(workdir))[s] for s in (3, 4)],
                             [expected[3], expected[4]], rtol=2e-4)
