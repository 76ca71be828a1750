"""Where the compiled train step reduces its gradients: the all-reduces in and out of loops.

Compiles (never runs) `vlrep.train`'s step through `vlrep.plan` for a TPU v5e 2x2 slice of
compile-only devices (libtpu, the `plan` extra), for the tiny config cut down as the tests cut
it (one layer per stack, 16-px images) with the caption loss chunked, on several meshes with
and without microbatches (GradCache). Prints, per case, the count of all-reduces in the
compiled step and how many sit inside a loop body (they run once per microbatch or caption
slice), then one JSON line with every case. `benchmarks/RESULTS.md`, "Pod planning", keeps the
figures before and after each change to how gradients are reduced.

Run from the repository root:

  python benchmarks/gradient_reductions.py [--meshes=4x1,2x2,1x4] [--microbatches=1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'tests'))
import conftest  # pylint: disable=g-import-not-at-top,wrong-import-position  (XLA flags first)
from vlrep.tools import plan  # pylint: disable=g-import-not-at-top,wrong-import-position


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--meshes', default='4x1,2x2,1x4', help='DATAxFSDP, comma-separated')
  parser.add_argument('--microbatches', default='1,2')
  parser.add_argument('--caption_chunk', type=int, default=4)
  args = parser.parse_args()
  cases = []
  for mesh in args.meshes.split(','):
    data, fsdp = (int(x) for x in mesh.split('x'))
    for microbatches in (int(k) for k in args.microbatches.split(',')):
      config = conftest.shrink(conftest.load_config('coca'))
      config.eval_every_steps, config.microbatches = 0, microbatches
      config.loss.caption_chunk = args.caption_chunk
      config.mesh.update(data=data, fsdp=fsdp)
      reduce = plan.plan(config, 'tpu:v5e:2x2')['collectives'].get(
          'all-reduce', {'count': 0, 'in_loop': 0})
      cases.append({'mesh': mesh, 'microbatches': microbatches,
                    'all_reduce': reduce['count'], 'all_reduce_in_loop': reduce['in_loop']})
      print(f'mesh {mesh} microbatches {microbatches}: {reduce["count"]} all-reduces, '
            f'{reduce["in_loop"]} in a loop', flush=True)
  print(json.dumps(cases))


if __name__ == '__main__':
  main()
