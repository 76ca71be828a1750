"""Where a train step's time goes on XLA:CPU: op time by kind, pass and tower.

Compiles the real train step of a config (`vlrep.tools.bench.compile_step`), runs it under
`jax.profiler.trace`, reads the trace back with `jax.profiler.ProfileData` and sums the
time of every XLA op (thunk) event by:
- kind: `matmul` (a dot or library fusion with a rank-2 result), `attention_bmm` (rank-4
  results: the batched attention products), `copy/transpose`, `loop` (the chunked caption
  loss's while loop itself), `elementwise` (the other fusions: LayerNorm, GELU, softmax,
  residual sums, optimizer update);
- pass: `forward` or `backward` (ops from JAX's transpose of the forward pass);
- where: `image`, `text`, `loss/head` (LM head and caption loss), `other` (optimizer,
  contrastive loss).
Op events overlap when XLA runs ops concurrently on its threads, so the sums can exceed
the step time; read them as shares. Run from the repository root:

  python benchmarks/profile_step.py [--variant=small] [--batch=16] [--top=15]
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import re
import tempfile

import jax
from jax.profiler import ProfileData

from config_spec import load_config
from vlrep.tools import bench

RUNS = 2


def _op_lines(hlo_text: str) -> dict[str, tuple[str, str]]:
  """HLO instruction name -> (result shape, instruction text)."""
  ops = {}
  for line in hlo_text.splitlines():
    match = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ', line)
    if match:
      ops[match.group(1)] = (match.group(2), line)
  return ops


def classify(name: str, shape: str, line: str) -> tuple[str, str, str]:
  """(kind, pass, where) of one op, from its name, result shape and HLO text."""
  backward = 'backward' if 'transpose(jvp' in line else 'forward'
  if 'output_head' in line or '/while/' in line:
    where = 'loss/head'
  elif 'encode_image' in line:
    where = 'image'
  elif 'text_decoder' in line:
    where = 'text'
  else:
    where = 'other'
  if name.startswith(('ynn_fusion', 'dot')):
    kind = 'attention_bmm' if shape.count(',') >= 3 else 'matmul'
  elif 'copy' in name or 'transpose' in name:
    kind = 'copy/transpose'
  elif name.startswith('while'):
    kind = 'loop'
  else:
    kind = 'elementwise'
  return kind, backward, where


def profile(config) -> dict[tuple[str, str, str], float]:
  """Seconds of op time per (kind, pass, where), averaged over RUNS steps."""
  step = bench.compile_step(config)
  step.run(bench.WARMUP_STEPS)
  ops = _op_lines(step.step.as_text())
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      step.run(RUNS)
    trace = ProfileData.from_file(glob.glob(f'{trace_dir}/**/*.xplane.pb', recursive=True)[0])
  totals = collections.Counter()
  for plane in trace.planes:
    for line in plane.lines:
      if 'XLAEigen' not in line.name:  # XLA:CPU's compute threads
        continue
      for event in line.events:
        if event.name.startswith(('ThunkExecutor', 'Slinky', 'end:')):
          continue  # executor bookkeeping and waits, not ops
        shape, text = ops.get(event.name, ('?', ''))
        totals[classify(event.name, shape, text)] += event.duration_ns / 1e9 / RUNS
  return dict(totals)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--variant', default='small')
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--top', type=int, default=15)
  args = parser.parse_args()
  config = load_config(f'configs/coca.py:{args.variant}')
  config.batch_size = args.batch
  totals = profile(config)
  total = sum(totals.values())
  by_kind = collections.Counter()
  for (kind, _, _), seconds in totals.items():
    by_kind[kind] += seconds
  print(f'coca.py:{args.variant}, batch {args.batch}: {total:.3f} s of op time per step')
  for (kind, backward, where), seconds in sorted(totals.items(), key=lambda kv: -kv[1])[:args.top]:
    print(f'{seconds * 1e3:8.1f} ms {seconds / total:6.1%}  {kind:15s} {backward:9s} {where}')
  print(json.dumps({'variant': args.variant, 'batch_size': args.batch,
                    'op_seconds': round(total, 4),
                    'by_kind': {k: round(v, 4) for k, v in by_kind.most_common()}}))


if __name__ == '__main__':
  main()
