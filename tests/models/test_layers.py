"""Building blocks: attention masking, attentional pooler shapes, what remat keeps."""

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import pytest
from jax.ad_checkpoint import print_saved_residuals

from vlrep.models.layers import (MINIMAL_REMAT_SAVES, Attention, AttentionalPooler, BlockStack,
                                 remat_policy)


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


class _Tower(nn.Module):
  remat: str
  scan_layers: bool

  @nn.compact
  def __call__(self, x):
    return BlockStack('block', 2, remat=self.remat, scan_layers=self.scan_layers, num_heads=2,
                      mlp_dim=16)(x)


def _saved_activations(remat, scan_layers, capsys):
  """Shapes and `checkpoint_name`s of what a 2-block stack's backward pass reads from its
  forward pass, other than the parameters and the input."""
  tower = _Tower(remat, scan_layers)
  x = jax.ShapeDtypeStruct((2, 5, 8), jnp.float32)
  params = jax.eval_shape(tower.init, jax.random.key(0), x)  # tracing is all it takes
  capsys.readouterr()
  print_saved_residuals(lambda p, x: tower.apply(p, x).sum(), params, x)
  lines = [l for l in capsys.readouterr().out.splitlines()
           if 'from the argument' not in l and 'from a literal' not in l]
  return ([l.split()[0] for l in lines],
          collections.Counter(m for l in lines for m in re.findall(r"named '(\w+)'", l)))


@pytest.mark.parametrize('scan_layers', [False, True])
def test_full_remat_keeps_only_the_block_inputs(scan_layers, capsys):
  plain, _ = _saved_activations('none', scan_layers, capsys)
  shapes, _ = _saved_activations('full', scan_layers, capsys)
  assert len(plain) > 10
  # Unrolled: block 1's input (block 0's is the stack input); scanned: both, stacked.
  assert shapes == (['f32[2,2,5,8]'] if scan_layers else ['f32[2,5,8]'])


def test_minimal_remat_keeps_the_named_projections(capsys):
  shapes, names = _saved_activations('minimal', False, capsys)
  assert names == {name: 2 for name in MINIMAL_REMAT_SAVES}
  assert len(shapes) == 2 * len(MINIMAL_REMAT_SAVES) + 1  # + block 1's input
  shapes, _ = _saved_activations('minimal', True, capsys)  # scan residuals lose their names
  assert sorted(shapes) == sorted(['f32[2,2,5,2,4]'] * 3 + ['f32[2,2,5,8]', 'f32[2,2,5,16]',
                                                            'f32[2,2,5,8]'])


def test_unknown_remat_mode_is_named():
  with pytest.raises(ValueError, match="remat='some'"):
    remat_policy('some')


def test_activations_and_unknown_name():
  from vlrep.models.layers import activation
  x = jnp.linspace(-3.0, 3.0, 7)
  np.testing.assert_allclose(activation('quick_gelu')(x), x / (1 + np.exp(-1.702 * x)),
                             rtol=1e-6, atol=1e-7)
  exact = activation('gelu')(x)
  np.testing.assert_allclose(exact, jax.nn.gelu(x, approximate=False), rtol=1e-6)
  assert 1e-5 < float(jnp.abs(exact - activation('gelu_tanh')(x)).max()) < 1e-2
  with pytest.raises(ValueError, match='activation'):
    activation('relu')


def test_split_block_has_two_mlps_layer_scale_and_a_context_norm():
  from vlrep.models.layers import Block
  x, context = jnp.ones((1, 3, 8)), jnp.ones((1, 5, 8))
  fused = jax.eval_shape(lambda: Block(num_heads=2, mlp_dim=16, cross_attention=True).init(
      jax.random.key(0), x, context=context))['params']
  assert set(fused) == {'ln_self', 'self_attention', 'ln_cross', 'cross_attention', 'ln_mlp',
                        'mlp'}  # the default layout's names, unchanged
  split = Block(num_heads=2, mlp_dim=16, cross_attention=True, layout='split', layer_scale=0.1)
  params = nn.unbox(jax.jit(lambda x, c: split.init(jax.random.key(0), x, context=c))(
      x, context))['params']
  assert set(params) == {'ln_self', 'self_attention', 'ls_self', 'ln_mlp', 'mlp', 'ls_mlp',
                         'ln_cross', 'ln_cross_context', 'cross_attention', 'ls_cross',
                         'ln_cross_mlp', 'cross_mlp', 'ls_cross_mlp'}
  np.testing.assert_allclose(params['ls_cross_mlp'], np.full(8, 0.1, np.float32))
  assert jax.eval_shape(lambda: split.apply({'params': params}, x, context=context)).shape == \
      (1, 3, 8)


def test_pooler_query_width_and_norm_options():
  pooler = AttentionalPooler(num_queries=5, num_heads=3, width=6, query_norm=True,
                             output_norm=False)
  tokens = jnp.ones((2, 7, 8))
  params = nn.unbox(jax.eval_shape(lambda: pooler.init(jax.random.key(0), tokens)))['params']
  assert set(params) == {'queries', 'ln_query', 'ln_context', 'attention'}
  assert params['attention']['key']['kernel'].shape == (8, 3, 2)  # context 8 wide -> 3 x 2
  assert jax.eval_shape(lambda p: pooler.apply({'params': p}, tokens), params).shape == (2, 5, 6)
