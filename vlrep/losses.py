"""Losses: contrastive (softmax or sigmoid) over the global batch and caption cross-entropy.

`contrastive_loss` is what the train step calls. Every example sees every other example of
the global batch as a negative, whatever the mesh. With a mesh it runs under `jax.shard_map`
over the batch axes the caller names (this module knows no mesh axis names), in one of two
ways:

* `gather`: each device all-gathers the other side's embeddings and computes its local x
  global block of logits. Simple and fast, but memory grows with the global batch.
* `ring`: text blocks travel round the ring of batch devices by `ppermute`; each device only
  ever holds a local x local block of logits, and the log-sum-exps are accumulated online.
  Memory stays flat as the global batch (and the number of devices) grows.

`softmax_contrastive_loss` and `sigmoid_contrastive_loss` are the plain global references.
`caption_loss` is the captioning cross-entropy of given logits; `chunked_caption_loss` the
same value from the features before the output head, a few positions at a time. Each
function returns a scalar float32 mean.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P


CONTRASTIVE_TYPES = ('softmax', 'sigmoid')
CONTRASTIVE_IMPLS = ('gather', 'ring')


def _logits(x: jax.Array, y: jax.Array, logit_scale: jax.Array,
            logit_bias: jax.Array | None = None) -> jax.Array:
  logits = logit_scale * jnp.einsum('ie,te->it', x, y, preferred_element_type=jnp.float32)
  return logits if logit_bias is None else logits + logit_bias


def softmax_contrastive_loss(image_emb: jax.Array, text_emb: jax.Array,
                             logit_scale: jax.Array) -> jax.Array:
  """Mean of image->text and text->image cross-entropy; matched pairs share a row index.

  image_emb, text_emb: [B, E], L2-normalised. logit_scale: scalar (1 / temperature).
  """
  logits = _logits(image_emb, text_emb, logit_scale)
  labels = jnp.arange(logits.shape[0])
  image_to_text = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  text_to_image = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels)
  return 0.5 * (image_to_text.mean() + text_to_image.mean())


def sigmoid_contrastive_loss(image_emb: jax.Array, text_emb: jax.Array,
                             logit_scale: jax.Array, logit_bias: jax.Array) -> jax.Array:
  """SigLIP (Zhai et al. 2023): -(1/B) sum_ij log_sigmoid(z_ij (scale x_i.y_j + bias)).

  z_ij is +1 for matched pairs (i == j) and -1 otherwise; shapes as in the softmax loss.
  """
  logits = _logits(image_emb, text_emb, logit_scale, logit_bias)
  signs = 2.0 * jnp.eye(logits.shape[0], dtype=jnp.float32) - 1.0
  return -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / logits.shape[0]


def check_options(loss_type: str, impl: str, logit_scale: jax.Array,
                  logit_bias: jax.Array | None) -> tuple[jax.Array, ...]:
  """The loss's scalars, (scale,) or (scale, bias) for sigmoid; a bad option raises naming
  its config field."""
  if loss_type not in CONTRASTIVE_TYPES:
    raise ValueError(f'loss.contrastive_type={loss_type!r}: expected one of {CONTRASTIVE_TYPES}')
  if impl not in CONTRASTIVE_IMPLS:
    raise ValueError(f'loss.contrastive_impl={impl!r}: expected one of {CONTRASTIVE_IMPLS}')
  if loss_type == 'sigmoid' and logit_bias is None:
    raise ValueError('loss.contrastive_type=sigmoid needs a logit_bias')
  return (logit_scale, logit_bias) if loss_type == 'sigmoid' else (logit_scale,)


def batch_shards(mesh: jax.sharding.Mesh, batch_axes: tuple[str, ...], global_batch: int) -> int:
  """The devices of `batch_axes`, which must divide `global_batch`."""
  num_shards = math.prod(mesh.shape[axis] for axis in batch_axes)
  if global_batch % num_shards:
    raise ValueError(f'contrastive batch {global_batch} does not divide over the '
                     f'{num_shards} devices of the batch axes {batch_axes}')
  return num_shards


def contrastive_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array,
                     logit_bias: jax.Array | None = None, *, loss_type: str = 'softmax',
                     impl: str = 'gather', mesh: jax.sharding.Mesh | None = None,
                     batch_axes: tuple[str, ...] = ()) -> jax.Array:
  """Contrastive loss of global [B, E] embeddings sharded over `batch_axes` of `mesh`.

  loss_type: 'softmax' (CLIP) or 'sigmoid' (SigLIP, needs the scalar `logit_bias`).
  impl: 'gather' or 'ring' (see the module docstring); ignored without a mesh (or batch
  axes), where the global reference is computed. Mesh axes outside `batch_axes` hold
  replicas. The value does not depend on impl or mesh, up to float rounding.
  """
  scalars = check_options(loss_type, impl, logit_scale, logit_bias)
  sigmoid = loss_type == 'sigmoid'
  if mesh is None or not batch_axes:
    reference = sigmoid_contrastive_loss if sigmoid else softmax_contrastive_loss
    return reference(image_emb, text_emb, *scalars)

  batch_axes = tuple(batch_axes)
  global_batch = image_emb.shape[0]
  num_shards = batch_shards(mesh, batch_axes, global_batch)
  local_loss = {('softmax', 'gather'): _softmax_gather, ('softmax', 'ring'): _softmax_ring,
                ('sigmoid', 'gather'): _sigmoid_gather, ('sigmoid', 'ring'): _sigmoid_ring}
  emb_spec = P(batch_axes, None)
  total = jax.shard_map(
      functools.partial(local_loss[loss_type, impl], axes=batch_axes, num_shards=num_shards),
      mesh=mesh, in_specs=(emb_spec, emb_spec) + (P(),) * len(scalars), out_specs=P(),
  )(image_emb, text_emb, *scalars)
  # The softmax total sums both directions.
  return total / (global_batch if sigmoid else 2 * global_batch)


# The per-device functions below run inside shard_map: arguments are this device's [b, E]
# rows and the replicated scalars; each returns the loss summed over the global batch.


def global_rows(local_batch: int, axes: tuple[str, ...]) -> jax.Array:
  """Global indices of this device's rows: all_gather(tiled) and P(axes) share the order."""
  return jax.lax.axis_index(axes) * local_batch + jnp.arange(local_batch)


