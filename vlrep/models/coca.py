"""The CoCa model: image encoder, attentional poolers, text decoder, projections, temperature.

`build_model(config)` (`vlrep/models/build.py`) is the one constructor. CLIP/ALIGN is the
same model with zero multimodal layers (and caption weight 0 in the loss); captioning-only
and the other families are config changes too. The methods `encode_image`, `encode_text`,
`__call__` and `decode_step` are what the train step, the evaluators and `vlrep.Pretrained`
apply.

Image pooling (`pooler`, `image_pool`): the paper's two attentional poolers ('cascade' or
'parallel', `image_pool='attn'`); or one pooler of `captioning_queries` queries whose first
output ('tok') or the mean of the others ('avg') is the contrastive vector and the others
the caption tokens ('single', open_clip's CoCa); or no pooler ('none', CLIP: the class token
or the mean patch token). `pooled_norm` adds a LayerNorm on the pooled vector. The
poolers' heads, width, norms and residual MLP are options too (`layers.AttentionalPooler`;
SigLIP's head is a parallel pooler with no context norm and an MLP), and
`image_projection=False` drops the image projection (SigLIP: the pooled vector is the
embedding).

Captioning-only models (Cap / CapPa, Tschannen et al. 2023; `contrastive=False`) have no
contrastive pooler, projections, temperature or [CLS] (none of those parameters exist, so
none sits unused in the optimizer or checkpoints): their image vector, what `encode_image`
returns for probes, is the mean of the image encoder's output tokens, the captioner's
representation with nothing trained on top; `encode_text` raises, as there is no text vector.
With `text_decoder.parallel` the train step marks rows for parallel prediction
(`parallel_rows`, see `vlrep/models/text.py`).

FILIP's token similarity (`token_similarity`, `loss.contrastive_similarity='token'`,
`vlrep.late_interaction`; needs `pooler='none'`): `encode_image_tokens` gives one embedding
per patch (the encoder's patch tokens through the pooled vector's norm and projection) and
`encode_text_tokens` one per text token (the unimodal outputs through `ln_cls` and the text
projection) plus the [CLS] output's, with a mask that is False on padding only: [CLS] is a
token of every text (it reads the whole caption, and keeps an empty text non-empty), BOS and
EOS are tokens as the caption's words are. The same projections serve the vectors, so the
parameters are CLIP's (with `image_pool='avg'`) and `encode_image` / `encode_text` still give
the mean-patch and [CLS] vectors (for probes).
"""

from __future__ import annotations

import math
import flax.linen as nn
import jax
import jax.numpy as jnp

from vlrep.models.layers import (DEFAULT_LN_EPS, AttentionalPooler, Dtype, default_kernel_init,
                                 float32_dot_general, layer_norm, logical)
from vlrep.models.classifier import ClassifierHead
from vlrep.models.text import TextDecoder
from vlrep.models.vision import VisionTransformer

MAX_LOGIT_SCALE = 100.0
# The bound is kept on the parameter (`clamp_temperature`, after every update, as open_clip
# does) rather than in the forward pass, where exp(min(log_scale, bound)) has a zero gradient
# past the bound and a parameter that crossed it could never come back.
MAX_LOG_LOGIT_SCALE = math.log(MAX_LOGIT_SCALE)
# What `CoCa.temperature` returns and `__call__` outputs: the contrastive loss's learned
# scale, and its bias for sigmoid (SigLIP) losses.
TEMPERATURE_KEYS = ('logit_scale', 'logit_bias')
# The embeddings `__call__` and `embed` output for the contrastive loss, by similarity
# (`loss.contrastive_similarity`): vectors, or FILIP's per-token embeddings and text mask.
CONTRASTIVE_INPUTS = {'global': ('image_emb', 'text_emb'),
                      'token': ('image_tokens', 'text_tokens', 'text_mask')}


def l2_normalize(x: jax.Array) -> jax.Array:
  return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


