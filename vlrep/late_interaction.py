"""FILIP's token-wise late interaction (Yao et al. 2021) as the contrastive similarity.

With `loss.contrastive_similarity='token'` an image is its L2-normalised patch embeddings
x_i [N, E] and a text its L2-normalised token embeddings y_j [T, E] with a validity mask
(padding is never one of its tokens). Similarity is taken per direction (FILIP eq. 4-5):
s^I_ij = mean_k max_r x_ik . y_jr (each patch's best text token: image->text) and
s^T_ij = mean_r max_k x_ik . y_jr over the valid r (each text token's best patch:
text->image). The softmax loss is the mean of the image->text cross-entropy over
scale * s^I and the text->image one over scale * s^T; the sigmoid loss the mean of the
SigLIP loss over each. `token_contrastive_loss` is the plain global reference and
`contrastive_loss` the same value under `jax.shard_map` over the caller's batch axes:
'gather' all-gathers the texts' tokens and computes this device's images x every text
(the text->image log-sum-exps reduced across devices), 'ring' passes text token blocks
round the devices by `ppermute` with online log-sum-exps, as `vlrep.losses` does for
vectors. The [images, patches, texts, text tokens] products are taken `chunk` texts at a
time and rematerialised, so a device holds one [local images, N, chunk, T] float32 block
(a few times over in the backward pass) whatever the number of texts; gather also holds the
global batch's text tokens ([B, T, E]), ring two local blocks of them
(benchmarks/token_similarity_memory.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from vlrep import losses
from vlrep.losses import global_rows, lse_fold, ring_perm

# What a padded text token scores against every patch: below any cosine similarity, so it
# never wins a max, and finite, so that a text with no valid token gives finite losses.
MASKED = -1e9


def _similarities(img: jax.Array, txt: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  sim = jnp.einsum('ike,jre->ijkr', img, txt, preferred_element_type=jnp.float32)
  sim = jnp.where(mask[None, :, None, :], sim, MASKED)
  valid = mask.astype(jnp.float32)
  per_token = jnp.sum(jnp.max(sim, axis=2) * valid[None], axis=2)
  return jnp.mean(jnp.max(sim, axis=3), axis=2), per_token / jnp.maximum(valid.sum(1), 1.0)


def token_similarities(img: jax.Array, txt: jax.Array, mask: jax.Array,
                       chunk: int = 0) -> tuple[jax.Array, jax.Array]:
  """(s^I, s^T), float32 [I, J] each, of image tokens [I, N, E] and text tokens [J, T, E]
  with validity mask bool [J, T]; `chunk` texts at a time (0 = all at once)."""
  texts = txt.shape[0]
  if not chunk or chunk >= texts:
    return _similarities(img, txt, mask)
  pad = -texts % chunk  # padded texts' columns are dropped
  txt = jnp.pad(txt, ((0, pad), (0, 0), (0, 0))).reshape(-1, chunk, *txt.shape[1:])
  mask = jnp.pad(mask, ((0, pad), (0, 0))).reshape(-1, chunk, mask.shape[1])
  # Rematerialised: the backward pass keeps each slice's inputs, not its products.
  block = jax.checkpoint(lambda xs: _similarities(img, *xs))
  return tuple(s.transpose(1, 0, 2).reshape(img.shape[0], -1)[:, :texts]
               for s in jax.lax.map(block, (txt, mask)))


def matched_similarities(img: jax.Array, txt: jax.Array,
                         mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The diagonal of `token_similarities` for matched rows: (s^I_ii, s^T_ii), float32 [B]."""
  sim = jnp.einsum('ike,ire->ikr', img, txt, preferred_element_type=jnp.float32)
  sim = jnp.where(mask[:, None, :], sim, MASKED)
  valid = mask.astype(jnp.float32)
  per_token = jnp.sum(jnp.max(sim, axis=1) * valid, axis=1)
  return jnp.mean(jnp.max(sim, axis=2), axis=1), per_token / jnp.maximum(valid.sum(1), 1.0)


