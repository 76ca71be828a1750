"""Causal text decoder: a unimodal half that embeds the caption, a multimodal half that captions.

The unimodal layers read the caption with a learned [CLS] embedding appended at the END
(position L); its output is the text representation. They never attend to padding (PAD = 0),
so the [CLS] output does not depend on how much padding follows the caption. The
multimodal layers continue from the unimodal token outputs, cross-attend to the image
tokens and predict the next token. Both halves are causal, so one pass serves the
contrastive and the captioning loss. With `decode=True` both halves run one token at a
time from a KV cache (see `vlrep/decode.py`). Each half is a `BlockStack`: blocks
`unimodal_<i>` / `multimodal_<i>`, or with `scan_layers` one scanned `unimodal` / `multimodal`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlrep.data.tokenizer import PAD_ID
from vlrep.models.layers import BlockStack, Dtype, default_kernel_init, layer_norm, logical


class TextDecoder(nn.Module):
  """Token embedding, unimodal blocks (+[CLS]), multimodal blocks, output head."""
  vocab_size: int
  max_len: int
  width: int
  unimodal_layers: int
  multimodal_layers: int
  num_heads: int
  mlp_dim: int
  decode: bool = False
  remat: str = 'none'
  scan_layers: bool = False
  dtype: Dtype = jnp.float32

  def setup(self):
    self.token_embed = nn.Embed(
        self.vocab_size, self.width, dtype=self.dtype,
        embedding_init=logical(nn.initializers.normal(0.02), 'vocab', 'embed'))
    # max_len caption positions + 1 for [CLS].
    self.pos_embed = self.param('pos_embed', logical(nn.initializers.normal(0.01), None, 'embed'),
                                (self.max_len + 1, self.width))
    self.cls_embed = self.param('cls_embed', logical(nn.initializers.normal(0.02), 'embed'),
                                (self.width,))
    stack = dict(remat=self.remat, scan_layers=self.scan_layers, num_heads=self.num_heads,
                 mlp_dim=self.mlp_dim, decode=self.decode, dtype=self.dtype)
    self.unimodal = BlockStack('unimodal', self.unimodal_layers, **stack)
    self.ln_cls = layer_norm('ln_cls', self.dtype)
    self.multimodal = BlockStack('multimodal', self.multimodal_layers, cross_attention=True,
                                 **stack)
    self.ln_final = layer_norm('ln_final', self.dtype)
    if self.decode:  # position of the next token; advanced by `decode_step`
      self.position = self.variable('cache', 'position', lambda: jnp.zeros((), jnp.int32))
    self.output_head = nn.Dense(self.vocab_size, dtype=self.dtype, name='output_head',
                                kernel_init=logical(default_kernel_init, 'embed', 'vocab'),
                                bias_init=logical(nn.initializers.zeros, 'vocab'))

  def encode(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """tokens int32 [B, L] -> ([CLS] features [B, W] after LayerNorm, token features [B, L, W])."""
    batch, length = tokens.shape
    if length > self.max_len:
      raise ValueError(f'{length} tokens exceed the model max_len {self.max_len}')
    x = self.token_embed(tokens)
    cls = jnp.broadcast_to(self.cls_embed.astype(x.dtype), (batch, 1, self.width))
    x = jnp.concatenate([x, cls], axis=1)
    x = x + jnp.concatenate([self.pos_embed[:length], self.pos_embed[-1:]]).astype(x.dtype)
    valid = jnp.concatenate([tokens != PAD_ID, jnp.ones((batch, 1), bool)], axis=1)
    mask = nn.make_causal_mask(valid, dtype=bool) & valid[:, None, None, :]
    x = self.unimodal(x, mask=mask)
    return self.ln_cls(x[:, -1]), x[:, :-1]

  def caption_logits(self, token_features: jax.Array, image_tokens: jax.Array) -> jax.Array:
    """Unimodal token features [B, T, W] + image tokens [B, N, W] -> next-token logits [B, T, V]."""
    return self.logits(self.caption_features(token_features, image_tokens))

  def caption_features(self, token_features: jax.Array, image_tokens: jax.Array) -> jax.Array:
    """`caption_logits` before the output head: [B, T, W], what `logits` maps to the vocabulary.

    The train step's chunked caption loss applies the head a slice at a time, so the
    [B, T, V] logits never exist at once.
    """
    mask = nn.make_causal_mask(jnp.ones(token_features.shape[:2], bool), dtype=bool)
    x = self.multimodal(token_features, mask=mask, context=image_tokens)
    return self.ln_final(x)

  def logits(self, features: jax.Array) -> jax.Array:
    """The output head: features [..., W] -> next-token logits [..., V]."""
    return self.output_head(features)

  def decode_step(self, token: jax.Array, image_tokens: jax.Array | None) -> jax.Array:
    """One autoregressive step (decode=True): token int32 [B, 1] -> logits [B, V].

    `image_tokens` is given on the first step (it fills the cross-attention caches) and None
    afterwards. Positions advance with the cache, so no position argument is needed.
    """
    x = self.token_embed(token)
    x = x + jax.lax.dynamic_slice_in_dim(self.pos_embed, self.position.value, 1).astype(x.dtype)
    if not self.is_initializing():
      self.position.value += 1
    x = self.unimodal(x)
    x = self.multimodal(x, context=image_tokens)
    return self.output_head(self.ln_final(x))[:, 0]
