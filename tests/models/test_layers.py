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
