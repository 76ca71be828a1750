"""Causal text decoder: a unimodal half that embeds the caption, a multimodal half that captions.

The unimodal layers read the caption with a learned [CLS] embedding appended at the END
(position L); its output is the text representation. They never attend to padding (PAD = 0),
so the [CLS] output does not depend on how much padding follows the caption. The
multimodal layers continue from the unimodal token outputs, cross-attend to the image
tokens and predict the next token. Both halves are causal, so one pass serves the
contrastive and the captioning loss. With `decode=True` both halves run one token at a
time from a KV cache (see `vlrep/models/decode.py`). Each half is a `BlockStack`: blocks
`unimodal_<i>` / `multimodal_<i>`, or with `scan_layers` one scanned `unimodal` / `multimodal`.

Options for other layouts (defaults: the above), used to load open_clip's CLIP and CoCa:
- `embed_cls=False`: no [CLS]; the text vector is one token's output picked by `pool`
  ('argmax': the highest token id, CLIP's EOT; 'eos': the first `eos_id`; 'first'; 'last'),
  and the token features handed to the multimodal half are then normalised by `ln_cls`
  too (open_clip's convention). With [CLS], `pool` must be 'cls'.
- `pad_mask`: which keys the unimodal half may not attend: 'pad' (tokens equal to `pad_id`),
  'shifted' (open_clip CoCa's mask: key j is hidden when token j-1 is padding, the [CLS]
  key never; it needs [CLS]) or 'none'. `causal=False` makes the unimodal half
  bidirectional. `cls_position`: the [CLS] position embedding is the table's last row
  ('last') or the row after the caption ('after_tokens', open_clip's); they agree at
  full length.
- `multimodal_heads` / `multimodal_mlp_dim` (0: as the unimodal half), `multimodal_layout`
  (`layers.Block`), `head_bias`, and the activation, LayerNorm epsilons and LayerScale.

Captioning-only models (CapPa, Tschannen et al. 2023): `contrastive=False` builds no text
vector, so no [CLS] embedding, [CLS] position or `ln_cls` exist (no dead parameters); and
`parallel=True` adds a learned [MASK] embedding for parallel prediction: the rows that
`encode` / `caption_features` are told are parallel (`parallel_rows`, [B] bool) read [MASK]
at every position instead of their tokens, and attend to every position (no causal mask),
which leaks nothing since every input is the same [MASK]; the other rows stay causal and
teacher-forced. Decoding is always autoregressive.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlrep.data.tokenizer import PAD_ID
from vlrep.models.layers import (DEFAULT_LN_EPS, BlockStack, Dtype, default_kernel_init,
                                 float32_dot_general, layer_norm, logical)

TEXT_POOLS = ('cls', 'argmax', 'eos', 'first', 'last')
PAD_MASKS = ('pad', 'shifted', 'none')
CLS_POSITIONS = ('last', 'after_tokens')


def parallel_rows(batch_size: int, fraction: float) -> np.ndarray:
  """[batch_size] bool: round(fraction * batch_size) rows marked for parallel prediction.

  Spread evenly (row i when floor((i + 1) n / B) > floor(i n / B)) rather than the first n,
  so that every contiguous block of rows, i.e. each device's and each process's share of
  the global batch, holds its share of them (+-1): a process reading its own data shards
  does not always train them one way. Fixed rather than drawn per step: the count is exact
  every step, the state needs no rng, and the pipeline's shuffle already decides which
  examples land on which rows.
  """
  n = round(fraction * batch_size)
  i = np.arange(batch_size)
  return (i + 1) * n // batch_size > i * n // batch_size


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
  embed_cls: bool = True
  pool: str = 'cls'
  pad_mask: str = 'pad'
  pad_id: int = PAD_ID
  eos_id: int = 2
  causal: bool = True
  cls_position: str = 'last'
  activation: str = 'gelu_tanh'
  ln_eps: float = DEFAULT_LN_EPS
  layer_scale: float = 0.0
  multimodal_heads: int = 0
  multimodal_mlp_dim: int = 0
  multimodal_layout: str = 'fused'
  multimodal_ln_eps: float = DEFAULT_LN_EPS
  multimodal_layer_scale: float = 0.0
  head_bias: bool = True
  contrastive: bool = True  # False: no text vector ([CLS], ln_cls) for captioning-only models
  parallel: bool = False  # a [MASK] embedding for parallel-prediction rows

  @property
  def _cls(self) -> bool:
    return self.embed_cls and self.contrastive

  def _check_options(self):
    for name, value, allowed in (('pool', self.pool, TEXT_POOLS),
                                 ('pad_mask', self.pad_mask, PAD_MASKS),
                                 ('cls_position', self.cls_position, CLS_POSITIONS)):
      if value not in allowed:
        raise ValueError(f'text {name}={value!r}; expected one of {allowed}')
    if self.embed_cls != (self.pool == 'cls'):
      raise ValueError(f'text pool={self.pool!r} with embed_cls={self.embed_cls}: the [CLS] '
                       "output is the text vector exactly when pool is 'cls'")
    if self.pad_mask == 'shifted' and not self.embed_cls:
      raise ValueError("text pad_mask='shifted' needs embed_cls=True")
    if not self.contrastive and not self.embed_cls:
      raise ValueError('text embed_cls=False pools a text vector, which a captioning-only '
                       'model (model.contrastive=False) has none of: keep embed_cls=True')

  def setup(self):
    self._check_options()
    self.token_embed = nn.Embed(
        self.vocab_size, self.width, dtype=self.dtype,
        embedding_init=logical(nn.initializers.normal(0.02), 'vocab', 'embed'))
    # max_len caption positions + 1 for [CLS].
    self.pos_embed = self.param('pos_embed', logical(nn.initializers.normal(0.01), None, 'embed'),
                                (self.max_len + int(self._cls), self.width))
    if self._cls:
      self.cls_embed = self.param('cls_embed', logical(nn.initializers.normal(0.02), 'embed'),
                                  (self.width,))
    if self.parallel:
      self.mask_embed = self.param('mask_embed', logical(nn.initializers.normal(0.02), 'embed'),
                                   (self.width,))
    stack = dict(remat=self.remat, scan_layers=self.scan_layers, decode=self.decode,
                 dtype=self.dtype, activation=self.activation)
    self.unimodal = BlockStack('unimodal', self.unimodal_layers, num_heads=self.num_heads,
                               mlp_dim=self.mlp_dim, ln_eps=self.ln_eps,
                               layer_scale=self.layer_scale, **stack)
    if self.contrastive:
      self.ln_cls = layer_norm('ln_cls', self.dtype, self.ln_eps)
    self.multimodal = BlockStack(
        'multimodal', self.multimodal_layers, cross_attention=True,
        num_heads=self.multimodal_heads or self.num_heads,
        mlp_dim=self.multimodal_mlp_dim or self.mlp_dim, ln_eps=self.multimodal_ln_eps,
        layer_scale=self.multimodal_layer_scale, layout=self.multimodal_layout, **stack)
    self.ln_final = layer_norm('ln_final', self.dtype, self.multimodal_ln_eps)
    if self.decode:  # position of the next token; advanced by `decode_step`
      self.position = self.variable('cache', 'position', lambda: jnp.zeros((), jnp.int32))
    self.output_head = nn.Dense(self.vocab_size, dtype=self.dtype, name='output_head',
                                use_bias=self.head_bias, dot_general=float32_dot_general,
                                kernel_init=logical(default_kernel_init, 'embed', 'vocab'),
                                bias_init=logical(nn.initializers.zeros, 'vocab'))

  def encode(self, tokens: jax.Array,
             parallel_rows: jax.Array | None = None) -> tuple[jax.Array | None, jax.Array]:
    """tokens int32 [B, L] -> ([CLS] features [B, W] after LayerNorm, token features [B, L, W]).

    Without [CLS] (`embed_cls=False`) the first output is the `pool`ed token's features;
    without a text vector (`contrastive=False`) it is None. `parallel_rows` ([B] bool, needs
    `parallel`): those rows read [MASK] everywhere and attend to every position.
    """
    batch, length = tokens.shape
    if length > self.max_len:
      raise ValueError(f'{length} tokens exceed the model max_len {self.max_len}')
    x = self.token_embed(tokens)
    if parallel_rows is not None:
      x = jnp.where(parallel_rows[:, None, None], self.mask_embed.astype(x.dtype), x)
    valid = tokens != self.pad_id
    if self._cls:
      cls = jnp.broadcast_to(self.cls_embed.astype(x.dtype), (batch, 1, self.width))
      x = jnp.concatenate([x, cls], axis=1)
      last = self.pos_embed[-1:] if self.cls_position == 'last' else \
          self.pos_embed[length:length + 1]
      x = x + jnp.concatenate([self.pos_embed[:length], last]).astype(x.dtype)
      always = jnp.ones((batch, 1), bool)
      valid = jnp.concatenate([always, valid] if self.pad_mask == 'shifted' else
                              [valid, always], axis=1)
    else:
      x = x + self.pos_embed[:length].astype(x.dtype)
    if self.pad_mask == 'none':
      valid = jnp.ones_like(valid)
    mask = valid[:, None, None, :]
    if self.causal:
      mask = mask & nn.make_causal_mask(valid, dtype=bool)
    mask = _unmask_parallel(mask, parallel_rows)
    x = self.unimodal(x, mask=mask)
    if not self.contrastive:
      return None, x
    if self.embed_cls:
      return self.ln_cls(x[:, -1]), x[:, :-1]
    x = self.ln_cls(x)
    if self.pool in ('argmax', 'eos'):
      index = jnp.argmax(tokens if self.pool == 'argmax' else tokens == self.eos_id, axis=-1)
    else:
      index = jnp.full((batch,), 0 if self.pool == 'first' else length - 1)
    return jnp.take_along_axis(x, index[:, None, None], axis=1)[:, 0], x

  def caption_logits(self, token_features: jax.Array, image_tokens: jax.Array) -> jax.Array:
    """Unimodal token features [B, T, W] + image tokens [B, N, W] -> next-token logits [B, T, V]."""
    return self.logits(self.caption_features(token_features, image_tokens))

  def caption_features(self, token_features: jax.Array, image_tokens: jax.Array,
                       parallel_rows: jax.Array | None = None) -> jax.Array:
    """`caption_logits` before the output head: [B, T, W], what `logits` maps to the vocabulary.

    The train step's chunked caption loss applies the head a slice at a time, so the
    [B, T, V] logits never exist at once. `parallel_rows` as in `encode` (the same rows).
    """
    mask = nn.make_causal_mask(jnp.ones(token_features.shape[:2], bool), dtype=bool)
    mask = _unmask_parallel(mask, parallel_rows)
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
    if not self.causal:
      raise ValueError('a bidirectional unimodal half (text causal=False) cannot decode '
                       'token by token')
    x = self.token_embed(token)
    x = x + jax.lax.dynamic_slice_in_dim(self.pos_embed, self.position.value, 1).astype(x.dtype)
    if not self.is_initializing():
      self.position.value += 1
    x = self.unimodal(x)
    if not self.embed_cls:  # as `encode` hands token features to the multimodal half
      x = self.ln_cls(x)
    x = self.multimodal(x, context=image_tokens)
    return self.logits(self.ln_final(x))[:, 0]


def _unmask_parallel(mask: jax.Array, parallel_rows: jax.Array | None) -> jax.Array:
  """Attention mask [B, 1, Q, K] with every key visible to the parallel rows: their inputs
  are all [MASK], so seeing later positions (padding too) tells them nothing of the caption."""
  return mask if parallel_rows is None else mask | parallel_rows[:, None, None, None]
