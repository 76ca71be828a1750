"""launch/local.sh: 2 processes x 4 devices train like 1 process x 8, and resume on 1 process;
when one process dies, the other stops by itself within a bounded time.

The multi-process run is real: two `python -m vlrep.train` processes joined over loopback
by `jax.distributed` (gloo CPU collectives), each reading its half of every global batch,
writing one shared checkpoint and evaluating together.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import vlrep
from conftest import REPO, assert_same_params, load_config, override_flags, shrink
from vlrep import train
from vlrep.data import pipeline
from vlrep.config import set_fields

# warmup 0: every update, the first included, runs at a non-zero learning rate.
OVERRIDES = {'batch_size': 16, 'total_steps': 2, 'log_every_steps': 1,
             'checkpoint_every_steps': 2, 'eval_every_steps': 2, 'data.eval_examples': 16,
             'eval_batch_size': 8, 'optim.warmup_steps': 0}


def _config():
  config = shrink(load_config('coca'))
  # Beam search only costs compiles here (tests/evals covers it). Entries stay: the launched
  # processes get the config as flags over tiny's, which cannot remove one.
  config.evals.captioning.methods = ('greedy',)
  set_fields(config, OVERRIDES)
  return config


def _records(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]


def _losses(records):
  return {r['step']: r['train/loss'] for r in records if 'train/loss' in r}


@pytest.fixture(scope='module')
def single_process(tmp_path_factory):
  """The reference: one process with all 8 devices trains 2 steps (evaluated at step 2), then
  resumes to step 4. The 2-process run below takes the same path, so that both follow the
  same learning-rate schedule (which depends on total_steps) at every step."""
  config = _config()
  workdir = str(tmp_path_factory.mktemp('single'))
  decoded = pipeline.eval_images_decoded()
  train.train_and_evaluate(config, workdir)
  decoded = pipeline.eval_images_decoded() - decoded  # by the evaluation at step 2
  train.train_and_evaluate(_resumed(config), workdir)
  return config, _records(workdir), workdir, decoded


def _resumed(config):
  config = config.copy_and_resolve_references()
  config.total_steps, config.eval_every_steps = 4, 0
  return config


def test_two_processes_train_like_one_and_resume_on_one(single_process, tmp_path):
  config, reference, single_workdir, single_decoded = single_process
  workdir = str(tmp_path / 'run')
  command = ['bash', os.path.join(REPO, 'launch', 'local.sh'), '--processes=2',
             '--devices_per_process=4', '--', '--config=configs/coca.py:tiny',
             f'--workdir={workdir}', *override_flags(config)]
  env = dict(os.environ, PYTHON=sys.executable)
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
  output = result.stdout + result.stderr
  assert result.returncode == 0, output[-4000:]
  assert '[p0]' in output and '[p1]' in output
  # Each process decoded only its devices' rows of the evaluation images: between them, each
  # image once, as the single process did.
  decoded = {p: [int(n) for n in re.findall(rf'\[{p}\].*this process decoded (\d+) evaluation',
                                               output)] for p in ('p0', 'p1')}
  assert len(decoded['p0']) == len(decoded['p1']) == 1, decoded
  assert decoded['p0'][0] + decoded['p1'][0] == single_decoded, (decoded, single_decoded)
  assert 0 < decoded['p1'][0] < single_decoded

  # Same losses as the single process, from each process's half of every batch, and after
  # two updates the same value of every parameter (not those of two more updates). The
  # tolerance is a tenth of an update: Adam's first updates are +-lr wherever a gradient is
  # well above its epsilon; an attention key's bias, whose true gradient is 0 (softmax is
  # shift-invariant), moves by rounding noise over epsilon alone (measured: 0.052 of lr).
  launched = _records(workdir)
  expected = _losses(reference)
  np.testing.assert_allclose([_losses(launched)[s] for s in (1, 2)], [expected[1], expected[2]],
                             rtol=2e-4)
  want, later = (vlrep.load(single_workdir, step=s).params for s in (2, 4))
  atol = 0.1 * config.optim.learning_rate
  assert_same_params(vlrep.load(workdir).params, want, atol)
  with pytest.raises(AssertionError):
    assert_same_params(later, want, atol)
  # Evaluated together: the same numbers as the single process's evaluation at step 2.
  results = json.load(open(os.path.join(workdir, 'results.json')))
  at_step_2 = next(r for r in reference if r['step'] == 2 and 'retrieval/i2t_r@1' in r)
  for key, value in results.items():
    if key.startswith('linear_probe'):
      continue  # below
    assert value == pytest.approx(at_step_2[key], abs=1e-6), key
  # The probe picks its L2 strength by accuracy on 5 held-out examples of near-random
  # features (2 steps of training): parameters that differ by float rounding (the two
  # processes sum gradients in another order) can flip one held-out prediction and so the
  # chosen strength. Its test accuracy stays within one of the 16 test examples.
  probe = 'linear_probe_shape/accuracy'
  assert results[probe] == pytest.approx(at_step_2[probe], abs=1 / 16 + 1e-6)

  # The checkpoint both processes wrote resumes in one process and continues the same way.
  train.train_and_evaluate(_resumed(config), workdir)
  np.testing.assert_allclose([_losses(_records(workdir))[s] for s in (3, 4)],
                             [expected[3], expected[4]], rtol=2e-4)
  assert_same_params(vlrep.load(workdir).params, later, atol)


def _tails(lines, size=2500):
  """The end of each process's output and of local.sh's: one process's long abort trace
  would hide the other's first error in a plain tail."""
  groups = {'[p0]': [], '[p1]': [], 'local.sh': []}
  for line in lines:
    groups.get(line[:4], groups['local.sh']).append(line)
  return '\n'.join(''.join(group)[-size:] for group in groups.values())


