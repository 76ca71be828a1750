"""Transformer building blocks shared by the image encoder, text decoder and poolers.

Pre-LayerNorm blocks (self-attention, optional cross-attention, MLP) and the attentional
pooler (learned queries, one attention layer). Every parameter is created with logical axis
names (`embed`, `mlp`, `heads`, `kv`, `vocab`, ...) that `vlrep/parallel/sharding.py` maps to mesh
axes; nothing here knows about meshes. Attention layers can run autoregressively
(`decode=True`), keeping keys and values in the `cache` collection.

Options that express other checkpoints' layouts (open_clip's, see `vlrep/weights`) keep
the paper's layout as their default: the MLP activation (`ACTIVATIONS`), the LayerNorm
epsilon, LayerScale, and the decoder block `layout` ('fused': one block with self-attention,
cross-attention and one MLP; 'split': a self-attention block with its MLP, then a
cross-attention block with its own MLP and a LayerNorm on the context).

`BlockStack` runs a tower's blocks, optionally rematerialised (`remat`) and/or as one
`nn.scan` over a single block definition (`scan_layers`), whose parameters and caches then
carry a leading axis named `layers`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

Dtype = Any

default_kernel_init = nn.initializers.xavier_uniform()

REMAT_MODES = ('none', 'full', 'minimal')
# What `remat='minimal'` keeps from the forward pass of a block: the outputs of its dense
# projections (named with `checkpoint_name` below), O(T * W^2) matmuls that hold most of a
# block's FLOPs at these sequence lengths. Dropped and recomputed: LayerNorms, GELU and the
# residual sums (element-wise) and the attention core (scores, softmax, weighted sum;
# O(T * S * W)), whose [B, heads, T, S] probabilities grow with the square of the length.
# `fc2`'s output is not saved: its backward never reads it, and the sum it feeds is
# the block's output, which the next block (or the loss) keeps anyway.
MINIMAL_REMAT_SAVES = ('query', 'key', 'value', 'attention_out', 'mlp_hidden')

# 'gelu_tanh' (tanh approximation, the default), 'gelu' (exact erf form, PyTorch's nn.GELU)
# and 'quick_gelu' (x * sigmoid(1.702 x), OpenAI CLIP's).
ACTIVATIONS = ('gelu_tanh', 'gelu', 'quick_gelu')
BLOCK_LAYOUTS = ('fused', 'split')
DEFAULT_LN_EPS = 1e-6


# Dense layers whose outputs feed a float32 loss (the LM head, the embedding projections)
# accumulate and return float32 whatever the compute dtype: bfloat16 logits over a 64k
# vocabulary would lose the precision the cross-entropy reads.
float32_dot_general = functools.partial(jax.lax.dot_general, preferred_element_type=jnp.float32)


class _LogicalNames(nn.LogicallyPartitioned):
  """Logical axis names of a parameter, never turned into a sharding constraint on unboxing.

  A parameter's sharding comes from the jit's in_shardings (`vlrep.parallel.sharding`). Under axis
  rules Flax would also constrain it on every unbox, including in DenseGeneral's shape check,
  which unboxes the flat rank-2 kernel with its rank-3 names and fails.
  """

  def unbox(self, apply_constraint: bool = True) -> Any:
    del apply_constraint
    return self.value


def logical(init: nn.initializers.Initializer, *names: str | None) -> nn.initializers.Initializer:
  """An initializer whose parameter carries the given logical axis names."""
  def named_init(*args, **kwargs):
    return _LogicalNames(init(*args, **kwargs), names)
  return named_init


def layer_norm(name: str | None = None, dtype: Dtype = jnp.float32,
               epsilon: float = DEFAULT_LN_EPS) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=epsilon, dtype=dtype, name=name,
                      scale_init=logical(nn.initializers.ones, 'embed'),
                      bias_init=logical(nn.initializers.zeros, 'embed'))


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """The MLP nonlinearity called `name` (one of ACTIVATIONS)."""
  if name == 'gelu_tanh':
    return lambda x: nn.gelu(x, approximate=True)
  if name == 'gelu':
    return lambda x: nn.gelu(x, approximate=False)
  if name == 'quick_gelu':
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  raise ValueError(f'activation {name!r}; expected one of {ACTIVATIONS}')


def layer_scale(module: nn.Module, name: str, x: jax.Array, init: float) -> jax.Array:
  """x * a learned per-channel scale initialised at `init` (LayerScale); x when init is 0."""
  if not init:
    return x
  gamma = module.param(name, logical(nn.initializers.constant(init), 'embed'), (x.shape[-1],))
  return x * gamma.astype(x.dtype)


class Mlp(nn.Module):
  """Two dense layers with GELU: [..., width] -> [..., mlp_dim] -> [..., width]."""
  mlp_dim: int
  dtype: Dtype = jnp.float32
  activation: str = 'gelu_tanh'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    h = nn.Dense(self.mlp_dim, dtype=self.dtype, name='fc1',
                 kernel_init=logical(default_kernel_init, 'embed', 'mlp'),
                 bias_init=logical(nn.initializers.zeros, 'mlp'))(x)
    h = checkpoint_name(h, 'mlp_hidden')
    h = activation(self.activation)(h)
    return nn.Dense(width, dtype=self.dtype, name='fc2',
                    kernel_init=logical(default_kernel_init, 'mlp', 'embed'),
                    bias_init=logical(nn.initializers.zeros, 'embed'))(h)


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                          mask: jax.Array | None = None) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v over [B, T, heads, d] queries and [B, S, heads, d] keys and
  values; `mask` is boolean, broadcastable to [B, heads, T, S] (True = may attend).

  `jax.nn.dot_product_attention` (XLA's path: float32 logits and softmax for bfloat16 inputs;
  a fully masked row attends uniformly, never NaN) on every backend. The one name the layers
  call, so that benchmarks/attention_speed.py can swap in the others it measures (a
  heads-major CPU layout, cuDNN's fused kernel); its results are in benchmarks/RESULTS.md.
  """
  return jax.nn.dot_product_attention(query, key, value, mask=mask)


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

    query = checkpoint_name(project('query')(x), 'query')
    if self.cross and self.decode:
      key, value = self._cached_context(project, context)
    else:
      source = x if context is None else context
      key = checkpoint_name(project('key')(source), 'key')
      value = checkpoint_name(project('value')(source), 'value')
      if self.decode:
        key, value, mask = self._append_to_cache(key, value)
    out = dot_product_attention(query, key, value, mask)
    out = nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, name='out',
                          kernel_init=logical(default_kernel_init, 'heads', 'kv', 'embed'),
                          bias_init=logical(nn.initializers.zeros, 'embed'))(out)
    return checkpoint_name(out, 'attention_out')

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
  """Pre-LN transformer block: self-attention, optional cross-attention, MLP.

  `layout='split'` (with cross-attention) is two residual blocks in one: self-attention and
  an MLP, then cross-attention (its context normalised by `ln_cross_context`) and a second
  MLP (`cross_mlp`). `layer_scale` > 0 multiplies each residual branch by a learned
  per-channel scale initialised at that value (`ls_<branch>`).
  """
  num_heads: int
  mlp_dim: int
  cross_attention: bool = False
  decode: bool = False
  dtype: Dtype = jnp.float32
  activation: str = 'gelu_tanh'
  ln_eps: float = DEFAULT_LN_EPS
  layer_scale: float = 0.0
  layout: str = 'fused'

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               context: jax.Array | None = None) -> jax.Array:
    if self.layout not in BLOCK_LAYOUTS:
      raise ValueError(f'block layout {self.layout!r}; expected one of {BLOCK_LAYOUTS}')
    norm = lambda name: layer_norm(name, self.dtype, self.ln_eps)
    mlp = lambda name: Mlp(self.mlp_dim, self.dtype, self.activation, name=name)
    branch = lambda name, y: layer_scale(self, name, y, self.layer_scale)
    x = x + branch('ls_self', Attention(self.num_heads, decode=self.decode, dtype=self.dtype,
                                        name='self_attention')(norm('ln_self')(x), mask=mask))
    split = self.layout == 'split' and self.cross_attention
    if split:
      x = x + branch('ls_mlp', mlp('mlp')(norm('ln_mlp')(x)))
    if self.cross_attention:
      if split and context is not None:  # None: decoding reuses the cached context projections
        context = norm('ln_cross_context')(context)
      x = x + branch('ls_cross', Attention(self.num_heads, cross=True, decode=self.decode,
                                           dtype=self.dtype, name='cross_attention')(
                                               norm('ln_cross')(x), context))
    if split:
      x = x + branch('ls_cross_mlp', mlp('cross_mlp')(norm('ln_cross_mlp')(x)))
    else:
      x = x + branch('ls_mlp', mlp('mlp')(norm('ln_mlp')(x)))
    return nn.with_logical_constraint(x, ('batch', 'length', 'act_embed'))


