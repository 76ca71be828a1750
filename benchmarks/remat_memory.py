"""Compiled memory and compile time of the training gradient per `model.remat` x `model.scan_layers`.

Lowers and compiles (never runs) the gradient of the train step's loss for abstract
parameters and a batch, once per (scan_layers, remat), and prints XLA's per-device temp
(scratch) buffer size from `compiled.memory_analysis()` and the compile time. The last line
is one JSON object with the same figures. XLA:CPU figures: read the ratios between rows.

Run from the repository root:

  python benchmarks/remat_memory.py [--config=configs/coca.py:tiny] [--batch=64]
"""

from __future__ import annotations

import argparse
import json
import time

import flax.linen as nn
import jax

from config_spec import load_config
from vlrep.models.build import build_model, example_batch, init_params
from vlrep.step import LossConfig, compute_losses


def measure(config, batch_size: int) -> dict[str, float]:
  model = build_model(config)
  params = jax.eval_shape(lambda: nn.unbox(init_params(model, config, jax.random.key(0))))
  batch = jax.eval_shape(lambda: example_batch(config, batch_size))
  loss_config = LossConfig.from_config(config.loss)
  grad = jax.grad(lambda p, b: compute_losses(model, p, b, loss_config)[0])
  start = time.perf_counter()
  compiled = jax.jit(grad).lower(params, batch).compile()
  return {'temp_bytes': compiled.memory_analysis().temp_size_in_bytes,
          'compile_s': round(time.perf_counter() - start, 2)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/coca.py:tiny')
  parser.add_argument('--batch', type=int, default=64)
  args = parser.parse_args()
  results = {}
  print(f'{args.config}, batch {args.batch}: per-device temp memory and compile time of the '
        'training gradient')
  print(f'{"scan_layers":>11s} {"remat":>8s} {"temp MiB":>9s} {"compile s":>9s}')
  for scan in (False, True):
    for remat in ('none', 'full', 'minimal'):
      config = load_config(args.config)
      config.model.update(remat=remat, scan_layers=scan)
      figures = measure(config, args.batch)
      results[f'scan={scan},remat={remat}'] = figures
      print(f'{scan!s:>11s} {remat:>8s} {figures["temp_bytes"] / 2**20:9.1f} '
            f'{figures["compile_s"]:9.2f}', flush=True)
  print(json.dumps({'config': args.config, 'batch': args.batch, **results}))


if __name__ == '__main__':
  main()