def test_when_one_process_dies_the_other_stops_by_itself(tmp_path):
  """SIGKILL process 1 once both have joined: process 0 must fail on its own (jax's heartbeat
  check), well before local.sh's grace period would kill it."""
  flags = override_flags(_config(), total_steps=100_000, eval_every_steps=0)
  command = ['bash', os.path.join(REPO, 'launch', 'local.sh'), '--processes=2',
             '--devices_per_process=4', '--grace_s=600', '--', '--config=configs/coca.py:tiny',
             f'--workdir={tmp_path}', *flags]
  # 20 s: short enough to see process 0 stop by itself well inside the bound below, long
  # enough that a loaded CI machine's slow compiles do not look like a dead peer.
  env = dict(os.environ, PYTHON=sys.executable, VLREP_HEARTBEAT_TIMEOUT_S='20')
  launcher = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
  lines = []
  reader = threading.Thread(target=lambda: lines.extend(launcher.stdout), daemon=True)
  reader.start()
  try:
    deadline = time.time() + 300
    # Process 1 has joined and built its state: process 0 is past the point of no return.
    while not any(line.startswith('[p1]') and 'model:' in line for line in list(lines)):
      assert launcher.poll() is None and time.time() < deadline, _tails(lines)
      time.sleep(0.2)
    pids = re.search(r'pids (\d+) (\d+)', ''.join(lines)).groups()
    os.kill(int(pids[1]), signal.SIGKILL)
    killed = time.time()
    launcher.wait(timeout=120)
    stopped_after = time.time() - killed
  finally:
    if launcher.poll() is None:
      launcher.kill()
  reader.join(timeout=10)
  output = ''.join(lines)
  assert launcher.returncode == 137, output[-4000:]  # the first failure: the killed process
  assert re.search(r'process 0 exited with status [1-9]', output), output[-4000:]
  assert 'killing the' not in output  # process 0 stopped by itself, not by local.sh
  assert stopped_after < 60, stopped_after


FAKE_TRAINER = r'''#!/usr/bin/env bash
# Stands in for python (--port is given, so it only runs as a trainer): process 1 kills itself, process 0 fails the moment it sees that.
if [[ $VLREP_PROCESS_ID == 1 ]]; then
  echo $$ > "$DIR/p1.pid"
  sleep 0.5
  kill -KILL $$
fi
until [[ -s $DIR/p1.pid ]]; do sleep 0.01; done
while kill -0 "$(cat "$DIR/p1.pid")" 2>/dev/null; do sleep 0.001; done
exit 3
'''


@pytest.mark.parametrize('attempt', range(3))
def test_a_killed_process_is_the_failure_reported_even_when_its_peer_dies_at_once(tmp_path,
                                                                                   attempt):
  """The case the real run above meets: process 1 is SIGKILLed and process 0's next collective
  fails within milliseconds, usually before local.sh's next poll. The kill is the cause, so
  its status (137) is the one to exit with, whichever index the processes have."""
  fake = tmp_path / 'python'
  fake.write_text(FAKE_TRAINER)
  fake.chmod(0o755)
  result = subprocess.run(
      ['bash', os.path.join(REPO, 'launch', 'local.sh'), '--processes=2',
       '--devices_per_process=1', '--port=1', '--'], cwd=REPO, capture_output=True, text=True, timeout=60,
      env=dict(os.environ, PYTHON=str(fake), DIR=str(tmp_path)))
  assert result.returncode == 137, result.stderr
  assert 'process 0 exited with status 3' in result.stderr
  assert 'process 1 exited with status 137' in result.stderr
