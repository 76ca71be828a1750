"""The video evaluations' examples: clips loaded once per range and frame count, embedded once
per pooling.

`zeroshot_video` and `video_retrieval` entries (`vlrep/evals/entries.py`, run by
`vlrep/evals/suite.py`) read T uniformly sampled frames of each clip of a video source
(`vlrep.data.video.video_examples`); entries reading the same source, start and T share the
decoded clips (loaded for the largest range asked) and, per pooling, their embeddings
(`Pretrained.encode_video`), which are computed identically on every mesh and process.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from vlrep.data import pipeline, video

TYPES = ('zeroshot_video', 'video_retrieval')

_Key = tuple[str, int, int]  # (source string, start, frames)


class VideoExamples:
  """Video eval examples by (source, start, frames), and their embeddings by pooling."""

  def __init__(self, config: ml_collections.ConfigDict):
    self._config = config
    self._requested: dict[_Key, int] = {}
    self._loaded: dict[_Key, dict[str, Any]] = {}
    self._embedded: dict[tuple[_Key, str], np.ndarray] = {}

  def _key(self, entry: Any) -> _Key:
    return entry.data or self._config.data.eval, int(entry.start), int(entry.frames)

  def _count(self, entry: Any) -> int:
    return int(entry.num_examples or self._config.data.eval_examples)

  def request(self, entry: Any) -> None:
    key = self._key(entry)
    self._requested[key] = max(self._requested.get(key, 0), self._count(entry))

  def load(self) -> None:
    for (spec, start, frames), count in self._requested.items():
      if (spec, start, frames) not in self._loaded:
        self._loaded[spec, start, frames] = video.video_examples(self._config, spec, count,
                                                                 start, frames)

  def get(self, entry: Any, label_key: str = '') -> dict[str, Any]:
    """The entry's examples (`video_examples`' keys), with `label` and `class_names` if
    `label_key`."""
    loaded, count = self._loaded[self._key(entry)], self._count(entry)
    out = {k: v if k == 'zero_shot_tasks' else v[:count] for k, v in loaded.items()}
    if label_key:
      out.update(pipeline.select_label(out, label_key, self._key(entry)[0]))
    return out

  def embeddings(self, model: Any, entry: Any) -> np.ndarray:
    """`model.encode_video` of the entry's clips with its `pool`; valid until `clear`."""
    key = (self._key(entry), entry.pool)
    if key not in self._embedded:
      self._embedded[key] = model.encode_video(self._loaded[key[0]]['videos'], entry.pool)
    return self._embedded[key][:self._count(entry)]

  def clear(self) -> None:
    self._embedded.clear()
