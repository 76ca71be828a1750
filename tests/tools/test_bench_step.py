"""`python -m vlrep.bench`: the JSON line it prints, and the peak-FLOP/s table.

(Not tests/tools/test_bench.py: pytest, without package __init__ files, needs test basenames unique
and tests/data/test_bench.py covers `vlrep.data.bench`.)"""

import json
import os
import subprocess
import sys

import pytest

from conftest import COMPILE_FLAGS, REPO, override_flags
from vlrep.tools import bench, flops

KEYS = ('compile_s', 'step_s', 'examples_per_s', 'model_flops_per_step', 'achieved_tflops',
        'peak_tflops', 'mfu', 'peak_memory_bytes', 'device_kind', 'device_count')


def test_bench_prints_one_json_line_with_every_figure(config):
  proc = subprocess.run(
      [sys.executable, '-m', 'vlrep.bench', '--config=configs/coca.py:tiny', '--steps=2',
       *override_flags(config)],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      # One CPU device (not conftest's eight) and conftest's compile flags: the same step,
      # compiled in less time.
      env=dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO,
               XLA_FLAGS=COMPILE_FLAGS))
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert set(KEYS) <= set(result)
  assert result['device_kind'] == 'cpu' and result['device_count'] == 1
  assert result['peak_memory_bytes'] is None  # XLA:CPU reports no allocator statistics
  assert result['model_flops_per_step'] == flops.train_flops_per_step(config)['total']
  assert result['compile_s'] > 0 and result['step_s'] > 0 and result['peak_tflops'] > 0
  assert result['examples_per_s'] == pytest.approx(config.batch_size / result['step_s'], rel=1e-3)
  assert result['achieved_tflops'] == pytest.approx(
      result['model_flops_per_step'] / result['step_s'] / 1e12, rel=1e-2)
  assert result['mfu'] == pytest.approx(result['achieved_tflops'] / result['peak_tflops'],
                                        rel=1e-2)


@pytest.mark.parametrize('kind, peak', [('TPU v4', 275.0), ('TPU v5 lite', 197.0),
                                        ('TPU v5', 459.0), ('TPU v5p', 459.0),
                                        ('TPU v6 lite', 918.0), ('NVIDIA H200', 989.0),
                                        ('NVIDIA H100 80GB HBM3', 989.0),
                                        ('NVIDIA A100-SXM4-40GB', 312.0), ('cpu', None)])
def test_peak_table(kind, peak):
  assert bench.table_peak_tflops(kind) == peak