def remat_policy(remat: str) -> Callable[..., bool] | None:
  """The `jax.checkpoint` policy of a remat mode; None for 'none' (no rematerialisation)."""
  if remat not in REMAT_MODES:
    raise ValueError(f'remat={remat!r}; expected one of {REMAT_MODES}')
  if remat == 'full':
    return jax.checkpoint_policies.nothing_saveable
  if remat == 'minimal':
    return jax.checkpoint_policies.save_only_these_names(*MINIMAL_REMAT_SAVES)
  return None


class BlockStack:
  """`num_layers` Blocks applied in sequence: `stack(x, mask=None, context=None) -> x`.

  Build it inside the `setup` or compact method of the module that owns the tower. It is
  not a Module itself so that its blocks are direct children of that module: the parameter
  paths stay `<name>_<i>/...` as without it, and with `scan_layers` become `<name>/...`
  with every leaf stacked on a leading axis of length `num_layers`, logically named
  `layers`. With `decode=True` the `cache` collection is stacked the same way.

  `mask` and `context` are the same for every layer, so the scan broadcasts them (either
  may be None, as in decoding steps after the first).

  Unrolled, `remat` leaves it to XLA's scheduler when to recompute: with XLA:CPU's default
  (concurrency-optimised) scheduler it saved no memory in our measurements, with its
  memory-minimising one (`--xla_cpu_enable_concurrency_optimized_scheduler=false`) it did.
  Scanned, the loop fixes the order, and the saving is there either way.
  """

  def __init__(self, name: str, num_layers: int, *, remat: str = 'none',
               scan_layers: bool = False, **block_kwargs: Any):
    policy = remat_policy(remat)  # validates `remat` in decode mode too
    # Decoding has no backward pass, so there is nothing to rematerialise.
    self._policy = None if block_kwargs.get('decode') else policy
    self.num_layers, self.scan_layers = num_layers, scan_layers
    if scan_layers:
      names = [name] if num_layers else []
    else:
      names = [f'{name}_{i}' for i in range(num_layers)]
    self.blocks = tuple(Block(**block_kwargs, name=n) for n in names)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               context: jax.Array | None = None) -> jax.Array:
    def apply_block(block, x, mask, context):
      return block(x, mask=mask, context=context)

    if self._policy is not None:
      # Inside a scan, jax.checkpoint's CSE barrier is unneeded (the loop already prevents
      # XLA from merging the recompute into the forward pass) and only costs speed.
      apply_block = nn.remat(apply_block, policy=self._policy,
                             prevent_cse=not self.scan_layers)
    if not self.scan_layers:
      for block in self.blocks:
        x = apply_block(block, x, mask, context)
      return x
    if not self.blocks:
      return x
    scanned = nn.scan(
        lambda block, x, mask, context: (apply_block(block, x, mask, context), None),
        variable_axes={'params': 0, 'cache': 0},
        split_rngs={'params': True},
        in_axes=(nn.broadcast, nn.broadcast),
        length=self.num_layers,
        metadata_params={nn.PARTITION_NAME: 'layers'})
    x, _ = scanned(self.blocks[0], x, mask, context)
    return x


