"""ViT: token shapes, uint8 normalisation, patch-size errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlrep.models.vision import IMAGE_MEAN, IMAGE_STD, VisionTransformer, normalize_images


def test_patch_tokens_shape():
  vit = VisionTransformer(patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32)
  images = jnp.zeros((2, 16, 12, 3), jnp.uint8)
  params = vit.init(jax.random.key(0), images)
  assert vit.apply(params, images).shape == (2, 4 * 3, 16)


def test_uint8_is_normalised_and_float_passes_through():
  images = jnp.full((1, 2, 2, 3), 255, jnp.uint8)
  expected = (1.0 - np.asarray(IMAGE_MEAN)) / np.asarray(IMAGE_STD)
  np.testing.assert_allclose(normalize_images(images)[0, 0, 0], expected, rtol=1e-6)
  floats = jnp.ones((1, 2, 2, 3), jnp.float32)
  assert normalize_images(floats) is floats


def test_image_size_must_divide_by_patch():
  vit = VisionTransformer(patch_size=5, width=16, depth=1, num_heads=2, mlp_dim=32)
  with pytest.raises(ValueError, match='patch_size'):
    vit.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3), jnp.uint8))


def test_clip_layout_class_token_ln_pre_no_patch_bias():
  vit = VisionTransformer(patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32,
                          class_token=True, ln_pre=True, patch_bias=False, final_norm=False)
  images = jnp.zeros((2, 16, 12, 3), jnp.float32)
  params = nn.unbox(jax.eval_shape(lambda: vit.init(jax.random.key(0), images)))['params']
  assert {'cls_embed', 'ln_pre'} <= set(params) and 'ln_final' not in params
  assert set(params['patch_embed']) == {'kernel'}
  assert params['pos_embed'].shape == (1 + 4 * 3, 16)
  out = jax.eval_shape(lambda p: vit.apply({'params': p}, images), params)
  assert out.shape == (2, 1 + 4 * 3, 16)
