"""The optimizer from `config.optim`: AdamW or Adafactor, warmup + cosine/linear decay,
weight decay masked off biases, norms and the temperature, global-norm gradient clipping.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

OPTIMIZERS = ('adamw', 'adafactor')
DECAYS = ('cosine', 'linear')


def learning_rate_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate`, then cosine or linear decay to 0."""
  if optim.decay not in DECAYS:
    raise ValueError(f'optim.decay={optim.decay!r}; expected one of {DECAYS}')
  warmup = min(int(optim.warmup_steps), total_steps)
  decay_steps = max(total_steps - warmup, 1)
  if optim.decay == 'cosine':
    decay = optax.cosine_decay_schedule(optim.learning_rate, decay_steps)
  else:
    decay = optax.linear_schedule(optim.learning_rate, 0.0, decay_steps)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, optim.learning_rate, max(warmup, 1)), decay], [warmup])


# Parameters left undecayed, by leaf name: biases, LayerNorm scales, the [CLS] vector and the
# contrastive temperature and bias. By name rather than by rank, so that a scanned stack
# (`model.scan_layers`), whose leaves gain a leading `layers` axis, decays the same ones.
NO_DECAY = ('bias', 'scale', 'cls_embed', 'logit_scale', 'logit_bias')


def weight_decay_mask(params: Any) -> Any:
  """True for matrices and embeddings; False for biases, norm scales and the temperature."""
  def decays(path, _) -> bool:
    return getattr(path[-1], 'key', None) not in NO_DECAY
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim: ml_collections.ConfigDict,
                   total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (optimizer, learning-rate schedule)."""
  schedule = learning_rate_schedule(optim, total_steps)
  if optim.name == 'adamw':
    update = optax.adamw(schedule, b1=optim.b1, b2=optim.b2,
                         weight_decay=optim.weight_decay, mask=weight_decay_mask)
  elif optim.name == 'adafactor':
    # Factored second moments: with the 0.9 momentum the state is ~1.3x the parameters at
    # factor_min_dim 128 and ~1.0x at 64, against AdamW's 2x (benchmarks/optimizer_memory.py);
    # b2 is Adafactor's own 1 - t^-0.8 schedule rather than a constant.
    update = optax.adafactor(schedule, momentum=optim.b1, multiply_by_parameter_scale=False,
                             min_dim_size_to_factor=optim.get('factor_min_dim', 128),
                             weight_decay_rate=optim.weight_decay,
                             weight_decay_mask=weight_decay_mask)
  else:
    raise ValueError(f'optim.name={optim.name!r}; expected one of {OPTIMIZERS}')
  return optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), update), schedule
