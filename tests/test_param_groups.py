"""Parameter groups: frozen parameters hold no optimizer state and weigh nothing in the
clipping norm; per-group and layer-wise rate factors scale each leaf's update; every
pattern or entry that cannot work is named."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vlrep import optim, param_groups
from vlrep.models.build import build_model, init_params

TINY_DEPTHS = {'block': 4, 'unimodal': 2, 'multimodal': 1}  # configs/coca.py:tiny


def _tiny(scan_layers=False, **optim_fields):
  """(tiny config, its boxed parameter shapes)."""
  from conftest import load_config
  config = load_config('coca')
  assert (config.model.vision.layers, config.model.text.unimodal_layers,
          config.model.text.multimodal_layers) == tuple(TINY_DEPTHS.values())
  config.model.scan_layers = scan_layers
  config.optim.update(**optim_fields)
  model = build_model(config)
  return config, jax.eval_shape(lambda: init_params(model, config, jax.random.key(0)))


def _named(tree):
  return {param_groups.path_name(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _bytes(tree):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


@pytest.mark.parametrize('scan_layers', [False, True])
@pytest.mark.parametrize('boxed', [False, True])
def test_frozen_parameters_hold_no_optimizer_state(scan_layers, boxed):
  """AdamW's state is mu and nu of every trainable element plus two int32 counts (Adam's
  and the schedule's); freezing the image tower and the temperature removes exactly their
  moments: MaskedNode in their place, not zeros. Boxed as the train state builds it, too."""
  freeze = ('image_encoder/.*', 'logit_scale')
  config, shapes = _tiny(scan_layers)
  params = shapes if boxed else nn.unbox(shapes)
  named = _named(nn.unbox(shapes))
  frozen = {n for n in named if n.startswith('image_encoder/') or n == 'logit_scale'}
  assert len(frozen) > 10 and len(frozen) < len(named)
  trainable_bytes = sum(x.size * 4 for n, x in named.items() if n not in frozen)
  frozen_bytes = sum(x.size * 4 for n, x in named.items() if n in frozen)
  counts = 2 * 4

  tx, _ = optim.make_optimizer(config.optim, config.total_steps)
  assert _bytes(jax.eval_shape(tx.init, params)) == 2 * (trainable_bytes + frozen_bytes) + counts
  config.optim.freeze = freeze
  tx, _ = optim.make_optimizer(config.optim, config.total_steps)
  state = nn.unbox(jax.eval_shape(tx.init, params))
  assert _bytes(state) == 2 * trainable_bytes + counts
  adam = next(s for s in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, 'mu'))
              if hasattr(s, 'mu'))
  mu = jax.tree_util.tree_leaves_with_path(
      adam.mu, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  assert {param_groups.path_name(p) for p, x in mu if isinstance(x, optax.MaskedNode)} == frozen


def test_frozen_gradients_are_outside_the_clipping_norm():
  """A huge gradient on a frozen leaf does not shrink the others' (clipped, a 1e-6 gradient
  would be ~1e-12 and Adam's first step g / (|g| + 1e-8) would be ~1e-4, not ~1)."""
  from conftest import load_config
  optim_config = load_config('coca').optim
  optim_config.update(warmup_steps=0, learning_rate=1.0, weight_decay=0.0, grad_clip_norm=1.0,
                      freeze=('frozen/.*',))
  tx, _ = optim.make_optimizer(optim_config, total_steps=10)
  params = {'frozen': {'kernel': jnp.zeros((4, 4))}, 'trained': {'kernel': jnp.zeros((4, 4))}}
  grads = {'frozen': {'kernel': jnp.full((4, 4), 1e6)},
           'trained': {'kernel': jnp.full((4, 4), 1e-6)}}
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates['trained']['kernel'], -1e-6 / (1e-6 + 1e-8), rtol=1e-6)
  np.testing.assert_array_equal(updates['frozen']['kernel'], 0.0)


