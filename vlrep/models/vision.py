"""ViT image encoder: images -> patch tokens [batch, patches, width].

No class token by default: CoCa pools the patch tokens with attentional poolers
(`models/coca.py`). `class_token` prepends CLIP's learned class token (position 0) and
`ln_pre` normalises the embeddings before the blocks, as OpenAI CLIP / open_clip ViTs do;
`final_norm=False` leaves the output tokens unnormalised (for layouts that normalise after
pooling).
uint8 images are normalised here, so every caller (train step, evaluators, the Python API)
gets the same preprocessing (`image_mean` / `image_std`, CLIP's unless a checkpoint has its
own, e.g. SigLIP's 0.5 / 0.5); float images are taken as already normalised.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlrep.models.layers import DEFAULT_LN_EPS, BlockStack, Dtype, layer_norm, logical

# CLIP's RGB statistics: the convention most image-text checkpoints share.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize_images(images: jax.Array, mean=IMAGE_MEAN, std=IMAGE_STD) -> jax.Array:
  """uint8 [B, H, W, 3] -> float32 standardised; float input is returned unchanged."""
  if images.dtype != jnp.uint8:
    return images
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean)) / jnp.asarray(std)


class VisionTransformer(nn.Module):
  """Patch embedding + learned position embedding + pre-LN blocks + final LayerNorm.

  `stem_channels` replaces the patchify layer by that many 3x3 stride-2 convolutions (then a
  projection over the remaining patch), as in "Early Convolutions Help Transformers See
  Better" (Xiao et al. 2021): small ViTs then learn shapes from far fewer examples. Empty
  (the default) is the plain ViT of the CoCa paper. `remat` and `scan_layers`: see
  `BlockStack` (blocks are `block_<i>`, or one scanned `block`).
  """
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  stem_channels: tuple[int, ...] = ()
  remat: str = 'none'
  scan_layers: bool = False
  dtype: Dtype = jnp.float32
  class_token: bool = False
  ln_pre: bool = False
  final_norm: bool = True
  patch_bias: bool = True
  activation: str = 'gelu_tanh'
  ln_eps: float = DEFAULT_LN_EPS
  layer_scale: float = 0.0
  image_mean: tuple[float, ...] = IMAGE_MEAN
  image_std: tuple[float, ...] = IMAGE_STD

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    x = normalize_images(images, self.image_mean, self.image_std).astype(self.dtype)
    p = self.patch_size
    if x.shape[1] % p or x.shape[2] % p:
      raise ValueError(f'image size {x.shape[1:3]} is not divisible by patch_size {p}')
    if p % 2 ** len(self.stem_channels):
      raise ValueError(f'patch_size {p} is not divisible by 2^{len(self.stem_channels)} '
                       f'(one stride-2 convolution per stem_channels entry)')
    for i, channels in enumerate(self.stem_channels):
      x = nn.Conv(channels, (3, 3), strides=(2, 2), padding='SAME', dtype=self.dtype,
                  name=f'stem_conv_{i}',
                  kernel_init=logical(nn.initializers.he_normal(), None, None, None, None),
                  bias_init=logical(nn.initializers.zeros, None))(x)
      # No normalisation here: a per-pixel LayerNorm would discard colour.
      x = nn.gelu(x)
    p //= 2 ** len(self.stem_channels)
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype,
                name='patch_embed', use_bias=self.patch_bias,
                kernel_init=logical(nn.initializers.lecun_normal(), None, None, None, 'embed'),
                bias_init=logical(nn.initializers.zeros, 'embed'))(x)
    x = x.reshape(x.shape[0], -1, self.width)
    if self.class_token:
      cls = self.param('cls_embed', logical(nn.initializers.normal(0.02), 'embed'), (self.width,))
      cls = jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, self.width))
      x = jnp.concatenate([cls, x], axis=1)
    pos = self.param('pos_embed', logical(nn.initializers.normal(0.02), None, 'embed'),
                     x.shape[1:])
    x = x + pos.astype(self.dtype)
    if self.ln_pre:
      x = layer_norm('ln_pre', self.dtype, self.ln_eps)(x)
    x = BlockStack('block', self.depth, remat=self.remat, scan_layers=self.scan_layers,
                   num_heads=self.num_heads, mlp_dim=self.mlp_dim, dtype=self.dtype,
                   activation=self.activation, ln_eps=self.ln_eps,
                   layer_scale=self.layer_scale)(x)
    return layer_norm('ln_final', self.dtype, self.ln_eps)(x) if self.final_norm else x
