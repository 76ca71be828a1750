"""Optimizer-state memory of AdamW against Adafactor for the CoCa configs.

Builds each config's optimizer (`vlrep.optim.make_optimizer`, the one `vlrep.train` uses)
and sizes its state for the model's parameters with `jax.eval_shape` (nothing is
allocated), so the figures are exact byte counts, not measurements that vary from run to
run. Adafactor keeps a first moment (`optim.b1`, the paper's 0.9) and factored second
moments (`optim.factor_min_dim`: the config's 128, and 64, which also factors the attention
kernels [width, heads, 64]); AdamW keeps two full moments. Run from the repository root:

  python benchmarks/optimizer_memory.py [--variants=base,large,giant]
"""

from __future__ import annotations

import argparse
import json

import flax.linen as nn
import jax

from config_spec import load_config
from vlrep.models.build import build_model, init_params
from vlrep.optim import make_optimizer

# (row name, optim.name, optim.factor_min_dim or None for the config's)
OPTIMIZERS = (('adamw', 'adamw', None), ('adafactor', 'adafactor', None),
              ('adafactor_factor64', 'adafactor', 64))


def _bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def measure(variant: str) -> dict[str, int]:
  config = load_config(f'configs/coca.py:{variant}')
  model = build_model(config)
  params = jax.eval_shape(lambda: nn.unbox(init_params(model, config, jax.random.key(0))))
  figures = {'parameters': sum(x.size for x in jax.tree.leaves(params)),
             'param_bytes': _bytes(params)}
  default_factor_min_dim = config.optim.factor_min_dim
  for name, optimizer, factor_min_dim in OPTIMIZERS:
    config.optim.name = optimizer
    config.optim.factor_min_dim = factor_min_dim or default_factor_min_dim
    tx, _ = make_optimizer(config.optim, config.total_steps)
    figures[f'{name}_state_bytes'] = _bytes(jax.eval_shape(tx.init, params))
  return figures


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--variants', default='base,large,giant')
  args = parser.parse_args()
  results = {}
  print(f'{"variant":>8s} {"params":>14s} {"param GiB":>10s} {"AdamW GiB":>10s} '
        f'{"Adafactor GiB (ratio)":>22s} {"factor_min_dim=64 (ratio)":>26s}')
  for variant in args.variants.split(','):
    r = results[variant] = measure(variant)
    gib = lambda b: b / 2**30
    adamw = r['adamw_state_bytes']
    cells = [f'{gib(r[k]):.2f} ({r[k] / adamw:.3f})'
             for k in ('adafactor_state_bytes', 'adafactor_factor64_state_bytes')]
    print(f'{variant:>8s} {r["parameters"]:14,d} {gib(r["param_bytes"]):10.2f} '
          f'{gib(adamw):10.2f} {cells[0]:>22s} {cells[1]:>26s}')
  print(json.dumps(results))


if __name__ == '__main__':
  main()
