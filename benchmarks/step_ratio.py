"""Train-step time of several configs measured side by side: CoCa vs CLIP, and the levers.

Compiles the real train step (`vlrep.tools.bench.compile_step`) of each named setting, then
times them in interleaved rounds (one step of each per round, after warm-up), so that
load from other processes on a shared machine hits every setting alike; prints the median
step time of each, its ratio to the first, and its analytic model FLOPs. The last line is
one JSON object with the same figures.

Run from the repository root:

  python benchmarks/step_ratio.py [--variant=small] [--rounds=5] [--batch=N] [--only=a,b]

Settings: `coca` (the config as it is), `coca_unchunked` (`loss.caption_chunk=0`: the
[B, L-1, V] logits materialised), `clip` (configs/clip.py: same image encoder and unimodal
text layers, no captioning pooler, multimodal layers or LM head), `coca_scan_remat`
(`model.scan_layers` with `model.remat=minimal`) and `coca_bf16` (`model.dtype=bfloat16`).
"""

from __future__ import annotations

import argparse
import json
import statistics

from config_spec import load_config
from vlrep.config import set_fields
from vlrep.tools import bench, flops


def settings(variant: str) -> dict:
  def coca(**changes):
    config = load_config(f'configs/coca.py:{variant}')
    set_fields(config, changes)
    return config
  return {'coca': coca(), 'coca_unchunked': coca(**{'loss.caption_chunk': 0}),
          'clip': load_config(f'configs/clip.py:{variant}'),
          'coca_scan_remat': coca(**{'model.scan_layers': True, 'model.remat': 'minimal'}),
          'coca_bf16': coca(**{'model.dtype': 'bfloat16'})}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--variant', default='small')
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--batch', type=int, default=0, help='0: the config\'s batch_size')
  parser.add_argument('--only', default='coca,coca_unchunked,clip',
                      help='comma-separated settings; the first is the reference')
  args = parser.parse_args()
  available = settings(args.variant)
  names = args.only.split(',')
  steps = {}
  for name in names:
    if name not in available:
      raise SystemExit(f'--only: unknown setting {name!r}; known: {sorted(available)}')
    config = available[name]
    if args.batch:
      config.batch_size = args.batch
    steps[name] = bench.compile_step(config)
    steps[name].run(bench.WARMUP_STEPS)
    print(f'compiled {name} in {steps[name].compile_s:.1f} s', flush=True)
  times = {name: [] for name in names}
  for _ in range(args.rounds):
    for name in names:
      times[name] += steps[name].run(1)
  results = {}
  reference = statistics.median(times[names[0]])
  print(f'{args.variant}, batch {steps[names[0]].config.batch_size}, {args.rounds} interleaved '
        f'rounds (median step; spread = max/min - 1)')
  print(f'{"setting":>16s} {"step s":>8s} {"spread":>7s} {"ratio":>6s} {"GFLOP":>8s} '
        f'{"FLOP ratio":>10s} {"temp MiB":>9s}')
  ref_flops = flops.train_flops_per_step(steps[names[0]].config)['total']
  for name in names:
    median = statistics.median(times[name])
    model_flops = flops.train_flops_per_step(steps[name].config)['total']
    temp = steps[name].step.memory_analysis().temp_size_in_bytes
    results[name] = {'step_s': round(median, 4), 'ratio': round(median / reference, 3),
                     'spread': round(max(times[name]) / min(times[name]) - 1, 3),
                     'model_flops': model_flops, 'flops_ratio': round(model_flops / ref_flops, 3),
                     'temp_bytes': temp}
    r = results[name]
    print(f'{name:>16s} {median:8.3f} {r["spread"]:7.1%} {r["ratio"]:6.3f} '
          f'{model_flops / 1e9:8.1f} {r["flops_ratio"]:10.3f} {temp / 2**20:9.1f}', flush=True)
  print(json.dumps({'variant': args.variant, 'rounds': args.rounds, **results}))


if __name__ == '__main__':
  main()