def _expected_factors(layer_decay, scan_layers):
  """Hand-written factors of `test_update_sizes_are_the_multipliers`' config, by name."""
  d = layer_decay
  vision, uni, multi = ('image_encoder/block', 'text_decoder/unimodal',
                        'text_decoder/multimodal')
  if scan_layers:
    blocks = {f'{vision}/mlp/fc1/kernel': [2.0 * d ** 4, 2.0 * d ** 3, 2.0 * d ** 2, 2.0 * d],
              f'{vision}/ln_mlp/scale': [7.0 * d ** 4, 7.0 * d ** 3, 7.0 * d ** 2, 7.0 * d],
              f'{uni}/self_attention/query/bias': [d ** 2, d],
              f'{multi}/cross_attention/key/kernel': [d]}
  else:
    blocks = {f'{vision}_0/mlp/fc1/kernel': 2.0 * d ** 4,
              f'{vision}_0/ln_mlp/bias': 7.0 * d ** 4,  # the first matching entry's 7
              f'{vision}_3/ln_mlp/scale': 7.0 * d,
              f'{vision}_3/self_attention/query/kernel': 2.0 * d,
              f'{uni}_0/ln_self/scale': d ** 2, f'{uni}_1/mlp/fc2/kernel': d,
              f'{multi}_0/cross_attention/key/kernel': d}
  return {**blocks,
          # the image tower's stem and embeddings: below its 4 blocks
          'image_encoder/stem_conv_0/kernel': 2.0 * d ** 5,
          'image_encoder/patch_embed/bias': 2.0 * d ** 5,
          'image_encoder/pos_embed': 2.0 * d ** 5,
          'image_encoder/ln_final/scale': 2.0,
          # the text decoder's embeddings and [CLS]: below its 2 unimodal blocks
          'text_decoder/token_embed/embedding': d ** 3, 'text_decoder/pos_embed': d ** 3,
          'text_decoder/cls_embed': d ** 3,
          'text_decoder/ln_cls/scale': 1.0, 'text_decoder/ln_final/bias': 1.0,
          'text_decoder/output_head/kernel': 0.1, 'text_decoder/output_head/bias': 0.1,
          'contrastive_pooler/queries': 1.0, 'image_projection/kernel': 1.0,
          'logit_scale': 1.0}


@pytest.mark.parametrize('scan_layers', [False, True])
def test_update_sizes_are_the_multipliers(scan_layers):
  """Bias-corrected Adam's first update of an element is lr * g / (|g| + 1e-8): with unit
  gradients and no decay, |update| / lr is each leaf's factor (per layer along axis 0 of a
  scanned stack), entries' and layer decay's multiplied."""
  lr, layer_decay = 0.01, 0.8
  config, shapes = _tiny(scan_layers, learning_rate=lr, warmup_steps=0, weight_decay=0.0,
                         grad_clip_norm=1e9, layer_decay=layer_decay,
                         lr_multipliers=('image_encoder/block(_[0-9]+)?/ln_mlp/.*=7',
                                         'image_encoder/.*=2',
                                         'text_decoder/output_head/.*=0.1'))
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn.unbox(shapes))
  tx, _ = optim.make_optimizer(config.optim, config.total_steps)
  updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  named = _named(updates)
  expected = _expected_factors(layer_decay, scan_layers)
  for name, factor in expected.items():
    factor = np.asarray(factor, np.float64)
    got = -np.asarray(named[name], np.float64) / lr
    want = np.broadcast_to(factor.reshape(factor.shape + (1,) * (got.ndim - factor.ndim)),
                           got.shape)
    np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=name)
  # Every leaf moved by a factor in (0, 7]: none was left out or zeroed.
  for name, u in named.items():
    assert 0 < float(-jnp.max(u)) / lr <= 7.0 + 1e-6, name


def test_multipliers_scale_the_weight_decay_too():
  """With zero gradients the update is the decoupled decay alone: -lr * factor * wd * p."""
  from conftest import load_config
  optim_config = load_config('coca').optim
  optim_config.update(warmup_steps=0, learning_rate=0.1, weight_decay=0.5,
                      lr_multipliers=('a/.*=0.25',))
  tx, _ = optim.make_optimizer(optim_config, total_steps=10)
  params = {'a': {'kernel': jnp.full((3, 3), 2.0)}, 'b': {'kernel': jnp.full((3, 3), 2.0)}}
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  np.testing.assert_allclose(updates['a']['kernel'], -0.1 * 0.25 * 0.5 * 2.0, rtol=1e-6)
  np.testing.assert_allclose(updates['b']['kernel'], -0.1 * 0.5 * 2.0, rtol=1e-6)


def test_state_layout_without_the_new_fields_is_unchanged():
  """No freeze, no factors: the chain of before (earlier checkpoints restore into it)."""
  from conftest import load_config
  optim_config = load_config('coca').optim
  params = {'dense': {'kernel': jnp.zeros((2, 3)), 'bias': jnp.zeros(3)}}
  tx, _ = optim.make_optimizer(optim_config, total_steps=10)
  schedule = optax.linear_schedule(0.0, 1.0, 1)
  before = optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.chain(optax.scale_by_adam(),
                  optax.add_decayed_weights(0.1, mask=optim.weight_decay_mask),
                  optax.scale_by_learning_rate(schedule)))
  assert jax.tree.structure(tx.init(params)) == jax.tree.structure(before.init(params))
  for fields in ({'layer_decay': 1.0}, {'layer_decay': 0.0}):
    optim_config.update(**fields)
    tx, _ = optim.make_optimizer(optim_config, total_steps=10)
    assert jax.tree.structure(tx.init(params)) == jax.tree.structure(before.init(params))


