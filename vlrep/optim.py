"""The optimizer from `config.optim`: AdamW or Adafactor, warmup + cosine/linear decay,
decoupled weight decay of the matrices, global-norm gradient clipping.

Both optimizers are one chain with the same tail, so that each field means one thing for
both: clip the gradients -> the optimizer's own preconditioning -> add
`weight_decay * param` on the decayed leaves -> scale by `-learning_rate(t)`. The decay is
therefore decoupled and scheduled (`param -= lr(t) * weight_decay * param` each step, as
`optax.adamw` and open_clip do) for Adafactor as well; `optax.adafactor`'s own
`weight_decay_rate` is applied after the learning rate and would decay by the full
`weight_decay` every step, whatever the schedule.

`optim.lr_multipliers` and `optim.layer_decay` then scale each leaf's update, and
`optim.freeze` runs the whole chain on the trainable leaves only (vlrep/param_groups.py).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from vlrep import param_groups

OPTIMIZERS = ('adamw', 'adafactor')
DECAYS = ('cosine', 'linear')
# Adafactor's exponent of its second-moment decay 1 - (t + 1) ** -0.8 (Shazeer & Stern 2018).
ADAFACTOR_DECAY_EXPONENT = 0.8
# The value of `optim.factor_min_dim` that AdamW (which has nothing to factor) accepts.
DEFAULT_FACTOR_MIN_DIM = 128


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


# The decayed leaves are the matrices, as in open_clip (rank >= 2, norms excepted): dense
# and convolution kernels, token and position embeddings, and the poolers' queries. Vectors
# and scalars are not: biases, LayerNorm scales, LayerScale gammas, the class and [CLS]
# vectors, the temperature and the sigmoid bias. By leaf name rather than by rank, so that
# a scanned stack (`model.scan_layers`), whose leaves gain a leading `layers` axis, decays
# the same ones (tests/test_optim.py checks the names against the ranks on every
# parameter of the model).
DECAYED = ('kernel', 'embedding', 'pos_embed', 'queries')


def weight_decay_mask(params: Any) -> Any:
  """True for the leaves that weight decay shrinks (see `DECAYED`)."""
  def decays(path, _) -> bool:
    return getattr(path[-1], 'key', None) in DECAYED
  return jax.tree_util.tree_map_with_path(decays, params)


def adafactor_decay_rate(step: jax.Array, b2: float) -> jax.Array:
  """Adafactor's second-moment decay at `step` (0-based), capped at `b2`:
  min(1 - (step + 1) ** -0.8, b2), big_vision's `beta2_cap` (the CoCa paper's b2 = 0.999)."""
  t = jnp.asarray(step + 1, jnp.float32)
  return jnp.minimum(1.0 - t ** (-ADAFACTOR_DECAY_EXPONENT), b2)


def _preconditioner(optim: ml_collections.ConfigDict) -> optax.GradientTransformation:
  factor_min_dim = int(optim.factor_min_dim)
  if optim.name == 'adamw':
    if factor_min_dim != DEFAULT_FACTOR_MIN_DIM:
      raise ValueError(f'optim.factor_min_dim={factor_min_dim} applies to '
                       "optim.name='adafactor' only; AdamW has no factored moments")
    return optax.scale_by_adam(b1=optim.b1, b2=optim.b2)
  if optim.name == 'adafactor':
    if not 0.0 < optim.b2 < 1.0:
      raise ValueError(f'optim.b2={optim.b2}: Adafactor caps its second-moment decay at b2, '
                       'which must be in (0, 1)')
    b2 = float(optim.b2)
    # Factored second moments (their two largest dimensions, when the smaller is at least
    # factor_min_dim), update clipping at RMS 1 and momentum b1, as optax.adafactor without
    # its parameter-scale multiplier; the decay of the second moments is capped at b2.
    return optax.chain(
        optax.scale_by_factored_rms(
            decay_rate=ADAFACTOR_DECAY_EXPONENT, min_dim_size_to_factor=factor_min_dim,
            decay_rate_fn=lambda step, _: adafactor_decay_rate(step, b2)),
        optax.clip_by_block_rms(1.0),
        optax.ema(optim.b1, debias=False))
  raise ValueError(f'optim.name={optim.name!r}; expected one of {OPTIMIZERS}')


def make_optimizer(optim: ml_collections.ConfigDict,
                   total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (optimizer, learning-rate schedule)."""
  schedule = learning_rate_schedule(optim, total_steps)
  # Nested as optax.adamw's chain is, so that AdamW's state keeps the layout of
  # checkpoints written when this was optax.adamw.
  update = optax.chain(_preconditioner(optim),
                       optax.add_decayed_weights(optim.weight_decay, mask=weight_decay_mask),
                       optax.scale_by_learning_rate(schedule))
  tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), update)
  # Each only when asked for, so that the state of a run without them keeps its layout (and
  # earlier checkpoints restore).
  if optim.freeze:
    tx = param_groups.partition_frozen(tx, optim.freeze)
  # Outside the partition, so that it sees every leaf, frozen ones included: a stack's depth
  # and a pattern's matches do not depend on what is frozen.
  if optim.lr_multipliers or param_groups.check_layer_decay(optim.layer_decay) not in (0, 1):
    tx = optax.chain(tx, param_groups.scale_by_lr_multipliers(optim.lr_multipliers,
                                                              optim.layer_decay))
  return tx, schedule


def applied_learning_rate(opt_state: Any, schedule: optax.Schedule) -> jax.Array:
  """The learning rate that the next update from `opt_state` applies: the schedule at the
  optimizer's own step count, which skipped (non-finite) steps do not advance."""
  counts = [s.count for s in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
            if isinstance(s, optax.ScaleByScheduleState)]
  if len(counts) != 1:
    raise ValueError(f'expected one learning-rate schedule in the optimizer state, found '
                     f'{len(counts)}')
  return schedule(counts[0])
