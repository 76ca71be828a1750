"""Autoregressive caption decoding with a KV cache, inside `jax.jit`.

The decoding model is the same CoCa built with `decode=True` (`build_model(config,
decode=True)`): it shares the training model's parameters and keeps per-layer keys and
values in the `cache` collection. The first step feeds BOS with the captioning image
tokens (filling the cross-attention caches); later steps feed one token each.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from vlrep.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from vlrep.models.coca import CoCa


def init_cache(decoder: CoCa, params: Any, caption_tokens: jax.Array, max_len: int) -> Any:
  """Zeroed caches sized for `max_len` positions and this batch."""
  batch = caption_tokens.shape[0]
  tokens = jnp.zeros((batch, max_len), jnp.int32)
  shapes = jax.eval_shape(
      lambda: decoder.init(jax.random.key(0), tokens, caption_tokens, method=CoCa.decode_step))
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes['cache'])


@functools.partial(jax.jit, static_argnames=('decoder', 'max_len'))
def greedy(decoder: CoCa, params: Any, caption_tokens: jax.Array, max_len: int) -> jax.Array:
  """Greedy decoding. caption_tokens [B, N, W] -> int32 [B, max_len] as `[BOS, ..., EOS, PAD..]`.

  Stops early once every row has produced EOS.
  """
  batch = caption_tokens.shape[0]
  cache = init_cache(decoder, params, caption_tokens, max_len)

  def step(cache, token, context):
    logits, variables = decoder.apply({'params': params, 'cache': cache}, token, context,
                                      method=CoCa.decode_step, mutable=['cache'])
    return variables['cache'], jnp.argmax(logits, axis=-1).astype(jnp.int32)

  out = jnp.full((batch, max_len), PAD_ID, jnp.int32).at[:, 0].set(BOS_ID)
  cache, token = step(cache, out[:, :1], caption_tokens)
  done = jnp.zeros((batch,), bool)

  def cond(carry):
    t, _, _, _, done = carry
    return (t < max_len) & ~jnp.all(done)

  def body(carry):
    t, cache, out, token, done = carry
    token = jnp.where(done, PAD_ID, token)
    out = out.at[:, t].set(token)
    done = done | (token == EOS_ID)
    cache, next_token = step(cache, token[:, None], None)
    return t + 1, cache, out, next_token, done

  _, _, out, _, _ = jax.lax.while_loop(cond, body, (1, cache, out, token, done))
  return out
