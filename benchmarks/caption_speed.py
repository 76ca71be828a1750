"""Captions per second of a trained run through `Pretrained.caption_ids`: greedy, beam, sampling.

Loads the run with `vlrep.load`, captions the first `--images` held-out images of the
embedded data set in chunks of `--batch`, once to compile and then timed, for each method.
The last line is one JSON object with the figures.

Run from the repository root, after the README's first command:

  python benchmarks/caption_speed.py --workdir=runs/tiny [--images=256] [--batch=64]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import vlrep
from vlrep.data.synthetic import SyntheticShapes

METHODS = {'greedy': {}, 'beam4': {'method': 'beam', 'beam_size': 4},
           'sample_top_p_0.9': {'method': 'sample', 'top_p': 0.9}}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--images', type=int, default=256)
  parser.add_argument('--batch', type=int, default=64)
  args = parser.parse_args()
  model = vlrep.load(args.workdir)
  model.batch_size = args.batch
  source = SyntheticShapes('test', model.config.data.image_size)
  images = np.stack([source[i]['image'] for i in range(args.images)])
  results = {}
  for name, options in METHODS.items():
    model.caption_ids(images[:args.batch], **options)  # compile
    start = time.perf_counter()
    rows = model.caption_ids(images, **options)
    seconds = time.perf_counter() - start
    results[name] = {'captions_per_s': round(len(images) / seconds, 1),
                     'mean_tokens': round(float((rows > 2).sum(1).mean()), 1)}
    print(f'{name:>17}: {results[name]["captions_per_s"]:7.1f} captions/s, '
          f'{results[name]["mean_tokens"]} tokens per caption', flush=True)
  print(json.dumps({'workdir': args.workdir, 'images': args.images, 'batch': args.batch,
                    **results}))


if __name__ == '__main__':
  main()
