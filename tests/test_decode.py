"""Greedy decoding with the KV cache equals step-by-step argmax over full forward passes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlrep import decode
from vlrep.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from vlrep.models.coca import CoCa, build_model
from vlrep.step import init_params


def _reference_greedy(model, params, images, max_len):
  """No cache: re-run the whole model on the prefix at every step."""
  batch = images.shape[0]
  tokens = np.full((batch, max_len), PAD_ID, np.int32)
  tokens[:, 0] = BOS_ID
  done = np.zeros(batch, bool)
  apply = jax.jit(model.apply)  # one compile, not op-by-op dispatch at every step
  for t in range(1, max_len):
    logits = apply({'params': params}, images, jnp.asarray(tokens))['caption_logits']
    next_token = np.asarray(jnp.argmax(logits[:, t - 1], axis=-1))
    next_token = np.where(done, PAD_ID, next_token)
    tokens[:, t] = next_token
    done |= next_token == EOS_ID
  return tokens


def test_greedy_matches_uncached_reference(config):
  config.data.max_text_len = 12
  model, decoder = build_model(config), build_model(config, decode=True)
  params = jax.jit(lambda rng: nn.unbox(init_params(model, config, rng)))(jax.random.key(3))
  # Make EOS likely somewhere so early stopping and padding are exercised.
  params['text_decoder']['output_head']['bias'] = params['text_decoder']['output_head'][
      'bias'].at[EOS_ID].set(0.5)
  images = jnp.asarray(np.random.default_rng(0).integers(0, 255, (4, 16, 16, 3)), jnp.uint8)
  _, context = model.apply({'params': params}, images, method=CoCa.encode_image)
  got = np.asarray(decode.greedy(decoder, params, context, 12))
  np.testing.assert_array_equal(got, _reference_greedy(model, params, images, 12))
  assert (got[:, 0] == BOS_ID).all()
