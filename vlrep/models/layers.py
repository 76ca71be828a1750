"""Transformer building blocks shared by the image encoder, text decoder and poolers.

Pre-LayerNorm blocks (self-attention, optional cross-attention, MLP) and the attentional
pooler (learned queries, one attention layer). Every parameter is created with logical axis
names (`embed`, `mlp`, `heads`, `kv`, `vocab`, ...) that `vlrep/sharding.py` maps to mesh
axes; nothing here knows about meshes. Attention layers can run autoregressively
(`decode=True`), keeping keys and values in the `cache` collection.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

default_kernel_init = nn.initializers.xavier_uniform()


def logical(init: nn.initializers.Initializer, *names: str | None) -> nn.initializers.Initializer:
  """An initializer whose parameter carries the given logical axis names."""
  return nn.with_logical_partitioning(init, names)


def layer_norm(name: str | None = None, dtype: Dtype = jnp.float32) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=1e-6, dtype=dtype, name=name,
                      scale_init=logical(nn.initializers.ones, 'embed'),
                      bias_init=logical(nn.initializers.zeros, 'embed'))


class Mlp(nn.Module):
  """Two dense layers with GELU: [..., width] -> [..., mlp_dim] -> [..., width]."""
  mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    h = nn.Dense(self.mlp_dim, dtype=self.dtype, name='fc1',
                 kernel_init=logical(default_kernel_init, 'embed', 'mlp'),
                 bias_init=logical(nn.initializers.zeros, 'mlp'))(x)
    h = nn.gelu(h, approximate=True)
    return nn.Dense(width, dtype=self.dtype, name='fc2',
                    kernel_init=logical(default_kernel_init, 'mlp', 'embed'),
                    bias_init=logical(nn.initializers.zeros, 'embed'))(h)


class Attention(nn.Module):
  """Multi-head dot-product attention of queries `x` [B, T, W] over `context` [B, S, W].

  Self-attention when `context` is None. `mask` is boolean, broadcastable to [B, 1, T, S]
  (True = may attend). With `decode=True` the layer keeps a cache:
  - self-attention: keys/values of every position so far; `x` is the next token [B, 1, W];
  - cross-attention (`cross=True`): keys/values of the context, computed on the call that
    passes `context` and reused by later calls that pass None, so each step of decoding
    does not re-project the image tokens.
  The first call with `decode=True` (via `init`) only creates the zeroed cache.
  """
  num_heads: int
  cross: bool = False
  decode: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None,
               mask: jax.Array | None = None) -> jax.Array:
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f'width {width} is not divisible by num_heads {self.num_heads}')
    head_dim = width // self.num_heads

    def project(name: str) -> nn.DenseGeneral:
      return nn.DenseGeneral((self.num_heads, head_dim), dtype=self.dtype, name=name,
                             kernel_init=logical(default_kernel_init, 'embed', 'heads', 'kv'),
                             bias_init=logical(nn.initializers.zeros, 'heads', 'kv'))

    query = project('query')(x)
    if self.cross and self.decode:
      key, value = self._cached_context(project, context)
    else:
      source = x if context is None else context
      key, value = project('key')(source), project('value')(source)
      if self.decode:
        key, value, mask = self._append_to_cache(key, value)
    out = jax.nn.dot_product_attention(query, key, value, mask=mask)
    return nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, name='out',
                           kernel_init=logical(default_kernel_init, 'heads', 'kv', 'embed'),
                           bias_init=logical(nn.initializers.zeros, 'embed'))(out)

  def _append_to_cache(self, key, value):
    initialized = self.has_variable('cache', 'cached_key')
    cached_key = self.variable('cache', 'cached_key', jnp.zeros, key.shape, key.dtype)
    cached_value = self.variable('cache', 'cached_value', jnp.zeros, value.shape, value.dtype)
    index = self.variable('cache', 'cache_index', lambda: jnp.zeros((), jnp.int32))
    if not initialized:  # shape-only call that sizes the cache; attend normally
      return key, value, None
    if key.shape[1] != 1:
      raise ValueError(f'decode expects one token per call, got {key.shape[1]}')
    i = index.value
    cached_key.value = jax.lax.dynamic_update_slice_in_dim(cached_key.value, key, i, axis=1)
    cached_value.value = jax.lax.dynamic_update_slice_in_dim(cached_value.value, value, i, axis=1)
    index.value = i + 1
    max_len = cached_key.value.shape[1]
    mask = (jnp.arange(max_len) <= i)[None, None, None, :]
    return cached_key.value, cached_value.value, mask

  def _cached_context(self, project, context):
    key_proj, value_proj = project('key'), project('value')
    if context is not None:
      key, value = key_proj(context), value_proj(context)
      self.put_variable('cache', 'context_key', key)
      self.put_variable('cache', 'context_value', value)
      return key, value
    if not self.has_variable('cache', 'context_key'):
      raise ValueError('cross-attention decoding needs the context on its first call')
    return self.get_variable('cache', 'context_key'), self.get_variable('cache', 'context_value')


class Block(nn.Module):
  """Pre-LN transformer block: self-attention, optional cross-attention, MLP."""
  num_heads: int
  mlp_dim: int
  cross_attention: bool = False
  decode: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               context: jax.Array | None = None) -> jax.Array:
    x = x + Attention(self.num_heads, decode=self.decode, dtype=self.dtype, name='self_attention')(
        layer_norm('ln_self', self.dtype)(x), mask=mask)
    if self.cross_attention:
      x = x + Attention(self.num_heads, cross=True, decode=self.decode, dtype=self.dtype,
                        name='cross_attention')(layer_norm('ln_cross', self.dtype)(x), context)
    x = x + Mlp(self.mlp_dim, self.dtype, name='mlp')(layer_norm('ln_mlp', self.dtype)(x))
    return nn.with_logical_constraint(x, ('batch', 'length', 'act_embed'))


class AttentionalPooler(nn.Module):
  """Learned queries attending over tokens: [B, N, W] -> [B, num_queries, W]."""
  num_queries: int
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    width = tokens.shape[-1]
    queries = self.param('queries', logical(nn.initializers.normal(0.02), None, 'embed'),
                         (self.num_queries, width))
    queries = jnp.broadcast_to(queries.astype(tokens.dtype), (tokens.shape[0], *queries.shape))
    pooled = Attention(self.num_heads, dtype=self.dtype, name='attention')(
        queries, layer_norm('ln_context', self.dtype)(tokens))
    return layer_norm('ln_out', self.dtype)(pooled)