@pytest.mark.parametrize('fields, message', [
    ({'freeze': ('image_encoder/blocks_0/.*',)},
     "optim.freeze: 'image_encoder/blocks_0/.*' matches no parameter"),
    ({'freeze': ('block_0/.*',)}, "optim.freeze: 'block_0/.*' matches no parameter"),
    ({'freeze': ('image_encoder/(',)}, "optim.freeze: 'image_encoder/(' is not a regular"),
    ({'lr_multipliers': ('text_decoder/.*=0.5', 'pooler/.*=2')},
     "optim.lr_multipliers: 'pooler/.*' matches no parameter"),
    ({'lr_multipliers': ('text_decoder/.*',)},
     "optim.lr_multipliers: 'text_decoder/.*' is not REGEX=FACTOR"),
    ({'lr_multipliers': ('text_decoder/.*=fast',)},
     "optim.lr_multipliers: 'text_decoder/.*=fast' is not REGEX=FACTOR"),
    ({'lr_multipliers': ('=0.5',)}, "optim.lr_multipliers: '=0.5' is not REGEX=FACTOR"),
    ({'lr_multipliers': ('logit_scale=-1',)},
     "optim.lr_multipliers: 'logit_scale=-1' is not REGEX=FACTOR"),
    ({'layer_decay': 1.5}, 'optim.layer_decay=1.5; expected 0 (off) or in (0, 1]'),
])
def test_bad_groups_are_named(fields, message):
  """Malformed entries fail when the optimizer is built; patterns that match nothing when
  it first sees the parameters (vlrep.train: before anything compiles)."""
  config, shapes = _tiny()
  config.optim.update(**fields)
  with pytest.raises(ValueError, match=re.escape(message)):
    tx, _ = optim.make_optimizer(config.optim, config.total_steps)
    jax.eval_shape(tx.init, shapes)


def test_stop_frozen_and_keep_frozen():
  """No gradient reaches a frozen leaf, and the kept leaf is the old one, -0.0 included."""
  params = {'frozen': jnp.array([-0.0, 1.0]), 'trained': jnp.array([2.0, 3.0])}
  grads = jax.grad(lambda p: jnp.sum(param_groups.stop_frozen(p, ('frozen',))['frozen'] ** 2 +
                                     p['trained'] ** 2))(params)
  np.testing.assert_array_equal(grads['frozen'], 0.0)
  np.testing.assert_array_equal(grads['trained'], [4.0, 6.0])
  new = optax.apply_updates(params, jax.tree.map(jnp.zeros_like, params))
  assert np.signbit(new['frozen'][0]) == False  # what `param + 0` does to -0.0  # noqa: E712
  kept = param_groups.keep_frozen(new, params, ('frozen',))
  assert kept['frozen'] is params['frozen'] and kept['trained'] is new['trained']


def test_layer_decay_counts_frozen_blocks():
  """A frozen top block still counts in its stack's depth: block 0 of 4 gets d ** 4."""
  lr, d = 0.01, 0.5
  config, shapes = _tiny(learning_rate=lr, warmup_steps=0, weight_decay=0.0,
                         grad_clip_norm=1e9, layer_decay=d,
                         freeze=('image_encoder/block_3/.*',))
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn.unbox(shapes))
  tx, _ = optim.make_optimizer(config.optim, config.total_steps)
  updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  named = _named(updates)
  np.testing.assert_allclose(named['image_encoder/block_0/mlp/fc1/kernel'], -lr * d ** 4,
                             rtol=1e-6)
  np.testing.assert_allclose(named['image_encoder/patch_embed/kernel'], -lr * d ** 5,
                             rtol=1e-6)
  np.testing.assert_array_equal(named['image_encoder/block_3/mlp/fc1/kernel'], 0.0)


def test_frozen_state_checkpoints_and_restores(config, tmp_path):
  """The state of a run with frozen parameters (MaskedNode where their moments would be)
  saves and restores into its own layout, every array equal."""
  from vlrep import step
  from vlrep.data import pipeline
  from vlrep.parallel import sharding
  from vlrep.runtime import checkpoint
  config.optim.freeze = ('image_encoder/.*',)
  config.mesh.update(data=1)
  model = build_model(config)
  tx, schedule = optim.make_optimizer(config.optim, config.total_steps)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  state, shardings = step.create_train_state(model, tx, schedule, config, mesh,
                                             jax.random.key(0))
  data = iter(pipeline.train_dataset(config, 0, 1))
  saver = checkpoint.Checkpointer(str(tmp_path), keep=1)
  saver.save(1, state, data)
  saver.wait()
  saver.close()
  restored = checkpoint.Checkpointer(str(tmp_path), keep=1).restore(1, state, shardings, data)
  assert jax.tree.structure(restored.opt_state) == jax.tree.structure(state.opt_state)
  jax.tree.map(np.testing.assert_array_equal, (restored.params, restored.opt_state),
               (state.params, state.opt_state))
