"""Pretrained: preprocessing of any image size, chunking, float pass-through, captioning."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from vlrep.data.tokenizer import BOS_ID, EOS_ID
from vlrep.models.build import build_model, init_params
from vlrep.pretrained import Pretrained

from conftest import load_config, shrink


@pytest.fixture
def pretrained(config):
  model = build_model(config)
  params = jax.jit(lambda rng: nn.unbox(init_params(model, config, rng)))(jax.random.key(0))
  return Pretrained(config, params, batch_size=4)


@pytest.fixture(scope='module')
def captioner():
  """A module-wide `pretrained`: the captioning tests compile its model only once."""
  config = shrink(load_config('coca'))
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


@pytest.mark.parametrize('method,options', [
    ('beam', dict(beam_size=3, length_penalty=0.6, min_len=2)),
    ('sample', dict(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.2, min_len=2,
                     seed=1)),
])
def test_caption_methods_return_strings(captioner, method, options):
  images = np.random.default_rng(2).integers(0, 255, (5, 16, 16, 3)).astype(np.uint8)
  captions = captioner.caption(images, max_len=8, method=method, **options)
  assert len(captions) == 5 and all(isinstance(c, str) for c in captions)
  ids = captioner.caption_ids(images, 8, method=method, **options)
  assert ids.shape == (5, 8) and (ids[:, 0] == BOS_ID).all()
  assert not (ids[:, 1:3] == EOS_ID).any()  # min_len=2
  np.testing.assert_array_equal(ids, captioner.caption_ids(images, 8, method=method, **options))


def test_caption_rejects_unknown_methods_and_options(captioner):
  images = np.zeros((1, 16, 16, 3), np.uint8)
  with pytest.raises(ValueError, match='method'):
    captioner.caption(images, method='nucleus')
  with pytest.raises(ValueError, match='beam_size'):
    captioner.caption(images, method='sample', beam_size=2)
  limit = captioner.config.data.max_text_len
  for method in ('greedy', 'beam', 'sample'):
    with pytest.raises(ValueError, match=f'max_len={limit + 1} exceeds .* '
                                         f'data.max_text_len={limit}'):
      captioner.caption(images, max_len=limit + 1, method=method)
