"""Optimizer: schedule values, weight-decay mask, both optimizers step."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vlrep import optim
from vlrep.models.coca import build_model
from vlrep.step import init_params


def test_warmup_then_cosine_and_linear(config):
  config.optim.update(learning_rate=1.0, warmup_steps=10, decay='cosine')
  schedule = optim.learning_rate_schedule(config.optim, total_steps=110)
  assert float(schedule(0)) == 0.0
  assert float(schedule(5)) == pytest.approx(0.5)
  assert float(schedule(10)) == pytest.approx(1.0)
  assert float(schedule(60)) == pytest.approx(0.5, abs=1e-6)  # cosine half way
  assert float(schedule(110)) == pytest.approx(0.0, abs=1e-6)
  config.optim.decay = 'linear'
  schedule = optim.learning_rate_schedule(config.optim, total_steps=110)
  assert float(schedule(35)) == pytest.approx(0.75)


def test_weight_decay_skips_biases_norms_and_temperature():
  params = {'dense': {'kernel': jnp.ones((2, 3)), 'bias': jnp.ones(3)},
            'ln': {'scale': jnp.ones(3)}, 'logit_scale': jnp.ones(())}
  mask = optim.weight_decay_mask(params)
  assert mask == {'dense': {'kernel': True, 'bias': False}, 'ln': {'scale': False},
                  'logit_scale': False}


def test_weight_decay_mask_is_the_same_with_scanned_layers(config):
  """Per layer, the decayed parameters are those with 2+ dims other than attention biases
  ([heads, head_dim]); scanning the layers (one more leading axis) decays the same ones."""
  config.model.text.unimodal_layers = 2
  counts = {}
  for scan in (False, True):
    config.model.scan_layers = scan
    model = build_model(config)
    params = nn.unbox(jax.eval_shape(lambda: init_params(model, config, jax.random.key(0))))
    mask = optim.weight_decay_mask(params)
    if not scan:
      expected = jax.tree_util.tree_map_with_path(
          lambda path, p: p.ndim > 1 and path[-1].key != 'bias', params)
      assert mask == expected
    counts[scan] = sum(p.size for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask))
                       if m)
  assert counts[True] == counts[False]


@pytest.mark.parametrize('name', ['adamw', 'adafactor'])
def test_optimizers_decay_only_masked_params(config, name):
  config.optim.update(name=name, learning_rate=0.1, warmup_steps=0, weight_decay=0.5)
  tx, _ = optim.make_optimizer(config.optim, total_steps=10)
  params = {'kernel': jnp.ones((4, 4)), 'bias': jnp.ones(4)}
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  assert float(new['kernel'][0, 0]) < 1.0  # decayed
  np.testing.assert_allclose(new['bias'], 1.0)  # not decayed


def test_adafactor_factors_attention_kernels_from_factor_min_dim(config):
  # [width, heads, head_dim]: its two largest dimensions are 256 and 64, so the second
  # moments are factored only when factor_min_dim <= 64 (the momentum stays full size).
  params = {'attention': jnp.ones((256, 4, 64)), 'mlp': jnp.ones((256, 1024))}
  config.optim.name = 'adafactor'
  second_moment_sizes = {}
  for factor_min_dim in (128, 64):
    config.optim.factor_min_dim = factor_min_dim
    tx, _ = optim.make_optimizer(config.optim, total_steps=10)
    state = jax.eval_shape(tx.init, params)
    factored = next(s for s in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, 'v_row'))
                    if hasattr(s, 'v_row'))
    second_moment_sizes[factor_min_dim] = {
        name: sum(x.size for x in (factored.v_row[name], factored.v_col[name], factored.v[name]))
        for name in params}
  assert second_moment_sizes[128] == {'attention': 256 * 4 * 64 + 2, 'mlp': 256 + 1024 + 1}
  assert second_moment_sizes[64] == {'attention': 256 * 4 + 4 * 64 + 1, 'mlp': 256 + 1024 + 1}


def test_unknown_optimizer_is_named(config):
  config.optim.name = 'sgdd'
  with pytest.raises(ValueError, match='optim.name'):
    optim.make_optimizer(config.optim, 10)