class AttentionalPooler(nn.Module):
  """Learned queries attending over tokens: [B, N, W] -> [B, num_queries, width].

  `width` is the queries' (and output's) width, by default the tokens'. The context is
  normalised (`ln_context`) unless `context_norm=False`; `query_norm` also normalises the
  queries (`ln_query`, as open_clip does) and `output_norm` the output (`ln_out`, the
  default). `mlp_dim` > 0 adds a residual MLP on the pooled tokens (`ln_mlp`, `mlp`), as
  SigLIP's attention-pooling head has.
  """
  num_queries: int
  num_heads: int
  dtype: Dtype = jnp.float32
  width: int | None = None
  query_norm: bool = False
  output_norm: bool = True
  ln_eps: float = DEFAULT_LN_EPS
  context_norm: bool = True
  mlp_dim: int = 0
  activation: str = 'gelu_tanh'

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    width = self.width or tokens.shape[-1]
    norm = lambda name: layer_norm(name, self.dtype, self.ln_eps)
    queries = self.param('queries', logical(nn.initializers.normal(0.02), None, 'embed'),
                         (self.num_queries, width))
    queries = queries.astype(tokens.dtype)
    if self.query_norm:
      queries = norm('ln_query')(queries)
    queries = jnp.broadcast_to(queries, (tokens.shape[0], *queries.shape))
    context = norm('ln_context')(tokens) if self.context_norm else tokens
    pooled = Attention(self.num_heads, dtype=self.dtype, name='attention')(queries, context)
    if self.mlp_dim:
      pooled = pooled + Mlp(self.mlp_dim, self.dtype, self.activation, name='mlp')(
          norm('ln_mlp')(pooled))
    return norm('ln_out')(pooled) if self.output_norm else pooled
