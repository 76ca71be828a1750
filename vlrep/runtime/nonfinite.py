"""`config.nan_policy`: what the loop does after a step with a non-finite loss or gradient.

`train_step` never applies such an update (parameters and optimizer state stay as they
were) and reports `train/finite`. `NonFiniteGuard` reads that flag one step late, so that
checking it does not stall the device (the next step is already queued), except right
before a checkpoint, which therefore never holds a state past an unchecked step:

* `skip` (default): count the step (`train/nonfinite_skipped`, logged) and go on; stop with
  `NonFiniteError` after `config.nan_max_consecutive` such steps in a row (the run has
  diverged, and skipping more only burns compute).
* `halt`: stop at the first one. The error names the step and its first non-finite metric;
  the latest checkpoint is the last one written before that step.

Every process sees the same (replicated) flag, so a multi-process run stops at the same step
everywhere.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import jax
import ml_collections
from absl import logging

from vlrep.step import FINITE_METRIC

POLICIES = ('skip', 'halt')
# Totals are reported after their parts: the part that went non-finite is the useful name.
_LAST = ('train/loss', 'train/grad_norm')


class NonFiniteError(RuntimeError):
  """The run stopped on non-finite losses or gradients (config.nan_policy)."""


def _describe(metrics: Mapping[str, Any]) -> str:
  values = {k: float(v) for k, v in jax.device_get(dict(metrics)).items() if k != FINITE_METRIC}
  bad = sorted((k for k, v in values.items() if not math.isfinite(v)), key=_LAST.__contains__)
  return ', '.join(f'{k}={values[k]}' for k in bad) or 'none (non-finite gradients)'


class NonFiniteGuard:
  """Applies `policy` to the `train/finite` flags of the steps pushed, in step order."""

  def __init__(self, policy: str, max_consecutive: int,
               before_stop: Callable[[], None] = lambda: None):
    """`before_stop` runs before a stop is raised (e.g. to let async checkpoints finish)."""
    if policy not in POLICIES:
      raise ValueError(f'nan_policy={policy!r}; expected one of {POLICIES}')
    if max_consecutive < 1:
      raise ValueError(f'nan_max_consecutive must be >= 1, got {max_consecutive}')
    self._policy = policy
    self._max_consecutive = max_consecutive
    self._before_stop = before_stop
    self._pending: list[tuple[int, dict[str, Any]]] = []
    self.consecutive = 0
    self.skipped = 0  # steps skipped since this process started

  def push(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
    """Takes step `step`'s metrics; checks the steps before it; returns the metrics to log."""
    self._pending.append((step, metrics))
    self.check(step - 1)
    return {k: v for k, v in metrics.items() if k != FINITE_METRIC}

  def check(self, through_step: int) -> None:
    """Waits for the flags of every pushed step up to `through_step` and applies the policy.

    Raises:
      NonFiniteError: under `halt` at the first non-finite step; under `skip` at the
        `nan_max_consecutive`-th in a row.
    """
    while self._pending and self._pending[0][0] <= through_step:
      step, metrics = self._pending.pop(0)
      if bool(jax.device_get(metrics[FINITE_METRIC])):
        self.consecutive = 0
        continue
      self.consecutive += 1
      self.skipped += 1
      what = f'non-finite loss or gradients at step {step}: {_describe(metrics)}'
      if self._policy == 'halt' or self.consecutive >= self._max_consecutive:
        self._before_stop()
      if self._policy == 'halt':
        raise NonFiniteError(f'{what}; stopped (nan_policy=halt), the update was not applied '
                             'and no later checkpoint was written')
      if self.consecutive >= self._max_consecutive:
        raise NonFiniteError(f'{what}; stopped after {self.consecutive} non-finite steps in a '
                             f'row (nan_policy=skip, nan_max_consecutive='
                             f'{self._max_consecutive}); no later checkpoint was written')
      logging.warning('%s; update skipped (%d in a row, %d in all)', what, self.consecutive,
                      self.skipped)


def guard_from_config(config: ml_collections.ConfigDict,
                      before_stop: Callable[[], None] = lambda: None) -> NonFiniteGuard:
  """The guard for `config.nan_policy` and `config.nan_max_consecutive`."""
  return NonFiniteGuard(config.nan_policy, config.nan_max_consecutive, before_stop)
