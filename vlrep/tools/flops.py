"""Analytic model FLOPs of one train step, per component, from the config alone.

`train_flops_per_step(config)` is what `vlrep.bench`, `vlrep.plan` and the training log
(`train/mfu`) divide by the step time and the chips' peak (`PEAK_TFLOPS`) for MFU.
Counted: every matrix multiplication of the model (one multiply-add = 2 FLOPs) -- the image
encoder (stem and patch convolutions, attention projections, attention scores and weighted
sums, MLPs), the attentional poolers the model runs, the unimodal and the multimodal text
decoder (self- and cross-attention), the LM head, the embedding projections and the B x B
contrastive similarities (FILIP's token by token); a captioning-only model has no
contrastive parts to count. Causal self-attention is counted by its non-masked half (T(T+1)/2
query-key pairs of T^2). Not counted: element-wise work (LayerNorm, GELU, softmax,
residual sums, the loss) and rematerialisation, as usual for MFU ("model FLOPs", Chowdhery et
al. 2022). Training counts the forward pass three times (forward, and a backward pass
that costs two forwards).
"""

from __future__ import annotations

import ml_collections

TRAIN_FORWARD_MULTIPLE = 3

# Dense bf16 peak TFLOP/s per chip, matched against `device.device_kind` in this order (first
# substring wins: 'TPU v5 lite' is v5e, plain 'TPU v5' is v5p). GPUs: SXM parts.
PEAK_TFLOPS = (
    ('TPU v6 lite', 918.0),  # v6e (Trillium)
    ('TPU v5 lite', 197.0),  # v5e
    ('TPU v5p', 459.0),
    ('TPU v5', 459.0),  # v5p reports itself as 'TPU v5'
    ('TPU v4', 275.0),
    ('H200', 989.0),
    ('H100', 989.0),
    ('A100', 312.0),
)


def table_peak_tflops(device_kind: str) -> float | None:
  """Per-chip bf16 dense peak for a known accelerator, else None."""
  return next((peak for name, peak in PEAK_TFLOPS if name.lower() in device_kind.lower()), None)


def _attention(queries: int, keys: int, width: int, pairs: int | None = None) -> int:
  """One attention layer: q/k/v/out projections plus scores and weighted sum (per example)."""
  pairs = queries * keys if pairs is None else pairs
  return 2 * width * width * (2 * queries + 2 * keys) + 2 * 2 * pairs * width


def _causal_pairs(length: int) -> int:
  return length * (length + 1) // 2


def _mlp(tokens: int, width: int, mlp_dim: int) -> int:
  return 2 * 2 * tokens * width * mlp_dim


def forward_flops_per_example(config: ml_collections.ConfigDict,
                              causal_half: bool = True) -> dict[str, int]:
  """Forward FLOPs of one example by component (the contrastive logits are per batch).

  `causal_half=False` counts causal self-attention in full (T^2 pairs), as XLA does.
  """
  model, size = config.model, config.data.image_size
  vision, text = model.vision, model.text
  w, p = vision.width, vision.patch_size

  # Image encoder: optional stride-2 3x3 conv stem, patchify convolution, blocks.
  image, channels, side = 0, 3, size
  for out_channels in vision.stem_channels:
    side //= 2
    image += 2 * side * side * 9 * channels * out_channels
    channels = out_channels
  patch = p // 2 ** len(vision.stem_channels)
  patches = (size // p) ** 2
  image += 2 * patches * patch * patch * channels * w
  image += vision.layers * (_attention(patches, patches, w) + _mlp(patches, w, vision.mlp_dim))

  has_caption = text.multimodal_layers > 0
  contrastive = model.contrastive
  token_similarity = contrastive and config.loss.contrastive_similarity == 'token'
  attn_pool = model.image_pool == 'attn'
  queries = model.captioning_queries
  # The captioning pooler runs for the decoder's cross-attention (captioning-only models,
  # or CoCa's attentional pooling) and, with pooler 'single', as the contrastive pool too.
  runs_caption_pooler = (has_caption and (attn_pool or not contrastive) or
                         contrastive and model.pooler == 'single')
  caption_pooler = _attention(queries, patches, w) if runs_caption_pooler else 0
  cascade = model.pooler == 'cascade' and has_caption
  contrastive_pooler = _attention(1, queries if cascade else patches, w) \
      if contrastive and attn_pool else 0

  # Text: the unimodal half reads L tokens (+ [CLS] in contrastive models); the multimodal
  # half reads L - 1 tokens (the last token predicts nothing) and cross-attends to the
  # captioning pooler's tokens.
  tw, length = text.width, config.data.max_text_len
  def causal(t):
    return _causal_pairs(t) if causal_half else t * t
  uni_len = length + 1 if contrastive and text.embed_cls else length
  multi_len = length - 1
  unimodal = text.unimodal_layers * (_attention(uni_len, uni_len, tw, causal(uni_len)) +
                                     _mlp(uni_len, tw, text.mlp_dim))
  multimodal = text.multimodal_layers * (
      _attention(multi_len, multi_len, tw, causal(multi_len)) +
      _attention(multi_len, queries, tw) + _mlp(multi_len, tw, text.mlp_dim)) if has_caption else 0
  lm_head = 2 * multi_len * tw * text.vocab_size if has_caption else 0
  # FILIP projects every patch and text token; the others one vector per side.
  image_vectors, text_vectors = (patches, uni_len) if token_similarity else (1, 1)
  projections = 2 * (image_vectors * w + text_vectors * tw) * model.embed_dim \
      if contrastive else 0
  return {'image_encoder': image, 'captioning_pooler': caption_pooler,
          'contrastive_pooler': contrastive_pooler, 'text_unimodal': unimodal,
          'text_multimodal': multimodal, 'lm_head': lm_head, 'projections': projections}


def contrastive_logits_flops(config: ml_collections.ConfigDict, batch: int) -> int:
  """The B x B similarities: one dot product per pair, or FILIP's patches x text tokens."""
  model = config.model
  if not model.contrastive:
    return 0
  pair = model.embed_dim
  if config.loss.contrastive_similarity == 'token':
    patches = (config.data.image_size // model.vision.patch_size) ** 2
    pair *= patches * (config.data.max_text_len + int(model.text.embed_cls))
  return 2 * batch * batch * pair


def forward_flops(config: ml_collections.ConfigDict, batch_size: int | None = None,
                  causal_half: bool = True) -> dict[str, int]:
  """Forward FLOPs of one global batch by component, plus `contrastive_logits` and `total`."""
  batch = config.batch_size if batch_size is None else batch_size
  parts = {k: v * batch for k, v in forward_flops_per_example(config, causal_half).items()}
  parts['contrastive_logits'] = contrastive_logits_flops(config, batch)
  parts['total'] = sum(parts.values())
  return parts


def train_flops_per_step(config: ml_collections.ConfigDict,
                         batch_size: int | None = None) -> dict[str, int]:
  """Model FLOPs of one train step (forward x3) by component, plus `total`."""
  return {k: TRAIN_FORWARD_MULTIPLE * v for k, v in forward_flops(config, batch_size).items()}
