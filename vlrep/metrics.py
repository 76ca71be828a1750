"""Metric writing: `workdir/metrics.jsonl` (one JSON object per logged step) and TensorBoard.

Only process 0 writes. TensorBoard event files come from tensorboardX, which needs no
TensorFlow (clu's writers import it).
"""

from __future__ import annotations

import json
import math
import os
from typing import Mapping

import jax


class MetricWriter:
  def __init__(self, workdir: str):
    self._enabled = jax.process_index() == 0
    if not self._enabled:
      return
    from tensorboardX import SummaryWriter  # imported here: heavy, and only process 0 writes
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
    self._tensorboard = SummaryWriter(os.path.join(workdir, 'tensorboard'))

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

  def close(self) -> None:
    if self._enabled:
      self._jsonl.close()
      self._tensorboard.close()
