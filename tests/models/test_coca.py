"""CoCa model: output shapes, normalised embeddings, temperature init and clip, CLIP variant."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config, shrink
from vlrep.models.coca import CoCa, build_model
from vlrep.step import example_batch, init_params


def test_forward_shapes_and_normalised_embeddings(config):
  model = build_model(config)
  params = nn.unbox(init_params(model, config, jax.random.key(0)))
  batch = example_batch(config, batch_size=3)
  out = model.apply({'params': params}, batch['images'], batch['tokens'])
  assert out['image_emb'].shape == (3, config.model.embed_dim)
  assert out['text_emb'].shape == (3, config.model.embed_dim)
  assert out['caption_logits'].shape == (3, config.data.max_text_len - 1,
                                         config.model.text.vocab_size)
  np.testing.assert_allclose(np.linalg.norm(out['image_emb'], axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(out['text_emb'], axis=-1), 1.0, rtol=1e-5)
  _, caption_tokens = model.apply({'params': params}, batch['images'], method=CoCa.encode_image)
  assert caption_tokens.shape == (3, config.model.captioning_queries, config.model.vision.width)


def test_temperature_starts_at_0_07_and_scale_is_clipped_at_100(config):
  model = build_model(config)
  params = nn.unbox(init_params(model, config, jax.random.key(0)))
  scale = model.apply({'params': params}, method=CoCa.logit_scale)
  assert float(scale) == pytest.approx(1 / 0.07, rel=1e-5)
  params = dict(params, logit_scale=jnp.asarray(10.0))  # exp(10) >> 100
  assert float(model.apply({'params': params}, method=CoCa.logit_scale)) == pytest.approx(100.0)


def test_every_parameter_has_logical_axis_names(config):
  model = build_model(config)
  boxed = init_params(model, config, jax.random.key(0))
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  unnamed = [x for x in leaves if not isinstance(x, nn.Partitioned)]
  assert not unnamed
  assert all(len(x.names) == x.value.ndim for x in leaves)


def test_clip_is_coca_without_multimodal_layers():
  config = shrink(load_config('clip'))
  model = build_model(config)
  params = nn.unbox(init_params(model, config, jax.random.key(0)))
  assert 'captioning_pooler' not in params
  assert not any(k.startswith('multimodal') for k in params['text_decoder'])
  batch = example_batch(config, batch_size=2)
  out = model.apply({'params': params}, batch['images'], batch['tokens'])
  assert 'caption_logits' not in out and out['image_emb'].shape == (2, config.model.embed_dim)
  assert config.loss.caption_weight == 0.0


def test_parallel_pooler_reads_the_image_tokens(config):
  params_cascade = init_params(build_model(config), config, jax.random.key(0))
  config.model.pooler = 'parallel'
  params_parallel = init_params(build_model(config), config, jax.random.key(0))
  # Same parameter shapes either way; the wiring is what differs.
  assert jax.tree.map(jnp.shape, params_cascade) == jax.tree.map(jnp.shape, params_parallel)
  config.model.pooler = 'serial'
  with pytest.raises(ValueError, match='model.pooler'):
    build_model(config)
