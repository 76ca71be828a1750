"""Mesh axes that span processes: launch/local.sh, 2 processes x 4 devices, with `tensor=8`
across both, and with `data=2, fsdp=4` whose fsdp axis crosses them (`mesh.dcn_fsdp=2`).
Each process must read the rows of the global batch its devices hold (all of them, or two
separate quarters); losses and gradient norms equal the one-process run's. The launched run's
workdir is a bucket (a GCS server on loopback, tests/gcs_server.py): with fsdp across the
processes, or tensor across them, each writes its own shards of the one checkpoint there,
which restores whole in one process."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import vlrep
from conftest import REPO, assert_same_params, load_config, override_flags, shrink
from vlrep import train
from vlrep.runtime import paths


def _config(**mesh):
  config = shrink(load_config('coca'))
  config.batch_size, config.total_steps, config.log_every_steps = 16, 2, 1
  config.eval_every_steps = 0
  config.mesh.update(**{'data': 1, 'fsdp': 1, 'tensor': 1, **mesh})
  return config


def _metrics(workdir):
  records = [json.loads(line) for line in paths.read_text(paths.join(workdir, 'metrics.jsonl'))
             .splitlines() if line]
  return {r['step']: (r['train/loss'], r['train/grad_norm']) for r in records
          if 'train/loss' in r}


@pytest.mark.parametrize('mesh, spanning', [
    ({'tensor': 8}, {}),  # each process reads every row of the batch
    ({'data': 2, 'fsdp': 4}, {'mesh.dcn_fsdp': 2}),  # each reads its two quarters
])
def test_axes_spanning_processes_train_like_one_process(mesh, spanning, tmp_path, bucket):
  config = _config(**mesh)
  train.train_and_evaluate(config, str(tmp_path / 'one'))
  expected = _metrics(str(tmp_path / 'one'))
  workdir = f'{bucket}/two'
  command = ['bash', os.path.join(REPO, 'launch', 'local.sh'), '--processes=2',
             '--devices_per_process=4', '--', '--config=configs/coca.py:tiny',
             f'--workdir={workdir}', *override_flags(config, **spanning)]
  result = subprocess.run(command, cwd=REPO, env=dict(os.environ, PYTHON=sys.executable),
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
  launched = _metrics(workdir)
  np.testing.assert_allclose([launched[s] for s in (1, 2)], [expected[s] for s in (1, 2)],
                             rtol=2e-4)
  # One checkpoint holding each process's shards (Orbax's per-process OCDBT stores), which
  # restores whole on this one process, with the parameters of the one-process run.
  params = f'{workdir}/checkpoints/2/params'
  assert {'ocdbt.process_0', 'ocdbt.process_1'} <= set(paths.listdir(params)), paths.listdir(params)
  assert_same_params(vlrep.load(workdir).params, vlrep.load(str(tmp_path / 'one')).params,
                     atol=0.1 * config.optim.learning_rate)
