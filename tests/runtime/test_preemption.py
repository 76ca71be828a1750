"""A preemption notice (SIGTERM) stops `vlrep.train` after the current step with a checkpoint
and exit status 0; the same command then resumes from that step."""

import json
import os
import signal
import subprocess
import sys
import time

from conftest import REPO, override_flags, shrink, load_config


def _train(workdir, total_steps):
  flags = override_flags(shrink(load_config('coca')), total_steps=total_steps,
                         log_every_steps=1, checkpoint_every_steps=1000, eval_every_steps=0)
  return subprocess.Popen([sys.executable, '-m', 'vlrep.train', '--config=configs/coca.py:tiny',
                           f'--workdir={workdir}', *flags], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _logged_steps(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  return [json.loads(line)['step'] for line in open(path) if line.strip()]


def test_sigterm_checkpoints_the_current_step_and_exits_cleanly(tmp_path):
  workdir = str(tmp_path / 'run')
  process = _train(workdir, total_steps=100_000)
  deadline = time.time() + 240
  while len(_logged_steps(workdir)) < 2:  # compiled and training
    assert process.poll() is None, process.stdout.read()[-3000:]
    assert time.time() < deadline, 'training did not start'
    time.sleep(0.5)
  process.send_signal(signal.SIGTERM)
  output, _ = process.communicate(timeout=120)
  assert process.returncode == 0, output[-3000:]
  assert 'stopped at step' in output
  checkpoints = sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')))
  stopped = _logged_steps(workdir)[-1]
  assert checkpoints == [stopped]  # only the preemption checkpoint (no periodic one yet)

  # The same command, with a nearer end, resumes at the checkpoint.
  resumed = _train(workdir, total_steps=stopped + 2)
  output, _ = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, output[-3000:]
  assert f'at step {stopped}' in output
  assert _logged_steps(workdir)[-2:] == [stopped + 1, stopped + 2]
