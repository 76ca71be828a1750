"""Pretrained: preprocessing of any image size, chunking, float pass-through."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from vlrep.models.coca import build_model
from vlrep.pretrained import Pretrained
from vlrep.step import init_params


@pytest.fixture
def pretrained(config):
  model = build_model(config)
  params = jax.jit(lambda rng: nn.unbox(init_params(model, config, rng)))(jax.random.key(0))
  return Pretrained(config, params, batch_size=4)


def test_uint8_of_any_size_is_resized(pretrained):
  images = np.random.default_rng(0).integers(0, 255, (2, 40, 24, 3)).astype(np.uint8)
  assert pretrained.preprocess_images(images).shape == (2, 16, 16, 3)
  assert pretrained.encode_image(images).shape == (2, 16)


def test_float_input_is_taken_as_normalised(pretrained):
  floats = np.zeros((1, 16, 16, 3), np.float32)
  assert pretrained.preprocess_images(floats) is not None
  with pytest.raises(ValueError, match='preprocessed'):
    pretrained.preprocess_images(np.zeros((1, 20, 20, 3), np.float32))


def test_chunking_gives_the_same_embeddings_as_one_batch(pretrained):
  images = np.random.default_rng(1).integers(0, 255, (7, 16, 16, 3)).astype(np.uint8)
  chunked = pretrained.encode_image(images)  # chunks of 4: 4 + 3 (padded)
  pretrained.batch_size = 8
  whole = pretrained.encode_image(images)
  np.testing.assert_allclose(chunked, whole, atol=1e-5)