def token_contrastive_loss(image_tokens: jax.Array, text_tokens: jax.Array,
                           text_mask: jax.Array, logit_scale: jax.Array,
                           logit_bias: jax.Array | None = None,
                           loss_type: str = 'softmax') -> jax.Array:
  """The global reference: FILIP's loss of matched rows (module docstring).

  image_tokens [B, N, E] and text_tokens [B, T, E], L2-normalised per token; text_mask bool
  [B, T] (False: padding); logit_bias: the sigmoid loss's scalar bias.
  """
  s_i2t, s_t2i = token_similarities(image_tokens, text_tokens, text_mask)
  batch = s_i2t.shape[0]
  if loss_type == 'sigmoid':
    signs = 2.0 * jnp.eye(batch, dtype=jnp.float32) - 1.0
    total = sum(-jnp.sum(jax.nn.log_sigmoid(signs * (logit_scale * s + logit_bias)))
                for s in (s_i2t, s_t2i))
    return total / (2 * batch)
  labels = jnp.arange(batch)
  xent = optax.softmax_cross_entropy_with_integer_labels
  return 0.5 * (xent(logit_scale * s_i2t, labels).mean() +
                xent(logit_scale * s_t2i.T, labels).mean())


def contrastive_loss(image_tokens: jax.Array, text_tokens: jax.Array, text_mask: jax.Array,
                     logit_scale: jax.Array, logit_bias: jax.Array | None = None, *,
                     loss_type: str = 'softmax', impl: str = 'gather',
                     mesh: jax.sharding.Mesh | None = None, batch_axes: tuple[str, ...] = (),
                     chunk: int = 0) -> jax.Array:
  """`token_contrastive_loss` of global arrays sharded over `batch_axes` of `mesh`, computed
  `impl`'s way (`vlrep.losses.contrastive_loss`'s options); `chunk`: texts per slice of the
  token products (0 = a whole block at once). Same value whatever impl, mesh and chunk, up
  to float rounding."""
  scalars = losses.check_options(loss_type, impl, logit_scale, logit_bias)
  if mesh is None or not batch_axes:
    return token_contrastive_loss(image_tokens, text_tokens, text_mask, *scalars,
                                  loss_type=loss_type)
  batch_axes = tuple(batch_axes)
  global_batch = image_tokens.shape[0]
  num_shards = losses.batch_shards(mesh, batch_axes, global_batch)
  local_loss = {('softmax', 'gather'): _softmax_gather, ('softmax', 'ring'): _softmax_ring,
                ('sigmoid', 'gather'): _sigmoid_gather, ('sigmoid', 'ring'): _sigmoid_ring}
  tokens_spec = P(batch_axes, None, None)
  total = jax.shard_map(
      functools.partial(local_loss[loss_type, impl], axes=batch_axes, num_shards=num_shards,
                        chunk=chunk),
      mesh=mesh, in_specs=(tokens_spec, tokens_spec, P(batch_axes, None)) +
      (P(),) * len(scalars), out_specs=P(),
  )(image_tokens, text_tokens, text_mask, *scalars)
  return total / (2 * global_batch)  # both directions are summed


# Per-device functions under shard_map: this device's rows of the tokens and mask, the
# replicated scalars; each returns the loss summed over both directions and the global batch.


def _softmax_gather(img, txt, mask, scale, *, axes, num_shards, chunk):
  del num_shards
  rows = global_rows(img.shape[0], axes)
  s_i2t, s_t2i = token_similarities(img, jax.lax.all_gather(txt, axes, tiled=True),
                                    jax.lax.all_gather(mask, axes, tiled=True), chunk)
  image_to_text = optax.softmax_cross_entropy_with_integer_labels(scale * s_i2t, rows)
  # A text's column of s^T spans every device's images: its log-sum-exp is reduced across
  # devices, which spares a second (global images x local texts) block of products.
  columns = scale * s_t2i
  column_max = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(columns, 0)), axes)
  column_lse = column_max + jnp.log(jax.lax.psum(jnp.sum(jnp.exp(columns - column_max), 0),
                                                 axes))
  positives = jnp.take_along_axis(columns, rows[:, None], axis=1)[:, 0]
  text_to_image = jnp.sum(column_lse[rows]) - jnp.sum(positives)
  return jax.lax.psum(jnp.sum(image_to_text) + text_to_image, axes)


