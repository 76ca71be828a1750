"""The video evaluations' examples: clips loaded once per range and frame count, embedded once
per pooling.

`zeroshot_video` and `video_retrieval` entries (`vlrep/evals/entries.py`, run by
`vlrep/evals/suite.py`) read T uniformly sampled frames of each clip of a video source
(`vlrep.data.video.video_examples`); entries reading the same source, start and T share the
decoded clips (loaded for the largest range asked) and, per pooling, their embeddings
(`Pretrained.encode_video`), which are computed identically on every mesh and process.
`encode_video` is that method's body: clips in chunks of frames over the mesh.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import jax
import ml_collections
import numpy as np

from vlrep.data import pipeline, video
from vlrep.models.coca import VIDEO_POOLS, CoCa
from vlrep.parallel import sharding
from vlrep.parallel.chunks import in_chunks

if TYPE_CHECKING:
  from vlrep.pretrained import Pretrained

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


@functools.partial(jax.jit, static_argnums=(0, 3))
def _encode_video(model: CoCa, params: Any, videos: jax.Array, pool: str) -> jax.Array:
  return model.apply({'params': params}, videos, pool, method=CoCa.encode_video)


def encode_video(model: Pretrained, videos: np.ndarray, pool: str) -> np.ndarray:
  """`Pretrained.encode_video`: checked, then in chunks of about `model.batch_size` frames
  split over the mesh's batch axes (`vlrep.parallel.chunks.in_chunks`)."""
  videos = np.asarray(videos)
  if videos.ndim != 5 or videos.shape[-1] != 3:
    raise ValueError(f'videos must be [B, T, H, W, 3], got {videos.shape}')
  if pool not in VIDEO_POOLS:
    raise ValueError(f'pool={pool!r}; expected one of {VIDEO_POOLS}')
  if pool == 'attn' and model.config.model.image_pool != 'attn':
    raise ValueError(f"pool='attn' needs the attentional poolers (model.image_pool='attn'), "
                     f"not model.image_pool={model.config.model.image_pool!r}: use 'mean'")
  if model.token_similarity:
    raise ValueError('a FILIP model (token similarity) has no video vector')
  frames, devices = videos.shape[1], sharding.batch_devices(model.mesh)
  chunk = max(devices, model.batch_size // frames // devices * devices)

  def prepare(x):  # every frame as `encode_image` would take it
    flat = model.preprocess_images(x.reshape(-1, *x.shape[2:]))
    return flat.reshape(len(x), frames, *flat.shape[1:])
  return in_chunks(lambda x: _encode_video(model.model, model.params, x, pool), videos, chunk,
                   model._batch_sharding, prepare)  # pylint: disable=protected-access