class CoCa(nn.Module):
  """Contrastive captioner. Images uint8/float [B, H, W, 3] (or clips [B, T, H, W, 3], see
  `_image_tokens`); tokens int32 [B, L]."""
  image_encoder: VisionTransformer
  text_decoder: TextDecoder
  embed_dim: int
  captioning_queries: int
  pooler: str = 'cascade'  # 'cascade': contrastive pooler reads the captioning pooler's output
  temperature_init: float = 0.07
  logit_bias_init: float | None = None  # None: no bias (softmax losses)
  dtype: Dtype = jnp.float32
  image_pool: str = 'attn'  # 'attn' | 'tok' | 'avg', see the module docstring
  pooler_heads: int = 0  # 0: the image encoder's
  pooler_width: int = 0  # the poolers' query/output width; 0: the image encoder's
  pooler_query_norm: bool = False
  pooler_output_norm: bool = True
  pooler_ln_eps: float = DEFAULT_LN_EPS
  pooled_norm: bool = False
  text_projection_bias: bool = False
  pooler_context_norm: bool = True
  pooler_mlp_dim: int = 0
  image_projection_layer: bool = True
  contrastive: bool = True  # False: captioning-only, see the module docstring
  token_similarity: bool = False  # FILIP's per-token embeddings, see the module docstring
  num_classes: int = 0  # > 0: a classification head (`vlrep.models.classifier`)
  classifier_pool: str = 'embedding'

  def setup(self):
    heads = self.pooler_heads or self.image_encoder.num_heads
    pooler = lambda queries: AttentionalPooler(
        queries, heads, self.dtype, width=self.pooler_width or None,
        query_norm=self.pooler_query_norm, output_norm=self.pooler_output_norm,
        ln_eps=self.pooler_ln_eps, context_norm=self.pooler_context_norm,
        mlp_dim=self.pooler_mlp_dim, activation=self.image_encoder.activation)
    self.captioning_pooler = pooler(self.captioning_queries)
    if self.num_classes:
      self.classifier = ClassifierHead(self.num_classes, self.classifier_pool, heads,
                                       self.dtype, self.pooler_ln_eps)
    if not self.contrastive:
      return
    self.contrastive_pooler = pooler(1)
    if self.pooled_norm:
      self.image_pooled_norm = layer_norm('image_pooled_norm', self.dtype,
                                          self.image_encoder.ln_eps)
    projection = lambda bias=False: nn.Dense(
        self.embed_dim, use_bias=bias, dtype=self.dtype, dot_general=float32_dot_general,
        kernel_init=logical(default_kernel_init, 'embed', None),
        bias_init=logical(nn.initializers.zeros, None))
    if self.image_projection_layer:
      self.image_projection = projection()
    self.text_projection = projection(self.text_projection_bias)
    self.logit_scale_log = self.param(
        'logit_scale', logical(nn.initializers.constant(math.log(1 / self.temperature_init))), ())
    if self.logit_bias_init is not None:
      self.logit_bias = self.param('logit_bias',
                                   logical(nn.initializers.constant(self.logit_bias_init)), ())

  def logit_scale(self) -> jax.Array:
    """exp(learned log-scale); the train step keeps it <= 100 (`clamp_temperature`)."""
    return jnp.exp(self.logit_scale_log)

  def temperature(self) -> dict[str, jax.Array]:
    """{'logit_scale'} and, for sigmoid losses, {'logit_bias'}: the loss's learned scalars."""
    if not self.contrastive:
      return {}
    out = {'logit_scale': self.logit_scale()}
    if self.logit_bias_init is not None:
      out['logit_bias'] = self.logit_bias
    return out

  def encode_image(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """-> (L2-normalised embedding [B, E], captioning tokens [B, queries, W] or None).

    Captioning-only models: the embedding is the encoder tokens' mean, [B, W].
    """
    return self._pool(self._image_tokens(images))

  def _image_tokens(self, images: jax.Array) -> jax.Array:
    """Encoder tokens [B, N, W] of images [B, H, W, 3]; of clips [B, T, H, W, 3], every
    frame's N tokens, concatenated: [B, T * N, W]. So training on clips (`data.frames`) pools
    what `encode_video(pool='attn')` pools."""
    if images.ndim == 4:
      return self.image_encoder(images)
    batch, frames = images.shape[:2]
    tokens = self.image_encoder(images.reshape(batch * frames, *images.shape[2:]))
    return tokens.reshape(batch, frames * tokens.shape[1], tokens.shape[2])

  def encode_video(self, videos: jax.Array, pool: str = 'attn') -> jax.Array:
    """L2-normalised video embeddings [B, E] of frames [B, T, H, W, 3].

    Every frame goes through the image encoder. `pool='attn'` (the paper's video recipe):
    the tokens of all T frames, concatenated along the token axis [B, T * N, W], go through
    the model's own poolers as one image's would; `'mean'`: the mean of the T normalised
    frame embeddings, renormalised. Frames carry no temporal position, so 'attn' sees
    where a shape is in each frame but not in which frame.
    """
    if pool not in VIDEO_POOLS:
      raise ValueError(f'video pool={pool!r}; expected one of {VIDEO_POOLS}')
    if pool == 'attn':
      return self._pool(self._image_tokens(videos))[0]
    batch, frames = videos.shape[:2]
    frame_emb = self.encode_image(videos.reshape(batch * frames, *videos.shape[2:]))[0]
    return l2_normalize(jnp.mean(frame_emb.reshape(batch, frames, -1), axis=1))

  def _pool(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    if not self.contrastive:
      return l2_normalize(jnp.mean(tokens, axis=1).astype(jnp.float32)), \
          self.captioning_pooler(tokens)
    caption_tokens = None  # CLIP-like models (no multimodal layers) have no captioning pooler
    if self.image_pool == 'attn':
      if self.text_decoder.multimodal_layers:
        caption_tokens = self.captioning_pooler(tokens)
      source = caption_tokens if self.pooler == 'cascade' and caption_tokens is not None else \
          tokens
      pooled = self.contrastive_pooler(source)[:, 0]
    else:
      if self.pooler == 'single':
        tokens = self.captioning_pooler(tokens)
      # The first token is special (class token or first query) unless it is a patch token.
      special = self.pooler == 'single' or self.image_encoder.class_token
      rest = tokens[:, 1:] if special else tokens
      pooled = tokens[:, 0] if self.image_pool == 'tok' else jnp.mean(rest, axis=1)
      if self.text_decoder.multimodal_layers:
        caption_tokens = rest
    if self.pooled_norm:
      pooled = self.image_pooled_norm(pooled)
    if self.image_projection_layer:
      pooled = self.image_projection(pooled)
    return l2_normalize(pooled.astype(jnp.float32)), caption_tokens

  def classify(self, images: jax.Array) -> jax.Array:
    """float32 logits [B, num_classes] of the classification head."""
    tokens = self.image_encoder(images)
    embedding = self._pool(tokens)[0] if self.classifier_pool == 'embedding' else None
    return self.classifier(embedding, tokens)

  def _patch_embeddings(self, tokens: jax.Array) -> jax.Array:
    if self.image_encoder.class_token:
      tokens = tokens[:, 1:]
    if self.pooled_norm:
      tokens = self.image_pooled_norm(tokens)
    if self.image_projection_layer:
      tokens = self.image_projection(tokens)
    return l2_normalize(tokens.astype(jnp.float32))

  def encode_image_tokens(self, images: jax.Array) -> jax.Array:
    """L2-normalised patch embeddings [B, N, E] (token similarity)."""
    return self._patch_embeddings(self.image_encoder(images))

  def _text_token_embeddings(self, tokens: jax.Array, cls: jax.Array,
                             features: jax.Array) -> tuple[jax.Array, jax.Array]:
    valid = tokens != self.text_decoder.pad_id
    if self.text_decoder.embed_cls:  # without [CLS], `features` are normalised already
      features = jnp.concatenate([self.text_decoder.ln_cls(features), cls[:, None]], axis=1)
      valid = jnp.concatenate([valid, jnp.ones_like(valid[:, :1])], axis=1)
    return l2_normalize(self.text_projection(features).astype(jnp.float32)), valid

  def encode_text_tokens(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(L2-normalised token embeddings [B, T, E], bool mask [B, T], False on padding) for
    token similarity; T is L + 1 with [CLS] (last)."""
    cls, features = self.text_decoder.encode(tokens)
    return self._text_token_embeddings(tokens, cls, features)

  def encode_text(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """-> (L2-normalised embedding [B, E], unimodal token features [B, L, W])."""
    if not self.contrastive:
      raise ValueError('a captioning-only model (model.contrastive=False) has no text '
                       'embedding: zero-shot and retrieval need a contrastive one')
    cls, token_features = self.text_decoder.encode(tokens)
    return l2_normalize(self.text_projection(cls).astype(jnp.float32)), token_features

  def __call__(self, images: jax.Array, tokens: jax.Array, caption_features: bool = False,
               parallel_rows: jax.Array | None = None) -> dict[str, jax.Array]:
    """Everything the losses need. `caption_logits[:, t]` predicts `tokens[:, t + 1]`.

    With `caption_features=True` the output has `caption_features` [B, L-1, W] instead of
    `caption_logits`: the features before the output head (`text_decoder.output_head`), for
    a loss that applies the head in chunks (`losses.chunked_caption_loss`). Captioning-only
    models output no embeddings or temperature. `parallel_rows` ([B] bool, captioning-only
    models with `text_decoder.parallel`): rows predicted in parallel from [MASK] inputs.
    """
    encoded = self._image_tokens(images)
    image_emb, caption_tokens = self._pool(encoded)
    cls, token_features = self.text_decoder.encode(tokens, parallel_rows)
    out = dict(self.temperature())
    if self.num_classes:
      out['class_logits'] = self.classifier(image_emb, encoded)
    if self.contrastive:
      if parallel_rows is not None:
        raise ValueError('parallel rows read no text, so they have no text embedding: '
                         'parallel prediction needs a captioning-only model')
      if self.token_similarity:
        text_tokens, text_mask = self._text_token_embeddings(tokens, cls, token_features)
        out.update(image_tokens=self._patch_embeddings(encoded), text_tokens=text_tokens,
                   text_mask=text_mask)
      else:
        text_emb = l2_normalize(self.text_projection(cls).astype(jnp.float32))
        out.update(image_emb=image_emb, text_emb=text_emb)
    if self.text_decoder.multimodal_layers:
      features = self.text_decoder.caption_features(token_features[:, :-1], caption_tokens,
                                                    parallel_rows)
      if caption_features:
        out['caption_features'] = features
      else:
        out['caption_logits'] = self.text_decoder.logits(features)
    return out

  def embed(self, images: jax.Array, tokens: jax.Array) -> dict[str, jax.Array]:
    """What the contrastive loss reads, by its `CONTRASTIVE_INPUTS` names."""
    if self.token_similarity:
      text_tokens, text_mask = self.encode_text_tokens(tokens)
      return {'image_tokens': self.encode_image_tokens(images), 'text_tokens': text_tokens,
              'text_mask': text_mask}
    return {'image_emb': self.encode_image(images)[0], 'text_emb': self.encode_text(tokens)[0]}

  def decode_step(self, token: jax.Array, caption_tokens: jax.Array | None) -> jax.Array:
    """One decoding step from the KV cache: token [B, 1] -> logits [B, V]."""
    return self.text_decoder.decode_step(token, caption_tokens)

  def next_token_logits(self, images: jax.Array, tokens: jax.Array) -> jax.Array:
    """Teacher-forced logits [B, L, V] at every position: `[:, t]` predicts `tokens[:, t + 1]`
    (the last position predicts the token after the given ones)."""
    caption_tokens = self.encode_image(images)[1]
    token_features = self.text_decoder.encode(tokens)[1]
    return self.text_decoder.caption_logits(token_features, caption_tokens)


def clamp_temperature(params: dict) -> dict:
  """`params` with the learned log-scale clamped to <= ln 100 (applied after each update)."""
  if 'logit_scale' not in params:  # captioning-only
    return params
  return {**params, 'logit_scale': jnp.minimum(params['logit_scale'], MAX_LOG_LOGIT_SCALE)}


VIDEO_POOLS = ('attn', 'mean')  # `CoCa.encode_video`