def _sigmoid_sum(s_i2t, s_t2i, scale, bias, signs):
  return sum(-jnp.sum(jax.nn.log_sigmoid(signs * (scale * s + bias))) for s in (s_i2t, s_t2i))


def _sigmoid_gather(img, txt, mask, scale, bias, *, axes, num_shards, chunk):
  del num_shards
  rows = global_rows(img.shape[0], axes)
  s_i2t, s_t2i = token_similarities(img, jax.lax.all_gather(txt, axes, tiled=True),
                                    jax.lax.all_gather(mask, axes, tiled=True), chunk)
  signs = jnp.where(rows[:, None] == jnp.arange(s_i2t.shape[1]), 1.0, -1.0)
  return jax.lax.psum(_sigmoid_sum(s_i2t, s_t2i, scale, bias, signs), axes)


def _softmax_ring(img, txt, mask, scale, *, axes, num_shards, chunk):
  # As `losses._softmax_ring`: image rows' log-sum-exps (over s^I) stay home, each text
  # block carries its columns' (over s^T) round the ring.
  @jax.checkpoint
  def block(txt, mask, rows_acc, cols_acc):
    s_i2t, s_t2i = token_similarities(img, txt, mask, chunk)
    return lse_fold(scale * s_i2t, 1, rows_acc), lse_fold(scale * s_t2i, 0, cols_acc)

  rows_acc, cols_acc = block(txt, mask, None, None)

  def step(carry, _):
    rows_acc, txt_block, mask_block, cols_acc = carry
    txt_block, mask_block, cols_acc = jax.lax.ppermute((txt_block, mask_block, cols_acc), axes,
                                                       ring_perm(num_shards))
    rows_acc, cols_acc = block(txt_block, mask_block, rows_acc, cols_acc)
    return (rows_acc, txt_block, mask_block, cols_acc), None

  if num_shards > 1:
    (rows_acc, _, _, cols_acc), _ = jax.lax.scan(step, (rows_acc, txt, mask, cols_acc),
                                                 length=num_shards - 1)
    cols_acc = jax.lax.ppermute(cols_acc, axes, ring_perm(num_shards))
  pos_i2t, pos_t2i = (scale * s for s in matched_similarities(img, txt, mask))
  lse = lambda acc: acc[0] + jnp.log(acc[1])
  return jax.lax.psum(jnp.sum(lse(rows_acc) - pos_i2t) + jnp.sum(lse(cols_acc) - pos_t2i),
                      axes)


def _sigmoid_ring(img, txt, mask, scale, bias, *, axes, num_shards, chunk):
  @functools.partial(jax.checkpoint, static_argnums=(2,))
  def block(txt, mask, own):
    s_i2t, s_t2i = token_similarities(img, txt, mask, chunk)
    # The device's own text block holds its positives on the diagonal.
    signs = 2.0 * jnp.eye(s_i2t.shape[0]) - 1.0 if own else -1.0
    return _sigmoid_sum(s_i2t, s_t2i, scale, bias, signs)

  def step(carry, _):
    total, txt_block, mask_block = carry
    txt_block, mask_block = jax.lax.ppermute((txt_block, mask_block), axes,
                                             ring_perm(num_shards))
    return (total + block(txt_block, mask_block, False), txt_block, mask_block), None

  (total, _, _), _ = jax.lax.scan(step, (block(txt, mask, True), txt, mask),
                                  length=num_shards - 1)
  return jax.lax.psum(total, axes)
