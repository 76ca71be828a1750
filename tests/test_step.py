"""The train step: real updates lower the loss; state created in its shardings."""

import jax
import numpy as np

from vlrep import sharding, step
from vlrep.data import pipeline
from vlrep.models.coca import build_model
from vlrep.optim import make_optimizer


def _state(config):
  model = build_model(config)
  tx, schedule = make_optimizer(config.optim, config.total_steps)
  mesh = sharding.make_mesh(config.mesh)
  return step.create_train_state(model, tx, schedule, config, mesh, jax.random.key(0))


def test_steps_on_a_fixed_batch_lower_the_loss(config):
  config.optim.update(learning_rate=3e-3, warmup_steps=0)
  config.total_steps = 100
  state, _ = _state(config)
  batch = next(iter(pipeline.train_dataset(config, 0, 1)))
  train_step = jax.jit(step.train_step)
  losses = []
  for _ in range(8):
    state, metrics = train_step(state, batch)
    losses.append(float(metrics['train/loss']))
  assert losses[-1] < 0.8 * losses[0], losses
  assert int(state.step) == 8
  expected = {'train/loss', 'train/contrastive_loss', 'train/caption_loss', 'train/logit_scale',
              'train/learning_rate', 'train/grad_norm'}
  assert set(metrics) == expected


def test_loss_is_the_weighted_sum_of_its_parts(config):
  config.loss.update(contrastive_weight=0.5, caption_weight=3.0)
  state, _ = _state(config)
  batch = next(iter(pipeline.train_dataset(config, 0, 1)))
  _, metrics = jax.jit(step.train_step)(state, batch)
  expected = 0.5 * metrics['train/contrastive_loss'] + 3.0 * metrics['train/caption_loss']
  np.testing.assert_allclose(metrics['train/loss'], expected, rtol=1e-6)


def test_state_is_created_with_its_shardings(config):
  state, shardings = _state(config)
  kernel = state.params['text_decoder']['unimodal_0']['mlp']['fc1']['kernel']
  assert kernel.sharding == shardings.params['text_decoder']['unimodal_0']['mlp']['fc1']['kernel']
  # Adam's moments mirror the parameters, with the same shardings.
  assert jax.tree.structure(state.opt_state[1][0].mu) == jax.tree.structure(state.params)
