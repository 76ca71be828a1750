"""Losses: symmetric softmax contrastive loss over the global batch and caption cross-entropy.

Inputs are global `jax.Array`s inside `jax.jit`; the contrastive logits are computed for the
whole global batch, so every example sees every other one as a negative whatever the mesh
(XLA inserts the gathers). Each function returns a scalar float32 mean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from vlrep.data.tokenizer import PAD_ID


def softmax_contrastive_loss(image_emb: jax.Array, text_emb: jax.Array,
                             logit_scale: jax.Array) -> jax.Array:
  """Mean of image->text and text->image cross-entropy; matched pairs share a row index.

  image_emb, text_emb: [B, E], L2-normalised. logit_scale: scalar (1 / temperature).
  """
  logits = logit_scale * jnp.einsum('ie,te->it', image_emb, text_emb,
                                    preferred_element_type=jnp.float32)
  labels = jnp.arange(logits.shape[0])
  image_to_text = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  text_to_image = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels)
  return 0.5 * (image_to_text.mean() + text_to_image.mean())


def caption_loss(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """Next-token cross-entropy averaged over non-padding targets of the whole batch.

  logits: [B, L-1, V] where logits[:, t] predicts tokens[:, t + 1]; tokens: int32 [B, L].
  """
  targets = tokens[:, 1:]
  weights = (targets != PAD_ID).astype(jnp.float32)
  xent = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  return jnp.sum(xent * weights) / jnp.maximum(jnp.sum(weights), 1.0)
