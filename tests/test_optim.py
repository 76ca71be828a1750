"""Optimizer: schedule values, weight-decay mask, both optimizers step."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vlrep import optim
from vlrep.models.build import build_model, init_params


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
            'ln': {'scale': jnp.ones(3)}, 'logit_scale': jnp.ones(()),
            'block': {'ls_mlp': jnp.ones(3)}, 'cls_embed': jnp.ones(3)}
  mask = optim.weight_decay_mask(params)
  assert mask == {'dense': {'kernel': True, 'bias': False}, 'ln': {'scale': False},
                  'logit_scale': False, 'block': {'ls_mlp': False}, 'cls_embed': False}


def _boxed_base_params(scan_layers):
  """The base model's parameters (shapes only) with every layout option that adds
  parameters switched on, boxed with their logical axis names."""
  from conftest import load_config
  config = load_config('coca', 'base')
  config.model.vision.update(class_token=True, ln_pre=True, layer_scale=0.1)
  config.model.text.update(multimodal_layout='split', multimodal_layer_scale=0.1,
                           layer_scale=0.1)
  config.model.update(pooled_norm=True, text_projection_bias=True, pooler_query_norm=True,
                      scan_layers=scan_layers)
  config.loss.contrastive_type = 'sigmoid'  # adds logit_bias
  model = build_model(config)
  return jax.eval_shape(lambda: init_params(model, config, jax.random.key(0)))


@pytest.mark.parametrize('scan_layers', [False, True])
def test_weight_decay_rule_on_every_parameter_of_the_base_model(scan_layers):
  """The rule (open_clip's): a parameter is decayed when it is a matrix per layer (rank >= 2
  without the scanned `layers` axis) and not a bias; every vector and scalar is not. Checked
  by name on every leaf, with and without scanned layers."""
  boxed = _boxed_base_params(scan_layers)
  is_box = lambda x: isinstance(x, nn.Partitioned)
  mask = optim.weight_decay_mask(nn.unbox(boxed))
  decayed, kept = set(), set()
  for (path, leaf), decays in zip(jax.tree_util.tree_leaves_with_path(boxed, is_leaf=is_box),
                                  jax.tree.leaves(mask)):
    name = '/'.join(str(getattr(k, 'key', k)) for k in path)
    rank = leaf.value.ndim - tuple(leaf.names).count('layers')
    assert decays == (rank >= 2 and path[-1].key != 'bias'), (name, rank)
    (decayed if decays else kept).add(path[-1].key)
  assert decayed == {'kernel', 'embedding', 'pos_embed', 'queries'}
  assert kept == {'bias', 'scale', 'cls_embed', 'logit_scale', 'logit_bias', 'ls_self',
                  'ls_mlp', 'ls_cross', 'ls_cross_mlp'}


def _zero_gradient_steps(optim_config, params, steps):
  tx, schedule = optim.make_optimizer(optim_config, total_steps=500_000)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(steps):
    updates, state = update(jax.tree.map(jnp.zeros_like, params), state, params)
    params = optax.apply_updates(params, updates)
  return params, schedule


@pytest.mark.parametrize('variant', ['tiny', 'base'])
def test_weight_decay_is_decoupled_and_scheduled_for_both_optimizers(variant):
  """With zero gradients only the decay acts: N steps shrink a decayed kernel by exactly
  prod_t (1 - lr_t * weight_decay), for AdamW (tiny) and Adafactor (base) alike, and leave
  an undecayed leaf as it was. (optax.adafactor's own decay, applied after the learning
  rate, would keep 0.37 of the base kernel after these 100 warmup steps.)"""
  from conftest import load_config
  optim_config = load_config('coca', variant).optim
  assert optim_config.name == {'tiny': 'adamw', 'base': 'adafactor'}[variant]
  params = {'kernel': jnp.full((256, 128), 2.0), 'bias': jnp.full((128,), 2.0)}
  steps = 100
  new, schedule = _zero_gradient_steps(optim_config, params, steps)
  rates = np.array([float(schedule(t)) for t in range(steps)])
  factor = np.prod(1.0 - rates * optim_config.weight_decay)
  assert factor < 1.0 - 1e-6  # something to measure: the steps had non-zero rates
  np.testing.assert_allclose(new['kernel'], 2.0 * factor, rtol=1e-6)
  np.testing.assert_array_equal(new['bias'], params['bias'])


def test_adafactor_second_moment_decay_is_capped_at_b2(config):
  """optim.b2 is honoured by Adafactor: its decay 1 - (t + 1) ** -0.8 is capped at b2. The
  second moment of an (unfactored) vector follows v_t = d_t v_(t-1) + (1 - d_t) g_t ** 2."""
  config.optim.update(name='adafactor', b2=0.5, warmup_steps=0, grad_clip_norm=1e6)
  assert float(optim.adafactor_decay_rate(0, 0.999)) == pytest.approx(0.0)
  assert float(optim.adafactor_decay_rate(1, 0.999)) == pytest.approx(1 - 2 ** -0.8)
  assert float(optim.adafactor_decay_rate(100_000, 0.999)) == pytest.approx(0.999)
  tx, _ = optim.make_optimizer(config.optim, total_steps=100)
  params = {'bias': jnp.zeros(3)}
  state = tx.init(params)
  grads = [np.array([1.0, 2.0, 3.0]) * k for k in (1, 3, 2, 5)]
  v = np.zeros(3)
  for t, g in enumerate(grads):
    _, state = tx.update({'bias': jnp.asarray(g, jnp.float32)}, state, params)
    decay = min(1 - (t + 1) ** -0.8, 0.5)
    v = decay * v + (1 - decay) * (g ** 2 + 1e-30)
  assert min(1 - 4 ** -0.8, 0.5) == 0.5  # the cap was reached
  factored = next(s for s in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, 'v_row'))
                  if hasattr(s, 'v_row'))
  np.testing.assert_allclose(factored.v['bias'], v, rtol=1e-6)


@pytest.mark.parametrize('name, field, value, message', [
    ('adafactor', 'b2', 1.0, 'optim.b2=1.0'),
    ('adamw', 'factor_min_dim', 64, "optim.factor_min_dim=64 applies to optim.name='adafactor'"),
])
def test_fields_an_optimizer_would_ignore_are_refused(config, name, field, value, message):
  config.optim.update(**{'name': name, field: value})
  with pytest.raises(ValueError, match=re.escape(message)):
    optim.make_optimizer(config.optim, 10)


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
