"""`python -m vlrep.plan`: the train step compiled for a TPU slice and for GPU hosts on this CPU.

Compile-only devices from libtpu and the CUDA plugin (test extras); the shrunk tiny config
compiles in seconds. The collective counts are those of the fixed config below on a v5e 2x2
slice; a change in how gradients are reduced shows up in them."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, load_config, override_flags
from vlrep import train
from vlrep.config import set_fields
from vlrep.tools import flops, plan

FIELDS = ('target', 'device_kind', 'device_count', 'mesh', 'param_bytes', 'opt_state_bytes',
          'argument_bytes', 'temp_bytes', 'peak_bytes', 'device_memory_bytes', 'fits',
          'model_flops_per_step', 'xla_flops_per_step', 'estimated_step_s', 'estimated_mfu',
          'estimated_examples_per_s', 'collectives', 'replicated', 'compile_s')


@pytest.fixture
def small(config):
  config.eval_every_steps = 0
  config.loss.caption_chunk = 4
  return config


def _param_count(config):
  config = config.copy_and_resolve_references()
  config.mesh.update(data=-1, fsdp=1, tensor=1, dcn_data=1)
  setup = train.setup_step(config, jax.devices()[:1])
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(setup.abstract_state.params))


def test_tpu_plan_of_the_train_step(small):
  small.mesh.update(data=1, fsdp=4)
  result = plan.plan(small, 'tpu:v5e:2x2')
  assert set(FIELDS) <= set(result)
  assert (result['device_kind'], result['device_count']) == ('TPU v5 lite', 4)
  assert result['mesh'] == {'data': 1, 'fsdp': 4, 'tensor': 1}
  assert result['device_memory_bytes'] == 16 << 30 and result['fits'] is True
  # float32 parameters: fsdp=4 splits the `embed` dimensions, biases and norms stay whole.
  total = 4 * _param_count(small)
  assert total / 4 < result['param_bytes'] < total
  assert result['argument_bytes'] >= result['param_bytes'] + result['opt_state_bytes']
  assert result['peak_bytes'] >= result['argument_bytes']
  assert result['model_flops_per_step'] == flops.train_flops_per_step(small)['total']
  # XLA's count: the model's matmuls plus what the analytic count leaves out (element-wise
  # work, full causal attention), so above it but of the same order.
  assert 1 < result['xla_flops_per_step'] / result['model_flops_per_step'] < 3
  assert result['estimated_step_s'] > 0
  assert result['estimated_examples_per_s'] == pytest.approx(
      small.batch_size / result['estimated_step_s'], rel=1e-3)
  assert result['estimated_mfu'] == pytest.approx(
      result['model_flops_per_step'] / result['estimated_step_s'] / (4 * 197e12), rel=1e-2)
  collectives = result['collectives']
  # FSDP: the parameters are gathered for use, the gradients reduced, each once per step:
  # none in a loop, the fused caption loss's output head included (it takes its gradient
  # slice by slice, per batch shard, and reduces it after the slices).
  assert collectives['all-gather']['count'] > 0
  assert collectives['all-reduce']['count'] > 0 and collectives['all-reduce']['in_loop'] == 0
  assert result['replicated'] == []


def test_microbatched_step_reduces_gradients_once(small):
  """Item 7: with microbatches=2 (GradCache) the gradients are summed per `data` shard over
  the microbatches and all-reduced once after them: no reduction runs in the scan. (Over
  `fsdp` they are reduce-scattered per microbatch, as FSDP must to keep its accumulator
  sharded; README, Pod planning.)"""
  small.mesh.update(data=4, fsdp=1)
  small.microbatches = 2
  reduce = plan.plan(small, 'tpu:v5e:2x2')['collectives']['all-reduce']
  assert reduce['count'] > 0 and reduce['in_loop'] == 0


def test_gpu_plan_gives_memory_and_no_xla_estimate():
  # Tiny with one layer per stack: XLA's GPU matmul tiling fails on the shrunk config's
  # few-row, 32-wide weight-gradient dots ("Couldn't find output tile sizes").
  small = load_config('coca')
  small.eval_every_steps, small.loss.caption_chunk, small.batch_size = 0, 0, 32
  small.data.image_size = 32
  small.model.vision.update(layers=1, stem_channels=(), patch_size=8)
  small.model.text.update(unimodal_layers=1, multimodal_layers=1)
  small.mesh.update(data=-1, dcn_data=2)
  result = plan.plan(small, 'gpu:h100:2x2')
  assert (result['device_kind'], result['device_count']) == ('NVIDIA H100 80GB HBM3', 4)
  assert result['device_memory_bytes'] == 84_942_979_072 and result['fits'] is True
  # Data parallel: every device holds all the (float32) parameters.
  assert result['param_bytes'] == 4 * _param_count(small)
  assert result['peak_bytes'] >= result['argument_bytes'] > result['param_bytes']
  assert result['estimated_step_s'] is None and result['estimated_mfu'] is None
  assert result['collectives']['all-reduce']['count'] > 0  # data-parallel gradients


@pytest.mark.parametrize('target, overrides, message', [
    ('tpu:v5e:2x2', {'mesh.data': 3}, 'has 3 devices, but 4'),
    ('tpu:v5e:2x2', {'batch_size': 6}, 'batch_size 6 does not divide'),
    ('tpu:v9:2x2', {}, "TPU version 'v9'"),
    ('gpu:h200:1x2', {'mesh.dcn_data': 2}, 'the devices are 1 processes'),
])
def test_impossible_target_fails_before_compiling(small, target, overrides, message):
  set_fields(small, overrides)
  with pytest.raises(plan.PlanError, match=message):
    plan.plan(small, target)


def test_plan_errors_are_one_line_from_the_command_line(small):
  result = subprocess.run(
      [sys.executable, '-m', 'vlrep.plan', '--config=configs/coca.py:tiny', '--target=tpu:v5e:2x2',
       *override_flags(small, batch_size=6)], cwd=REPO, capture_output=True, text=True,
      timeout=120, env=dict(os.environ, PYTHONPATH=REPO))
  assert result.returncode == 1, result.stderr[-2000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith('vlrep.plan: error:')]
  assert len(errors) == 1 and 'batch_size 6 does not divide' in errors[0], result.stderr[-2000:]
  assert 'Traceback' not in result.stderr


def test_collectives_counts_async_pairs_once_and_loop_bodies():
  hlo = '\n'.join([
      'HloModule m',
      '%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {',
      '  %ar = f32[8]{0} all-reduce(f32[8]{0} %x), to_apply=%add',
      '}',
      'ENTRY %main (a: f32[16]) -> f32[16] {',
      '  %ags = (f32[4]{0}, f32[16]{0}) all-gather-start(f32[4]{0} %a), dimensions={0}',
      '  %agd = f32[16]{0} all-gather-done(%ags)',
      '  %w = (s32[], f32[8]) while(%t), condition=%cond, body=%body',
      '  ROOT %rs = bf16[4]{0} reduce-scatter(bf16[16]{0} %b), dimensions={0}',
      '}'])
  found, loops = plan.collectives(hlo)
  assert loops == 1
  assert found == {'all-reduce': {'count': 1, 'bytes': 32, 'in_loop': 1},
                   'all-gather': {'count': 1, 'bytes': 64, 'in_loop': 0},
                   'reduce-scatter': {'count': 1, 'bytes': 8, 'in_loop': 0}}


def test_chip_table():
  assert plan.chip_memory_bytes('TPU v5 lite') == 16 << 30
  assert plan.chip_memory_bytes('TPU v5') == 95 << 30
  assert plan.chip_memory_bytes('NVIDIA H200 141GB HBM3e') == 151_397_597_184
  assert plan.chip_memory_bytes('cpu') is None