def _softmax_gather(img, txt, scale, *, axes, num_shards):
  del num_shards
  labels = global_rows(img.shape[0], axes)
  all_img = jax.lax.all_gather(img, axes, tiled=True)
  all_txt = jax.lax.all_gather(txt, axes, tiled=True)
  xent = optax.softmax_cross_entropy_with_integer_labels
  image_to_text = xent(_logits(img, all_txt, scale), labels)
  text_to_image = xent(_logits(txt, all_img, scale), labels)
  return jax.lax.psum(jnp.sum(image_to_text) + jnp.sum(text_to_image), axes)


def _sigmoid_gather(img, txt, scale, bias, *, axes, num_shards):
  del num_shards
  rows = global_rows(img.shape[0], axes)
  logits = _logits(img, jax.lax.all_gather(txt, axes, tiled=True), scale, bias)
  signs = jnp.where(rows[:, None] == jnp.arange(logits.shape[1]), 1.0, -1.0)
  return jax.lax.psum(-jnp.sum(jax.nn.log_sigmoid(signs * logits)), axes)


def lse_fold(logits: jax.Array, axis: int,
              acc: tuple[jax.Array, jax.Array] | None) -> tuple[jax.Array, jax.Array]:
  """Folds logsumexp(logits, axis) into a running (max, sum of exp(x - max)) pair."""
  # The max only keeps exp() in range and the log-sum-exp does not depend on it, so it needs
  # no gradient (which also spares autodiff the ties of max).
  block_max = jax.lax.stop_gradient(jnp.max(logits, axis))
  if acc is None:
    running_max, running_sum = block_max, 0.0
  else:
    running_max, running_sum = acc
    block_max = jnp.maximum(running_max, block_max)
    running_sum = running_sum * jnp.exp(running_max - block_max)
  return block_max, running_sum + jnp.sum(jnp.exp(logits - jnp.expand_dims(block_max, axis)),
                                          axis)


