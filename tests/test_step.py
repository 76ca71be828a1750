"""The train step: real updates lower the loss; state created in its shardings."""

import jax
import numpy as np
import optax
import pytest

from vlrep import sharding, step
from vlrep.data import pipeline
from vlrep.models.coca import build_model
from vlrep.optim import make_optimizer


def _state(config, devices=None):
  model = build_model(config)
  tx, schedule = make_optimizer(config.optim, config.total_steps)
  mesh = sharding.make_mesh(config.mesh, devices)
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
              'train/learning_rate', 'train/grad_norm', 'train/finite'}
  assert set(metrics) == expected
  assert bool(metrics['train/finite'])

  # A non-finite loss (here from a NaN parameter) drops the update: parameters and optimizer
  # state come back bit for bit, the step counter moves on, and the flag says so.
  nan = state.params['logit_scale'] * np.nan  # same sharding: no recompile
  bad = state.replace(params={**state.params, 'logit_scale': nan})
  after, metrics = train_step(bad, batch)
  assert not bool(metrics['train/finite'])
  assert np.isnan(metrics['train/loss']) and np.isnan(metrics['train/grad_norm'])
  jax.tree.map(np.testing.assert_array_equal, (after.params, after.opt_state),
               (bad.params, bad.opt_state))
  assert int(after.step) == 9


@pytest.mark.parametrize('contrastive_type, impl, mesh', [
    ('softmax', 'gather', {'data': 2, 'fsdp': 2, 'tensor': 2}),
    ('sigmoid', 'ring', {'data': 4, 'fsdp': 2, 'tensor': 1}),
])
def test_microbatches_keep_every_negative(config, contrastive_type, impl, mesh):
  """K=4 passes of 8 give the loss and the update of one pass over 32 (GradCache)."""
  config.batch_size = 32
  config.mesh.update(mesh)
  config.loss.update(contrastive_type=contrastive_type, contrastive_impl=impl)
  batch = next(iter(pipeline.train_dataset(config, 0, 1)))
  # Plain SGD, so that the update is the gradient itself (Adam's first step is ~sign(grad)).
  sgd = optax.sgd(0.5)
  state, _ = _state(config)
  state = state.replace(tx=sgd, opt_state=sgd.init(state.params))
  results = {k: jax.jit(step.train_step)(state.replace(microbatches=k), batch) for k in (1, 4)}
  (one, one_metrics), (four, four_metrics) = results[1], results[4]
  assert four.microbatches == 4
  for key in one_metrics:
    np.testing.assert_allclose(four_metrics[key], one_metrics[key], rtol=2e-5, err_msg=key)
  assert ('train/logit_bias' in four_metrics) == (contrastive_type == 'sigmoid')
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               four.params, one.params)


@pytest.mark.parametrize('mesh', [{'data': 1, 'fsdp': 1, 'tensor': 1},
                                  {'data': 2, 'fsdp': 2, 'tensor': 2}])
def test_chunked_caption_loss_gives_the_unchunked_losses_and_gradients(config, mesh):
  """loss.caption_chunk (the fused head + cross-entropy) against 0 (full logits), through
  the real forward: same losses and the same gradient for every parameter, the output
  head's included, on one device and with batch, FSDP and vocabulary sharding."""
  config.mesh.update(mesh)
  devices = jax.devices()[:1] if mesh['data'] == 1 else None
  batch = next(iter(pipeline.train_dataset(config, 0, 1)))
  model = build_model(config)
  state, _ = _state(config, devices)
  results = {}
  for chunk in (0, 5):  # 5 does not divide the 23 target positions
    config.loss.caption_chunk = chunk
    loss_config = step.LossConfig.from_config(config.loss)

    def loss(params, loss_config=loss_config):
      total, metrics = step.compute_losses(model, params, batch, loss_config)
      return total, metrics

    results[chunk] = jax.jit(jax.value_and_grad(loss, has_aux=True))(state.params)
  (total0, metrics0), grads0 = results[0]
  (total5, metrics5), grads5 = results[5]
  np.testing.assert_allclose(total5, total0, rtol=1e-5)
  np.testing.assert_allclose(metrics5['caption_loss'], metrics0['caption_loss'], rtol=1e-5)
  assert float(np.abs(grads0['text_decoder']['output_head']['kernel']).max()) > 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6),
               grads5, grads0)
