"""`python -m vlrep.describe --config=configs/coca.py:base`: parameter counts per part.

Shapes come from `jax.eval_shape`, so nothing is allocated and even the giant model is
described in seconds on a laptop. The last line printed is a JSON object with the count of
each part and `total`.
"""

from __future__ import annotations

import json
import re

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from vlrep.models.build import build_model, init_params

# (part, pattern on the '/'-joined parameter path); the first match wins. Stacks are
# `multimodal_<i>` per layer, or one `multimodal` with `model.scan_layers`.
PARTS = (
    ('image_encoder', r'^image_encoder/'),
    ('captioning_pooler', r'^captioning_pooler/'),
    ('contrastive_pooler', r'^contrastive_pooler/'),
    ('text_multimodal', r'^text_decoder/(multimodal(_\d+)?|ln_final)/'),
    ('heads', r'^(text_decoder/output_head|image_projection|image_pooled_norm|text_projection|'
              r'logit_scale|logit_bias)'),
    ('text_unimodal', r'^text_decoder/'),
)


def parameter_counts(config: ml_collections.ConfigDict) -> dict[str, int]:
  """Number of parameters of each part of the model and `total`, without allocating any."""
  model = build_model(config)
  shapes = nn.unbox(jax.eval_shape(lambda: init_params(model, config, jax.random.key(0))))
  counts = {part: 0 for part, _ in PARTS}
  for path, leaf in jax.tree_util.tree_leaves_with_path(shapes):
    name = '/'.join(str(getattr(k, 'key', k)) for k in path)
    part = next(part for part, pattern in PARTS if re.search(pattern, name))
    counts[part] += int(np.prod(leaf.shape))
  counts['total'] = sum(counts.values())
  return counts


def main(argv: list[str]) -> None:
  del argv
  counts = parameter_counts(flags.FLAGS.config)
  for part, count in counts.items():
    print(f'{part:>20s}  {count:>15,d}  ({count / 1e6:,.1f}M)')
  print(json.dumps(counts))


def define_flags() -> None:
  """Defines the command line's flags; `python -m vlrep.describe` calls it before `main`."""
  # Flags are defined only when run as a program, so tests can import this module.
  config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/coca.py:base.')
  flags.mark_flags_as_required(['config'])