# Rematerialised, so that autodiff of the ring keeps the travelling blocks and accumulators
# of each step (local x E) rather than its local x local logits.
@jax.checkpoint
def _softmax_block(img, txt, scale, rows_acc, cols_acc):
  logits = _logits(img, txt, scale)
  return lse_fold(logits, 1, rows_acc), lse_fold(logits, 0, cols_acc)


@functools.partial(jax.checkpoint, static_argnums=(4,))
def _sigmoid_block(img, txt, scale, bias, own):
  logits = _logits(img, txt, scale, bias)
  if own:  # The device's own text block holds its positives on the diagonal.
    return -jnp.sum(jax.nn.log_sigmoid((2.0 * jnp.eye(logits.shape[0]) - 1.0) * logits))
  return -jnp.sum(jax.nn.log_sigmoid(-logits))


def ring_perm(num_shards: int) -> list[tuple[int, int]]:
  return [(i, (i + 1) % num_shards) for i in range(num_shards)]


def _softmax_ring(img, txt, scale, *, axes, num_shards):
  # Image rows' log-sum-exps stay home; each text block carries its columns' log-sum-exps
  # with it, so one trip round the ring serves both directions.
  rows_acc, cols_acc = _softmax_block(img, txt, scale, None, None)

  def step(carry, _):
    rows_acc, txt_block, cols_acc = carry
    txt_block, cols_acc = jax.lax.ppermute((txt_block, cols_acc), axes, ring_perm(num_shards))
    rows_acc, cols_acc = _softmax_block(img, txt_block, scale, rows_acc, cols_acc)
    return (rows_acc, txt_block, cols_acc), None

  if num_shards > 1:
    (rows_acc, _, cols_acc), _ = jax.lax.scan(step, (rows_acc, txt, cols_acc),
                                              length=num_shards - 1)
    # The text block is not needed any more: only its columns' accumulator goes home.
    cols_acc = jax.lax.ppermute(cols_acc, axes, ring_perm(num_shards))
  positives = scale * jnp.einsum('ie,ie->i', img, txt, preferred_element_type=jnp.float32)
  lse = lambda acc: acc[0] + jnp.log(acc[1])
  return jax.lax.psum(jnp.sum(lse(rows_acc) - positives) + jnp.sum(lse(cols_acc) - positives),
                      axes)


def _sigmoid_ring(img, txt, scale, bias, *, axes, num_shards):
  total = _sigmoid_block(img, txt, scale, bias, True)

  def step(carry, _):
    total, txt_block = carry
    txt_block = jax.lax.ppermute(txt_block, axes, ring_perm(num_shards))
    return (total + _sigmoid_block(img, txt_block, scale, bias, False), txt_block), None

  (total, _), _ = jax.lax.scan(step, (total, txt), length=num_shards - 1)
  return jax.lax.psum(total, axes)


