"""The training log's speed figures: `train/data_wait_fraction`, `train/mfu`, and
`config.profile_steps` writing a jax.profiler trace into the workdir."""

import glob
import json
import os
import time

import pytest

from vlrep import train
from vlrep.data import pipeline
from vlrep.tools import flops


def _records(workdir):
  lines = open(os.path.join(workdir, 'metrics.jsonl'))
  return [r for r in map(json.loads, lines) if 'train/loss' in r]


def _run(config, workdir):
  config.eval_every_steps = 0
  config.total_steps, config.log_every_steps, config.checkpoint_every_steps = 6, 3, 6
  train.train_and_evaluate(config, workdir)
  return _records(workdir)[-1]  # steps 4-6: compilation is behind it


def test_input_wait_near_zero_with_synthetic_data_and_profile_written(config, tmp_path):
  config.profile_steps = '4:2'
  last = _run(config, str(tmp_path))
  assert last['step'] == 6 and 0 <= last['train/data_wait_fraction'] < 0.3
  assert 'train/mfu' not in last  # CPU: no chip peak in the table
  traces = glob.glob(str(tmp_path / 'profile' / 'plugins' / 'profile' / '*' / '*.xplane.pb'))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0


def test_input_wait_near_one_with_a_slow_source(config, tmp_path, monkeypatch):
  real = pipeline.train_dataset

  def slow(*args, **kwargs):
    return real(*args, **kwargs).map(lambda batch: time.sleep(1.0) or batch)
  monkeypatch.setattr(pipeline, 'train_dataset', slow)
  last = _run(config, str(tmp_path))
  assert last['train/data_wait_fraction'] > 0.7


@pytest.mark.parametrize('spec', ['4', '0:2', '3:0', 'a:b'])
def test_bad_profile_steps_fail_before_anything_runs(config, spec):
  config.profile_steps = spec
  with pytest.raises(train.ConfigError, match='profile_steps'):
    train.setup_step(config)


def test_mfu_from_the_chip_table():
  assert flops.table_peak_tflops('TPU v5 lite') == 197.0
  assert flops.table_peak_tflops('cpu') is None
