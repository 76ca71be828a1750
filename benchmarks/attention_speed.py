"""Attention on XLA:CPU: vlrep's heads-major products against jax.nn.dot_product_attention.

Times the attention core alone (forward, and forward+backward) at the vision shapes of a
config (batch x patches x heads x head width), and the config's whole train step with each
implementation (`vlrep.models.layers.dot_product_attention` swapped for jax's), in
interleaved rounds so that load from other processes hits both alike. Run from the
repository root:

  python benchmarks/attention_speed.py [--variant=small] [--batch=16] [--rounds=3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from config_spec import load_config
from vlrep import bench
from vlrep.models import layers

IMPLEMENTATIONS = {'vlrep': layers.dot_product_attention,
                   'jax.nn': lambda q, k, v, mask=None: jax.nn.dot_product_attention(
                       q, k, v, mask=mask)}


def _median_s(fn, *args, repeats: int = 7) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def core_times(batch: int, tokens: int, heads: int, head_dim: int) -> dict[str, dict[str, float]]:
  q, k, v = (jax.random.normal(jax.random.key(i), (batch, tokens, heads, head_dim))
             for i in range(3))
  results = {}
  for name, attend in IMPLEMENTATIONS.items():
    forward = jax.jit(attend)
    backward = jax.jit(jax.grad(lambda q, k, v, attend=attend: jnp.sum(attend(q, k, v) ** 2),
                                argnums=(0, 1, 2)))
    results[name] = {'forward_ms': round(_median_s(forward, q, k, v) * 1e3, 2),
                     'forward_backward_ms': round(_median_s(backward, q, k, v) * 1e3, 2)}
  return results


def step_times(config, rounds: int) -> dict[str, float]:
  steps = {}
  for name, attend in IMPLEMENTATIONS.items():
    layers.dot_product_attention = attend  # read at trace time by layers.Attention
    steps[name] = bench.compile_step(config)
    steps[name].run(bench.WARMUP_STEPS)
  layers.dot_product_attention = IMPLEMENTATIONS['vlrep']
  times = {name: [] for name in steps}
  for _ in range(rounds):
    for name, step in steps.items():
      times[name] += step.run(1)
  return {name: round(statistics.median(values), 4) for name, values in times.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--variant', default='small')
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--rounds', type=int, default=3)
  args = parser.parse_args()
  config = load_config(f'configs/coca.py:{args.variant}')
  config.batch_size = args.batch
  vision = config.model.vision
  tokens = (config.data.image_size // vision.patch_size) ** 2
  core = core_times(args.batch, tokens, vision.heads, vision.width // vision.heads)
  step = step_times(config, args.rounds)
  for name in IMPLEMENTATIONS:
    print(f'{name:>7s}: core forward {core[name]["forward_ms"]:7.1f} ms, forward+backward '
          f'{core[name]["forward_backward_ms"]:7.1f} ms; train step {step[name]:.3f} s')
  print(json.dumps({'variant': args.variant, 'batch_size': args.batch, 'tokens': tokens,
                    'core': core, 'step_s': step,
                    'step_ratio_jax_over_vlrep': round(step['jax.nn'] / step['vlrep'], 3)}))


if __name__ == '__main__':
  main()
