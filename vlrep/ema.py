"""The exponential moving average of the parameters (`optim.ema_decay`), bias-corrected.

The train step (`vlrep/step.py`) updates it after every applied update; the state keeps it in
float32 and sharded as the parameters; the evaluators and `vlrep.load` use it when a run has
one. A run without it keeps the checkpoint layout it had before.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections


def ema_decay(optim_config: ml_collections.ConfigDict) -> float:
  """`optim.ema_decay`, checked: 0 (off) or in (0, 1)."""
  decay = float(optim_config.ema_decay)
  if not 0.0 <= decay < 1.0:
    raise ValueError(f'optim.ema_decay must be in [0, 1) (0 = no EMA), got {decay}')
  return decay


def ema_init(params: Any) -> Any:
  """A float32 copy of `params` to start the EMA from (a copy: the step donates its state,
  and two leaves sharing a buffer cannot both be donated)."""
  return jax.tree.map(lambda p: jnp.array(p, jnp.float32, copy=True), params)


def ema_update(ema: Any, params: Any, decay: float, count: jax.Array) -> Any:
  """The EMA after its `count`-th update (1-based), which averages in `params`.

  Bias-corrected as Adam's moments are: the result is the average of the parameters after
  updates 1..count weighted by decay^(count - k) and normalised, i.e. each update moves the
  EMA by (1 - decay) / (1 - decay^count) of the way to `params` (all of it at count 1).
  Without the correction a 0.9999 EMA started at the initial parameters is still 37% random
  initialisation after 10k steps, which early evaluations and checkpoints would measure;
  unlike a warmup such as min(decay, (1 + t) / (10 + t)) it adds no constant to choose.
  Kept in float32 whatever the parameters' dtype: a bfloat16 EMA would round away moves of
  (1 - decay) of the distance and never change.
  """
  # (1 - decay) / (1 - decay^count) through expm1, accurate for decay near 1; both in float32
  # so that the weight is exactly 1, and the EMA exactly `params`, at count 1.
  log_decay = jnp.float32(math.log(decay))
  weight = jnp.expm1(log_decay) / jnp.expm1(count.astype(jnp.float32) * log_decay)
  return jax.tree.map(lambda e, p: (1 - weight) * e + weight * p.astype(jnp.float32),
                      ema, params)
