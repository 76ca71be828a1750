"""Captioning-only models (Cap / CapPa): no contrastive parameters, the loss is the caption
loss, and parallel prediction's rows read no tokens and attend to every position while the
other rows stay causal."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import load_config, shrink
from vlrep import losses, param_groups, step
from vlrep.data import pipeline
from vlrep.models.build import build_model, init_params
from vlrep.models.text import parallel_rows
from vlrep.optim import make_optimizer
from vlrep.parallel import sharding

CONTRASTIVE_PARTS = ('contrastive_pooler', 'image_projection', 'text_projection',
                     'logit_scale', 'logit_bias', 'image_pooled_norm',
                     'text_decoder/cls_embed', 'text_decoder/ln_cls')


def _setup(name):
  config = shrink(load_config(name))
  model = build_model(config)
  params = jax.jit(lambda: nn.unbox(init_params(model, config, jax.random.key(0))))()
  batch = next(iter(pipeline.train_dataset(config, 0, 1)))
  return config, model, params, batch


def _names(params):
  return [param_groups.path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]


@pytest.mark.parametrize('name', ['cap', 'cappa'])
def test_a_captioning_only_model_has_no_contrastive_parameters_and_only_the_caption_loss(name):
  config, model, params, batch = _setup(name)
  names = _names(params)
  assert not [n for n in names if n.startswith(CONTRASTIVE_PARTS)], names
  assert ('text_decoder/mask_embed' in names) == (name == 'cappa')
  assert params['text_decoder']['pos_embed'].shape[0] == config.data.max_text_len  # no [CLS] row
  # Every parameter is used: each gets a non-zero gradient from the caption loss alone.
  loss_config = step.LossConfig.from_config(config.loss)
  grads = jax.grad(lambda p: step.compute_losses(model, p, batch, loss_config)[0])(params)
  unused = [n for n, g in zip(names, jax.tree.leaves(grads)) if not np.any(g)]
  assert not unused

  total, metrics = step.compute_losses(model, params, batch, loss_config)
  assert 'logit_scale' not in metrics and float(metrics['contrastive_loss']) == 0.0
  assert float(total) == float(metrics['caption_loss'])  # caption weight 1, nothing else
  rows = jnp.asarray(parallel_rows(len(batch['tokens']), config.loss.parallel_fraction))
  logits = model.apply({'params': params}, batch['images'], batch['tokens'],
                       parallel_rows=rows if name == 'cappa' else None)['caption_logits']
  np.testing.assert_allclose(total, losses.caption_loss(logits, batch['tokens'], 0), rtol=1e-6)
  with pytest.raises(ValueError, match='no text embedding'):
    model.apply({'params': params}, batch['tokens'], method=model.encode_text)


def test_parallel_rows_are_spread_evenly_and_exactly_counted():
  rows = parallel_rows(16, 0.75)
  assert rows.sum() == 12 and rows.reshape(4, 4).sum(1).tolist() == [3, 3, 3, 3]
  assert parallel_rows(8, 0.0).sum() == 0 and parallel_rows(8, 1.0).all()
  assert parallel_rows(10, 0.25).sum() == round(2.5)


def test_parallel_rows_read_no_tokens_and_see_every_position_the_others_stay_causal():
  config, model, params, batch = _setup('cappa')
  assert config.model.text.unimodal_layers and config.model.text.multimodal_layers  # both masks
  images, tokens = batch['images'][:2], jnp.asarray(batch['tokens'][:2])
  rows = jnp.array([True, False])  # row 0 parallel, row 1 teacher-forced

  def logits(params, tokens):
    return model.apply({'params': params}, images, tokens,
                       parallel_rows=rows)['caption_logits']

  t = 3
  changed = tokens.at[:, t + 1].set((tokens[:, t + 1] + 7) % 200 + 3)
  changed = changed.at[0].set(jnp.roll(changed[0], 5))  # row 0: other tokens everywhere
  before, after = logits(params, tokens), logits(params, changed)
  np.testing.assert_array_equal(before[0], after[0])  # parallel: no token reaches it
  np.testing.assert_allclose(before[1, :t + 1], after[1, :t + 1], atol=1e-6)  # causal
  assert not np.allclose(before[1, t + 1:], after[1, t + 1:])

  # Non-causal: position 0's logits depend on a later position's input (its position
  # embedding, all that distinguishes the [MASK] inputs) in the parallel row only.
  def position_0(params, row):
    return jnp.sum(logits(params, tokens)[row, 0])
  for row, sees_later in ((0, True), (1, False)):
    grad = jax.grad(position_0)(params, row)['text_decoder']['pos_embed']
    assert bool(np.any(grad[5] != 0)) == sees_later, row
  # The [MASK] embedding reaches the parallel row's logits and only them.
  grad = jax.grad(position_0)(params, 1)['text_decoder']['mask_embed']
  np.testing.assert_array_equal(grad, 0)


@pytest.mark.parametrize('name', ['cappa'])
def test_captioning_only_microbatches_give_the_whole_batch_update(name):
  """microbatches=2 (no contrastive first pass; parallel rows chosen over the global batch)
  gives the loss and SGD update of one pass: CapPa's batch holds both kinds of row, Cap's
  teacher-forced ones only."""
  config = shrink(load_config(name))
  config.batch_size = 16
  model = build_model(config)
  tx, schedule = make_optimizer(config.optim, config.total_steps)
  mesh = sharding.make_mesh(config.mesh, None)
  state, _ = step.create_train_state(model, tx, schedule, config, mesh, jax.random.key(0))
  sgd = optax.sgd(lambda count: 0.5)
  state = state.replace(tx=sgd, opt_state=sgd.init(state.params))
  batch = next(iter(pipeline.train_dataset(config, 0, 1)))
  (one, m1), (two, m2) = (jax.jit(step.train_step)(state.replace(microbatches=k), batch)
                          for k in (1, 2))
  for key in m1:
    np.testing.assert_allclose(m2[key], m1[key], rtol=2e-5, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               two.params, one.params)