def caption_loss(logits: jax.Array, tokens: jax.Array, pad_id: int) -> jax.Array:
  """Next-token cross-entropy averaged over non-padding targets of the whole batch.

  logits: [B, L-1, V] where logits[:, t] predicts tokens[:, t + 1]; tokens: int32 [B, L];
  targets equal to `pad_id` (the model's `model.text.pad_id`) weigh nothing.
  """
  targets = tokens[:, 1:]
  weights = (targets != pad_id).astype(jnp.float32)
  xent = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  return jnp.sum(xent * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def chunked_caption_loss(features: jax.Array, tokens: jax.Array,
                         head: Callable[[Any, jax.Array], jax.Array], head_params: Any,
                         chunk: int, pad_id: int) -> jax.Array:
  """`caption_loss(head(head_params, features), tokens, pad_id)` without the [B, L-1, V]
  logits.

  features: [B, L-1, W], the caption features before the output head; head: (head_params,
  features [B, c, W]) -> logits [B, c, V] (any dtype; the loss is taken in float32); chunk:
  positions per slice. A scan applies the head, log-softmax and target gather to `chunk`
  positions at a time. Under differentiation each slice also takes its gradients at once
  (a fused linear cross-entropy: the loss's gradient is known as soon as its softmax is),
  so the backward pass only scales the stored feature and head gradients: the float32
  [B, L-1, V] logits, their softmax and gradient -- the largest buffers of a step at a
  realistic vocabulary -- never exist, and the head runs no more FLOPs than unchunked.
  Positions stay whole for every example, so a batch-sharded input stays sharded.
  """
  if chunk < 1:
    raise ValueError(f'loss.caption_chunk={chunk}: the chunked loss needs >= 1 position')
  targets = tokens[:, 1:]
  batch, length = targets.shape
  if features.shape[:2] != (batch, length):
    raise ValueError(f'caption features {features.shape} do not match the {length} targets '
                     f'of tokens {tokens.shape}')
  weights = (targets != pad_id).astype(jnp.float32)
  count = jnp.maximum(jnp.sum(weights), 1.0)
  chunk = min(chunk, length)
  slices = -(-length // chunk)
  pad = slices * chunk - length  # padded positions weigh nothing
  features = jnp.pad(features, ((0, 0), (0, pad), (0, 0)))
  targets, weights = (jnp.pad(x, ((0, 0), (0, pad))) for x in (targets, weights))
  features = features.reshape(batch, slices, chunk, -1).swapaxes(0, 1)
  targets, weights = (x.reshape(batch, slices, chunk).swapaxes(0, 1) for x in (targets, weights))
  return _sliced_xent_sum(head, features, head_params, targets, weights) / count


def _slice_xent_sum(head, params, x: jax.Array, targets: jax.Array,
                    weights: jax.Array) -> jax.Array:
  xent = optax.softmax_cross_entropy_with_integer_labels(head(params, x).astype(jnp.float32),
                                                         targets)
  return jnp.sum(xent * weights)


# A custom VJP because JAX's own would either keep every slice's logits for the backward
# pass or (rematerialised) run the head's forward a second time.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sliced_xent_sum(head, features: jax.Array, params: Any, targets: jax.Array,
                     weights: jax.Array) -> jax.Array:
  """Summed weighted cross-entropy of slices features [S, B, c, W] with targets and
  weights [S, B, c]."""
  def accumulate(total, xs):
    return total + _slice_xent_sum(head, params, *xs), None

  total, _ = jax.lax.scan(accumulate, jnp.zeros((), jnp.float32), (features, targets, weights))
  return total


def _sliced_xent_sum_forward(head, features, params, targets, weights):
  def accumulate(carry, xs):
    total, params_grad = carry
    x, t, w = xs
    value, vjp = jax.vjp(lambda x, p: _slice_xent_sum(head, p, x, t, w), x, params)
    x_grad, slice_params_grad = vjp(jnp.ones_like(value))
    params_grad = jax.tree.map(lambda acc, g: acc + g.astype(jnp.float32), params_grad,
                               slice_params_grad)
    return (total + value, params_grad), x_grad

  # Summed over slices in float32 whatever the parameters' dtype.
  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  (total, params_grad), features_grad = jax.lax.scan(
      accumulate, (jnp.zeros((), jnp.float32), zeros), (features, targets, weights))
  params_grad = jax.tree.map(lambda g, p: g.astype(p.dtype), params_grad, params)
  return total, (features_grad, params_grad)


def _sliced_xent_sum_backward(head, residuals, grad):
  features_grad, params_grad = residuals
  scale = lambda g: (g * grad).astype(g.dtype)
  return scale(features_grad), jax.tree.map(scale, params_grad), None, None


_sliced_xent_sum.defvjp(_sliced_xent_sum_forward, _sliced_xent_sum_backward)
