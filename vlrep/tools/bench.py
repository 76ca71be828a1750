"""`python -m vlrep.bench --config=configs/coca.py:small [--steps=N]`: speed of the real train step.

Builds the state and the jitted `train_step` exactly as `vlrep.train` does (same mesh,
shardings, donation), feeds it synthetic batches already on the devices, and prints, as its
last line, one JSON object:

* `compile_s`: lowering + XLA compilation of the step;
* `step_s`: median wall time of a step after two warm-up steps; `examples_per_s`;
* `model_flops_per_step`: analytic model FLOPs (`vlrep.tools.flops`, forward x3) and
  `flops_breakdown`; `achieved_tflops` = model FLOPs / step_s;
* `peak_tflops`: all devices together, from `vlrep.tools.flops.PEAK_TFLOPS` (bf16 dense, per
  chip) for known accelerators, or on CPU the rate of a large float32 matmul measured in this run
  (`peak_source` says which); `mfu` = achieved / peak;
* `peak_memory_bytes`: the devices' peak allocation where the platform reports it (null on
  CPU); `temp_bytes`: XLA's scratch memory of the compiled step per device;
* `device_kind`, `device_count`, `batch_size`, `steps`.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from vlrep import step as step_lib, train
from vlrep.data.tokenizer import PAD_ID
from vlrep.tools import flops as flops_lib
from vlrep.tools.flops import PEAK_TFLOPS, table_peak_tflops  # pylint: disable=unused-import

WARMUP_STEPS = 2


def measure_matmul_tflops(size: int = 2048, repeats: int = 5) -> float:
  """TFLOP/s of a size^3 float32 matmul on the default device (best of `repeats`).

  The best rather than the median: it is the machine's attainable peak, and on a shared
  machine the slower repeats measure the neighbours.
  """
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size ** 3 / best / 1e12


def synthetic_batch(config: ml_collections.ConfigDict, seed: int = 0) -> dict[str, np.ndarray]:
  """Random uint8 images and captions of random length (PAD after them), as the pipeline gives."""
  rng = np.random.default_rng(seed)
  batch, size, length = config.batch_size, config.data.image_size, config.data.max_text_len
  images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
  tokens = rng.integers(PAD_ID + 3, config.model.text.vocab_size, (batch, length), dtype=np.int32)
  lengths = rng.integers(length // 4, length + 1, (batch, 1))
  tokens = np.where(np.arange(length) < lengths, tokens, PAD_ID).astype(np.int32)
  return {'images': images, 'tokens': tokens}


def _peak_memory_bytes(devices: Sequence[jax.Device]) -> int | None:
  peaks = []
  for device in devices:
    stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
    if stats and 'peak_bytes_in_use' in stats:
      peaks.append(int(stats['peak_bytes_in_use']))
  return max(peaks) if peaks else None


@dataclasses.dataclass
class CompiledStep:
  """A compiled train step of one config, its state and its (device-resident) batch."""
  config: ml_collections.ConfigDict
  step: Any
  state: Any
  batch: dict[str, jax.Array]
  compile_s: float
  metrics: Any = None

  def run(self, steps: int) -> list[float]:
    """Runs `steps` steps; returns each one's wall time (synchronised after each)."""
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      self.state, self.metrics = self.step(self.state, self.batch)
      jax.block_until_ready((self.state, self.metrics))
      times.append(time.perf_counter() - start)
    return times


def compile_step(config: ml_collections.ConfigDict) -> CompiledStep:
  """The train step of `vlrep.train` (same state, shardings, donation), compiled for a
  synthetic batch of `config.batch_size` on all devices."""
  setup = train.setup_step(config)
  state, _ = step_lib.create_train_state(setup.model, setup.tx, setup.learning_rate_fn, config,
                                         setup.mesh, jax.random.key(config.seed),
                                         setup.state_shardings)
  batch = jax.device_put(synthetic_batch(config), setup.batch_sharding)
  train_step = setup.train_step
  start = time.perf_counter()
  compiled = train_step.lower(state, batch).compile()
  return CompiledStep(config, compiled, state, batch, time.perf_counter() - start)


def peak_tflops(devices: Sequence[jax.Device]) -> tuple[float | None, str]:
  """(peak TFLOP/s of all `devices` together, where the figure comes from)."""
  if devices[0].platform == 'cpu':
    # Simulated CPU devices share the same cores: the machine's rate is the peak.
    return measure_matmul_tflops(), 'measured float32 matmul'
  per_chip = table_peak_tflops(devices[0].device_kind)
  if per_chip is None:
    return None, 'unknown device'
  return per_chip * len(devices), 'table (bf16 dense)'


def benchmark(config: ml_collections.ConfigDict, steps: int = 10) -> dict[str, Any]:
  """Compiles and times the train step of `config`; returns the figures printed as JSON."""
  if steps < 1:
    raise ValueError(f'--steps must be >= 1, got {steps}')
  compiled = compile_step(config)
  compiled.run(WARMUP_STEPS)
  step_s = statistics.median(compiled.run(steps))
  loss = float(compiled.metrics['train/loss'])
  if not np.isfinite(loss):
    raise FloatingPointError(f'the benchmarked step gave a non-finite loss {loss}')

  devices = jax.devices()  # the mesh spans them all
  peak, peak_source = peak_tflops(devices)
  breakdown = flops_lib.train_flops_per_step(config)
  model_flops = breakdown.pop('total')
  achieved = model_flops / step_s / 1e12
  memory = compiled.step.memory_analysis()
  figures = lambda x: None if x is None else float(f'{x:.4g}')
  return {
      'compile_s': figures(compiled.compile_s), 'step_s': figures(step_s),
      'examples_per_s': figures(config.batch_size / step_s),
      'model_flops_per_step': model_flops, 'achieved_tflops': figures(achieved),
      'peak_tflops': figures(peak), 'mfu': None if peak is None else figures(achieved / peak),
      'peak_memory_bytes': _peak_memory_bytes(devices),
      'temp_bytes': None if memory is None else int(memory.temp_size_in_bytes),
      'device_kind': devices[0].device_kind, 'device_count': len(devices),
      'peak_source': peak_source, 'batch_size': config.batch_size, 'steps': steps,
      'loss': round(loss, 4), 'flops_breakdown': breakdown}


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  result = benchmark(flags.FLAGS.config, flags.FLAGS.steps)
  print(f'{result["device_count"]} x {result["device_kind"]}, batch {result["batch_size"]}: '
        f'compile {result["compile_s"]:.1f} s, step {result["step_s"] * 1e3:.1f} ms, '
        f'{result["examples_per_s"]:.1f} examples/s, {result["achieved_tflops"]:.3f} TFLOP/s'
        + (f' = {100 * result["mfu"]:.1f}% of {result["peak_tflops"]:.3f} '
           f'({result["peak_source"]})' if result['mfu'] is not None else ''))
  print(json.dumps(result))


def define_flags() -> None:
  """Defines the command line's flags; `python -m vlrep.bench` calls it before `main`."""
  # Flags are defined only when run as a program, so tests can import this module.
  config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/coca.py:small.',
                                  lock_config=True)
  flags.DEFINE_integer('steps', 10, 'Timed steps (after two warm-up steps).')
  flags.mark_flags_as_required(['config'])
