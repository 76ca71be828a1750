"""config.nan_policy: skip with a bound on steps in a row, or halt at the first, naming it."""

import numpy as np
import pytest

from vlrep.runtime.nonfinite import NonFiniteError, NonFiniteGuard


def _metrics(finite: bool) -> dict:
  loss = 1.0 if finite else float('nan')
  return {'train/loss': np.float32(loss), 'train/caption_loss': np.float32(loss),
          'train/contrastive_loss': np.float32(0.5), 'train/finite': np.bool_(finite)}


def test_skip_counts_and_stops_after_max_in_a_row():
  stops = []
  guard = NonFiniteGuard('skip', max_consecutive=2, before_stop=lambda: stops.append(1))
  logged = guard.push(1, _metrics(True))
  assert 'train/finite' not in logged and 'train/loss' in logged
  for step, finite in ((2, False), (3, True), (4, False)):
    guard.push(step, _metrics(finite))
  guard.check(4)  # step 4 is the first of a new run of non-finite steps
  assert (guard.skipped, guard.consecutive, stops) == (2, 1, [])
  guard.push(5, _metrics(False))
  with pytest.raises(NonFiniteError, match=r'step 5: train/caption_loss=nan, train/loss=nan; '
                                           r'stopped after 2 non-finite steps in a row'):
    guard.check(5)
  assert stops == [1]


def test_halt_names_the_first_step_and_metric():
  guard = NonFiniteGuard('halt', max_consecutive=5)
  guard.push(7, _metrics(False))  # checked one step late, so that the device is not stalled
  with pytest.raises(NonFiniteError, match=r'at step 7: train/caption_loss=nan'):
    guard.push(8, _metrics(False))


def test_bad_policy_is_named():
  with pytest.raises(ValueError, match="nan_policy='never'"):
    NonFiniteGuard('never', 5)
  with pytest.raises(ValueError, match='nan_max_consecutive must be >= 1'):
    NonFiniteGuard('skip', 0)
