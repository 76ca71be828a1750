"""Builds the model a config describes and its parameters: `build_model(config)` is the one
constructor of `CoCa`, `init_params` its initial parameters.

Every model family (CoCa, CLIP, SigLIP, Cap/CapPa, FILIP, fine-tuning classifiers) is one
`vlrep.models.coca.CoCa` with other settings; `build_model` reads `config.model`,
`config.data` and `config.loss`, checks every option against the values it takes (`POOLERS`,
`IMAGE_POOLS`, `DTYPES`, ...) and the combinations that go together, and passes them to the
towers (`models/vision.py`, `models/text.py`) and the poolers. `init_params` initialises it
on `example_batch` (the zero batch of the pipeline's shapes and dtypes, also what tracing and
planning use) and stores the parameters in `model.param_dtype`; `compute_dtype` turns a dtype
field into a dtype.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from vlrep.models.classifier import POOLS as CLASSIFIER_POOLS
from vlrep.models.coca import CONTRASTIVE_INPUTS, CoCa
from vlrep.models.layers import ACTIVATIONS, BLOCK_LAYOUTS, REMAT_MODES
from vlrep.models.text import TextDecoder
from vlrep.models.vision import VisionTransformer

# (temperature, bias) at initialisation for each `loss.contrastive_type`: CLIP's 0.07 and no
# bias; SigLIP's t' = log 10 (temperature 0.1) and b = -10, so that the many negatives'
# sigmoids start near zero.
TEMPERATURE_INIT = {'softmax': (0.07, None), 'sigmoid': (0.1, -10.0)}
POOLERS = ('cascade', 'parallel', 'single', 'none')
IMAGE_POOLS = ('attn', 'tok', 'avg')
# No float16: it needs loss scaling, which bfloat16's float32 exponent range does not.
DTYPES = ('float32', 'bfloat16')


def compute_dtype(name: str, field: str) -> jnp.dtype:
  """The dtype named by config field `field` (one of `DTYPES`)."""
  if name not in DTYPES:
    raise ValueError(f'{field}={name!r}; expected one of {DTYPES}')
  return jnp.dtype(name)


def build_model(config: ml_collections.ConfigDict, decode: bool = False) -> CoCa:
  """The CoCa module described by `config.model` (`decode=True` for cached decoding).

  The text length comes from `config.data.max_text_len`, so data and model always agree.
  `model.remat` and `model.scan_layers` apply to every transformer stack (see
  `layers.BlockStack`). Every field is read as given: a saved config of an earlier layout
  goes through `vlrep.config.migrate` first.
  `model.dtype` is the compute dtype of every layer (embeddings and losses stay float32);
  the parameters' dtype, `model.param_dtype`, is applied by `init_params`.
  """
  model = config.model
  vision, text = model.vision, model.text
  if model.pooler not in POOLERS:
    raise ValueError(f'model.pooler={model.pooler!r}; expected one of {POOLERS}')
  image_pool = model.image_pool
  if image_pool not in IMAGE_POOLS:
    raise ValueError(f'model.image_pool={image_pool!r}; expected one of {IMAGE_POOLS}')
  if (image_pool == 'attn') != (model.pooler in ('cascade', 'parallel')):
    raise ValueError(f"model.image_pool={image_pool!r} does not go with model.pooler="
                     f"{model.pooler!r}: 'attn' takes 'cascade' or 'parallel', 'tok' and "
                     f"'avg' take 'single' or 'none'")
  activation = model.activation
  if activation not in ACTIVATIONS:
    raise ValueError(f'model.activation={activation!r}; expected one of {ACTIVATIONS}')
  layout = text.multimodal_layout
  if layout not in BLOCK_LAYOUTS:
    raise ValueError(f'model.text.multimodal_layout={layout!r}; expected one of {BLOCK_LAYOUTS}')
  ln_eps = model.ln_eps
  remat, scan_layers = model.remat, bool(model.scan_layers)
  if remat not in REMAT_MODES:
    raise ValueError(f'model.remat={remat!r}; expected one of {REMAT_MODES}')
  dtype = compute_dtype(model.dtype, 'model.dtype')
  contrastive, parallel = bool(model.contrastive), config.loss.parallel_fraction > 0
  if not contrastive and (image_pool != 'attn' or not text.multimodal_layers):
    raise ValueError('model.contrastive=False (captioning-only) needs multimodal layers to '
                     "caption with and model.image_pool='attn' (its captioning pooler)")
  if parallel and contrastive:
    raise ValueError('loss.parallel_fraction > 0: parallel rows read only [MASK], so they have '
                     'no text embedding for a contrastive loss; it needs model.contrastive=False')
  similarity = config.loss.contrastive_similarity
  if similarity not in CONTRASTIVE_INPUTS:
    raise ValueError(f'loss.contrastive_similarity={similarity!r}; expected one of '
                     f'{tuple(CONTRASTIVE_INPUTS)}')
  token_similarity = similarity == 'token'
  if token_similarity and (not contrastive or model.pooler != 'none'):
    raise ValueError("loss.contrastive_similarity='token' (FILIP) compares the encoder's "
                     "patch tokens with the text's: it needs model.pooler='none' (no pooler "
                     'left unused) and a contrastive model')
  temperature_init, bias_init = TEMPERATURE_INIT[config.loss.contrastive_type]
  # The head exists only for the loss that trains it: other runs' trees stay as they were.
  num_classes = model.num_classes if config.loss.kind == 'classification' else 0
  if model.classifier_pool not in CLASSIFIER_POOLS:
    raise ValueError(f'model.classifier_pool={model.classifier_pool!r}; expected one of '
                     f'{CLASSIFIER_POOLS}')
  return CoCa(
      image_encoder=VisionTransformer(
          patch_size=vision['patch_size'], width=vision['width'], depth=vision['layers'],
          num_heads=vision['heads'], mlp_dim=vision['mlp_dim'],
          stem_channels=tuple(vision['stem_channels']), remat=remat, scan_layers=scan_layers,
          dtype=dtype, class_token=vision.class_token,
          ln_pre=vision.ln_pre, final_norm=vision.final_norm,
          patch_bias=vision.patch_bias, activation=activation,
          ln_eps=vision.ln_eps, layer_scale=vision.layer_scale,
          image_mean=tuple(vision.image_mean),
          image_std=tuple(vision.image_std)),
      text_decoder=TextDecoder(
          vocab_size=text['vocab_size'], max_len=config.data.max_text_len, width=text['width'],
          unimodal_layers=text['unimodal_layers'], multimodal_layers=text['multimodal_layers'],
          num_heads=text['heads'], mlp_dim=text['mlp_dim'], decode=decode, remat=remat,
          scan_layers=scan_layers, dtype=dtype, embed_cls=text.embed_cls,
          pool=text.pool, pad_mask=text.pad_mask,
          pad_id=text.pad_id, eos_id=text.eos_id,
          causal=text.causal, cls_position=text.cls_position,
          activation=activation, ln_eps=text.ln_eps,
          layer_scale=text.layer_scale,
          multimodal_heads=text.multimodal_heads,
          multimodal_mlp_dim=text.multimodal_mlp_dim, multimodal_layout=layout,
          multimodal_ln_eps=ln_eps, multimodal_layer_scale=text.multimodal_layer_scale,
          head_bias=text.head_bias, contrastive=contrastive, parallel=parallel),
      embed_dim=model['embed_dim'], captioning_queries=model['captioning_queries'],
      pooler=model['pooler'], temperature_init=temperature_init, logit_bias_init=bias_init,
      dtype=dtype, image_pool=image_pool, pooler_heads=model.pooler_heads,
      pooler_width=model.pooler_width,
      pooler_query_norm=model.pooler_query_norm,
      pooler_output_norm=model.pooler_output_norm, pooler_ln_eps=ln_eps,
      pooled_norm=model.pooled_norm,
      text_projection_bias=model.text_projection_bias,
      pooler_context_norm=model.pooler_context_norm,
      pooler_mlp_dim=model.pooler_mlp_dim,
      image_projection_layer=model.image_projection, contrastive=contrastive,
      token_similarity=token_similarity, num_classes=num_classes,
      classifier_pool=model.classifier_pool)


def example_batch(config: ml_collections.ConfigDict,
                  batch_size: int = 1) -> dict[str, jax.Array]:
  """Zero batch with the shapes and dtypes the pipeline produces (for init and tracing)."""
  size, frames = config.data.image_size, config.data.frames  # frames > 0: video clips
  return {'images': jnp.zeros((batch_size, *((frames,) if frames else ()), size, size, 3),
                              jnp.uint8),
          'tokens': jnp.zeros((batch_size, config.data.max_text_len), jnp.int32)}


def init_params(model: CoCa, config: ml_collections.ConfigDict, rng: jax.Array) -> Any:
  """Parameters boxed with their logical axis names (unbox with `nn.unbox`).

  Stored in `model.param_dtype` (float32 master weights by default, whatever `model.dtype`
  the layers compute in: they cast the parameters as they use them).
  """
  batch = example_batch(config)
  params = model.init(rng, batch['images'], batch['tokens'])['params']
  dtype = compute_dtype(config.model.param_dtype, 'model.param_dtype')
  return jax.tree.map(lambda x: x.astype(dtype) if x.dtype != dtype else x, params)
