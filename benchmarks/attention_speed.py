"""Attention implementations: vlrep's (jax.nn.dot_product_attention) against a heads-major
layout of the same products (and cuDNN on GPU).

Times the attention core alone (forward, and forward+backward) at the vision shapes of a
config (batch x patches x heads x head width), and the config's whole train step with each
implementation (`vlrep.models.layers.dot_product_attention` swapped for the others), in
interleaved rounds so that load from other processes hits all alike. On GPU it adds
`jax.nn.dot_product_attention(implementation='cudnn')` (cuDNN's fused kernel: bf16/fp16
only, some shapes only); an implementation that fails is reported with its error, not
timed. Run from the repository root:

  python benchmarks/attention_speed.py [--variant=small] [--batch=16] [--rounds=3]
      [--dtype=bfloat16]   # compute dtype of the core and of the model (default: the config's)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from config_spec import load_config
from vlrep.models import layers
from vlrep.tools import bench

def heads_major(query, key, value, mask=None):
  """The products on [B, heads, T, d] operands, with float32 logits and jax's fill value: the
  lever measured against XLA's token-major layout (vlrep used it on CPU until issue 17)."""
  scale = query.shape[-1] ** -0.5
  query, key, value = (t.transpose(0, 2, 1, 3) for t in (query, key, value))
  logits = jnp.einsum('bhtd,bhsd->bhts', query, key, preferred_element_type=jnp.float32)
  logits = logits * scale
  if mask is not None:
    logits = jnp.where(mask, logits, -0.7 * jnp.finfo(jnp.float32).max)
  probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
  return jnp.einsum('bhts,bhsd->bhtd', probs, value).transpose(0, 2, 1, 3)


IMPLEMENTATIONS = {'vlrep': layers.dot_product_attention, 'heads_major': heads_major}
if jax.default_backend() == 'gpu':
  IMPLEMENTATIONS['cudnn'] = lambda q, k, v, mask=None: jax.nn.dot_product_attention(
      q, k, v, mask=mask, implementation='cudnn')


def _median_s(fn, *args, repeats: int = 7) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _error(e: Exception) -> str:
  return f'{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ""}'


def core_times(batch: int, tokens: int, heads: int, head_dim: int,
               dtype: str = 'float32') -> dict[str, dict[str, float | str]]:
  q, k, v = (jax.random.normal(jax.random.key(i), (batch, tokens, heads, head_dim), dtype)
             for i in range(3))
  results = {}
  for name, attend in IMPLEMENTATIONS.items():
    forward = jax.jit(attend)
    backward = jax.jit(jax.grad(
        lambda q, k, v, attend=attend: jnp.sum(attend(q, k, v).astype(jnp.float32) ** 2),
        argnums=(0, 1, 2)))
    try:
      results[name] = {'forward_ms': round(_median_s(forward, q, k, v) * 1e3, 2),
                       'forward_backward_ms': round(_median_s(backward, q, k, v) * 1e3, 2)}
    except Exception as e:  # an implementation that does not take these shapes or dtypes
      results[name] = {'error': _error(e)}
  return results


def step_times(config, rounds: int) -> dict[str, float | str]:
  steps, failed = {}, {}
  for name, attend in IMPLEMENTATIONS.items():
    layers.dot_product_attention = attend  # read at trace time by layers.Attention
    try:
      steps[name] = bench.compile_step(config)
      steps[name].run(bench.WARMUP_STEPS)
    except Exception as e:
      steps.pop(name, None)
      failed[name] = _error(e)
  layers.dot_product_attention = IMPLEMENTATIONS['vlrep']
  times = {name: [] for name in steps}
  for _ in range(rounds):
    for name, step in steps.items():
      times[name] += step.run(1)
  return {**{name: round(statistics.median(values), 4) for name, values in times.items()},
          **failed}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--variant', default='small')
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--dtype', default=None, help="default: the config's model.dtype")
  args = parser.parse_args()
  config = load_config(f'configs/coca.py:{args.variant}')
  config.batch_size = args.batch
  if args.dtype:
    config.model.dtype = args.dtype
  vision = config.model.vision
  tokens = (config.data.image_size // vision.patch_size) ** 2
  core = core_times(args.batch, tokens, vision.heads, vision.width // vision.heads,
                    config.model.dtype)
  step = step_times(config, args.rounds)
  for name in IMPLEMENTATIONS:
    print(f'{name:>7s}: core {core[name]}; train step {step[name]}')
  timed = {name: s for name, s in step.items() if isinstance(s, float)}  # the rest: errors
  ratios = {f'step_ratio_{name}_over_vlrep': round(s / timed['vlrep'], 3)
            for name, s in timed.items() if name != 'vlrep' and 'vlrep' in timed}
  print(json.dumps({'variant': args.variant, 'batch_size': args.batch, 'tokens': tokens,
                    'dtype': config.model.dtype, 'device_kind': jax.devices()[0].device_kind,
                    'core': core, 'step_s': step, **ratios}))


if __name__ == '__main__':
  main()
