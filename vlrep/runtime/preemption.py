"""Preemption notices: SIGTERM or SIGINT stops training after the current step, with a checkpoint.

Preemptible TPU and GPU nodes get SIGTERM shortly before they go away. `PreemptionWatcher`
turns that notice into a clean stop: the loop asks `should_stop(step)` after every step,
and when it says yes the loop writes a checkpoint of that step and returns, so the process
exits with status 0 and the same command resumes there. In a multi-process run every
process must stop at the same step (checkpoints are collective), so the answer comes from
JAX's preemption sync point, which the coordination service resolves to one step for all
processes (jax.distributed catches SIGTERM itself once initialised). A second SIGINT while
a stop is pending interrupts at once, as Ctrl-C usually does.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import jax
from absl import logging
from jax.experimental import multihost_utils

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptionWatcher:
  """Context manager: catches the stop signals while training; `should_stop(step)` polls."""

  def __init__(self):
    self._requested = threading.Event()
    self._previous: dict[int, object] = {}

  def _handle(self, signum: int, frame: FrameType | None) -> None:
    del frame
    if self._requested.is_set() and signum == signal.SIGINT:
      raise KeyboardInterrupt
    logging.warning('received %s: stopping after this step with a checkpoint',
                    signal.Signals(signum).name)
    self._requested.set()

  def __enter__(self) -> 'PreemptionWatcher':
    # Signal handlers can only be installed from the main thread, and in a multi-process
    # run jax's preemption service already owns SIGTERM.
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      for signum in _SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def should_stop(self, step: int) -> bool:
    """True once a stop was requested; the same step on every process."""
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._requested.is_set()
