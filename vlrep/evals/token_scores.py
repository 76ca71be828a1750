"""FILIP's token-wise image-text scores for `vlrep.Pretrained` (zero-shot and retrieval).

`similarity_scores(model, images, tokens)` gives s^I and s^T (`vlrep.late_interaction`) of
every image with every text. The texts' token embeddings are computed once and kept on the
host (texts x their longest valid length x E float32s; positions that are padding in every
text are dropped); each image chunk's patch embeddings (`Pretrained.batch_size` images,
split over the mesh's batch axes) then meet them in replicated groups of at most 2^26
floats, `loss.token_similarity_chunk` texts at a time as in training, so a device holds one
[chunk / devices, patches, that many texts, tokens] float32 block of products. Only the
[images, texts] scores are kept, never the images' patch embeddings. The numbers do not
depend on the chunk sizes or the mesh beyond float rounding (tested).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from vlrep import late_interaction
from vlrep.models.coca import CoCa
from vlrep.parallel.chunks import host_inputs, in_chunks

if TYPE_CHECKING:
  from vlrep.pretrained import Pretrained

# Floats of text token embeddings per replicated group.
GROUP_FLOATS = 2 ** 26


@functools.partial(jax.jit, static_argnums=0)
def _encode_text_tokens(model: CoCa, params: Any, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
  return model.apply({'params': params}, tokens, method=CoCa.encode_text_tokens)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _token_scores(model: CoCa, params: Any, images: jax.Array, text_tokens: jax.Array,
                  text_mask: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
  image_tokens = model.apply({'params': params}, images, method=CoCa.encode_image_tokens)
  return late_interaction.token_similarities(image_tokens, text_tokens, text_mask, chunk)


def similarity_scores(model: Pretrained, images: Any,
                      tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(s^I, s^T), float32 [N_images, N_texts] each, of `images` (as `Pretrained.encode_image`
  takes them) and int32 token rows [N_texts, L]."""
  text_tokens, text_mask = in_chunks(
      lambda x: _encode_text_tokens(model.model, model.params, x), tokens, model.batch_size,
      model._batch_sharding)  # pylint: disable=protected-access
  keep = text_mask.any(0)  # positions that are padding in every text score nothing
  text_tokens, text_mask = text_tokens[:, keep], text_mask[:, keep]
  group = min(len(tokens), max(1, GROUP_FLOATS // text_tokens[0].size))
  padded = -(-len(tokens) // group) * group  # whole groups only: one compiled shape
  pad = ((0, padded - len(tokens)),)
  text_tokens = np.pad(text_tokens, pad + ((0, 0), (0, 0)))
  text_mask = np.pad(text_mask, pad + ((0, 0),))
  replicated = jax.sharding.NamedSharding(model.mesh, jax.sharding.PartitionSpec())
  groups = [tuple(jax.make_array_from_process_local_data(replicated, x[start:start + group])
                  for x in (text_tokens, text_mask)) for start in range(0, padded, group)]
  chunk = model.config.loss.token_similarity_chunk

  def run(images):
    scores = [_token_scores(model.model, model.params, images, *g, chunk) for g in groups]
    return tuple(jnp.concatenate(s, axis=1) for s in zip(*scores))
  image_to_text, text_to_image = in_chunks(run, host_inputs(images), model.batch_size,
                                           model._batch_sharding,  # pylint: disable=protected-access
                                           model.preprocess_images)
  return image_to_text[:, :len(tokens)], text_to_image[:, :len(tokens)]
