"""Building blocks: attention masking, attentional pooler shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from vlrep.models.layers import Attention, AttentionalPooler


def test_attention_mask_blocks_masked_keys():
  layer = Attention(num_heads=2)
  x = jax.random.normal(jax.random.key(0), (1, 4, 8))
  params = layer.init(jax.random.key(1), x)
  mask = jnp.array([True, True, False, False])[None, None, None, :]
  out = layer.apply(params, x, mask=mask)
  # Changing masked positions changes their own outputs but not what others read from them.
  x2 = x.at[:, 2:].set(5.0)
  out2 = layer.apply(params, x2, mask=mask)
  np.testing.assert_allclose(out[:, :2], out2[:, :2], atol=1e-6)


def test_attentional_pooler_shapes():
  pooler = AttentionalPooler(num_queries=5, num_heads=2)
  tokens = jnp.ones((3, 7, 8))
  params = pooler.init(jax.random.key(0), tokens)
  assert pooler.apply(params, tokens).shape == (3, 5, 8)
  assert nn.unbox(params)['params']['queries'].shape == (5, 8)
