"""Metric writing: `workdir/metrics.jsonl` (one JSON object per logged step) and TensorBoard.

Only process 0 writes. TensorBoard event files come from tensorboardX, which needs no
TensorFlow (clu's writers import it). On a gs:// workdir both are written into a local
`paths.Mirror` and uploaded from there: an object cannot be appended to (gcsfs's 'a' mode
overwrites), so `metrics.jsonl` is first downloaded, appended locally and re-uploaded whole;
tensorboardX's own GCS writer is never used (it uploads again from `__del__` at exit).
"""

from __future__ import annotations

import json
import math
import sys
from typing import Mapping

import jax

from vlrep.runtime import paths


def _tensorboardx_writer():
  """tensorboardX's SummaryWriter, imported without torch. Imported here: only process 0
  writes. tensorboardX imports torch, when installed, only to accept torch tensors, which
  vlrep never passes; torch's import would be most of a short run's start-up. A None entry
  in sys.modules makes that `import torch` raise ImportError, which tensorboardX catches."""
  blocked = 'torch' not in sys.modules
  if blocked:
    sys.modules['torch'] = None  # type: ignore[assignment]
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    if blocked:
      del sys.modules['torch']
  return SummaryWriter


class MetricWriter:
  def __init__(self, workdir: str):
    self._enabled = jax.process_index() == 0
    if not self._enabled:
      return
    SummaryWriter = _tensorboardx_writer()  # pylint: disable=invalid-name
    self._mirror = paths.Mirror(workdir)
    self._jsonl = open(self._mirror.fetch('metrics.jsonl'), 'a')  # pylint: disable=consider-using-with
    self._tensorboard = SummaryWriter(paths.join(self._mirror.folder, 'tensorboard'))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self._enabled:
      return
    record = {'step': int(step)}
    for name, value in metrics.items():
      value = float(value)
      record[name] = value if math.isfinite(value) else str(value)  # JSON has no NaN
      # TensorBoard tags allow [A-Za-z0-9_./-]; 'r@1' becomes 'r_1' as TensorBoard itself does.
      self._tensorboard.add_scalar(name.replace('@', '_'), value, int(step))
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    self._tensorboard.flush()
    self._mirror.sync()

  def close(self) -> None:
    if self._enabled:
      self._jsonl.close()
      self._tensorboard.close()
      self._mirror.close()
