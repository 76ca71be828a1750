"""The train step: real updates lower the loss; state created in its shardings."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vlrep import losses, step
from vlrep.data import pipeline
from vlrep.models.build import build_model
from vlrep.optim import make_optimizer
from vlrep.parallel import sharding


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


@pytest.mark.parametrize('contrastive_type, impl, mesh, similarity', [
    ('softmax', 'gather', {'data': 2, 'fsdp': 2, 'tensor': 2}, 'global'),
    # One case for the rest (each costs two compiles of the step): the sigmoid loss's bias,
    # the ring and FILIP's token embeddings (whose mask is cached beside them).
    ('sigmoid', 'ring', {'data': 4, 'fsdp': 2, 'tensor': 1}, 'token'),
])
def test_microbatches_keep_every_negative(config, contrastive_type, impl, mesh, similarity):
  """K=4 passes of 8 give the loss and the update of one pass over 32 (GradCache), FILIP's
  token embeddings (and text masks) cached as the vectors are."""
  config.batch_size = 32
  config.mesh.update(mesh)
  config.loss.update(contrastive_type=contrastive_type, contrastive_impl=impl,
                     contrastive_similarity=similarity, token_similarity_chunk=0)
  if similarity == 'token':
    config.model.update(pooler='none', image_pool='avg')
  batch = next(iter(pipeline.train_dataset(config, 0, 1)))
  # Plain SGD, so that the update is the gradient itself (Adam's first step is ~sign(grad));
  # with a schedule, whose count the step reads for the rate it logs.
  sgd = optax.sgd(lambda count: 0.5)
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


def test_temperature_at_its_bound_stays_trainable_and_clamped(config):
  """A log-scale sitting at ln 100 still has a gradient: descending it (the loss of a
  random model wants a lower scale) moves it below the bound; ascending stays clamped at
  exactly ln 100. Plain SGD whose rate is state (one compiled step serves both signs)."""
  config.mesh.update(data=1)
  batch = next(iter(pipeline.train_dataset(config, 0, 1)))
  state, _ = _state(config, jax.devices()[:1])
  bound = np.float32(np.log(100.0))
  # -step_size * grad, the step size a hyperparameter in the state; the schedule's state is
  # where the step reads the rate it logs.
  sgd = optax.chain(optax.inject_hyperparams(optax.scale)(step_size=0.0),
                    optax.scale_by_learning_rate(lambda count: 1.0))
  state = state.replace(params={**state.params, 'logit_scale': jnp.asarray(bound)}, tx=sgd)
  grad = jax.jit(jax.grad(
      lambda p: step.compute_losses(state.model, p, batch, state.loss_config)[0]))(
          state.params)['logit_scale']
  assert float(grad) > 1e-3  # live at the bound (exp(min(x, ln 100)) would give 0 here)
  train_step = jax.jit(step.train_step)
  for learning_rate in (0.5, -0.5):
    opt_state = sgd.init(state.params)
    opt_state[0].hyperparams['step_size'] = jnp.asarray(learning_rate, jnp.float32)
    after, metrics = train_step(state.replace(opt_state=opt_state), batch)
    if learning_rate > 0:
      want = bound - learning_rate * float(grad)
      assert float(after.params['logit_scale']) == pytest.approx(want, rel=1e-5)
    else:
      assert float(after.params['logit_scale']) == bound
    assert float(metrics['train/logit_scale']) == pytest.approx(100.0, rel=1e-5)


def test_logged_learning_rate_is_the_rate_applied_after_skipped_steps(config):
  """A skipped (non-finite) step does not advance the optimizer, so the next update applies
  the rate of the count before it, and that is what `train/learning_rate` says."""
  config.optim.update(learning_rate=1e-2, warmup_steps=10)
  config.total_steps = 100
  config.mesh.update(data=1)
  state, _ = _state(config, jax.devices()[:1])
  batch = next(iter(pipeline.train_dataset(config, 0, 1)))
  train_step = jax.jit(step.train_step)
  state, first = train_step(state, batch)
  nan = state.params['logit_scale'] * np.nan
  bad = state.replace(params={**state.params, 'logit_scale': nan})
  skipped, second = train_step(bad, batch)
  assert not bool(second['train/finite'])
  good = skipped.replace(params=state.params)
  assert int(good.step) == 2
  _, third = train_step(good, batch)
  schedule = state.learning_rate_fn
  assert float(first['train/learning_rate']) == float(schedule(0)) == 0.0
  assert float(third['train/learning_rate']) == pytest.approx(float(schedule(1)))  # not (2)
  assert float(schedule(1)) == pytest.approx(1e-3)


@pytest.mark.parametrize('chunk', [0, 5])
def test_bfloat16_caption_loss_reads_float32_logits(config, chunk):
  """With model.dtype=bfloat16 the caption loss is the float32 cross-entropy of the output
  head applied in float32 to the bfloat16 features (bfloat16-rounded logits over this
  vocabulary change the loss by ~1e-4, 30x this tolerance), chunked or not."""
  config.model.dtype = 'bfloat16'
  config.loss.caption_chunk = chunk
  config.mesh.update(data=1)
  state, _ = _state(config, jax.devices()[:1])
  batch = next(iter(pipeline.train_dataset(config, 0, 1)))

  def both(params):
    _, metrics = step.compute_losses(state.model, params, batch, state.loss_config)
    features = state.model.apply({'params': params}, batch['images'], batch['tokens'],
                                 caption_features=True)['caption_features']
    head = jax.tree.map(lambda p: p.astype(jnp.bfloat16).astype(jnp.float32),
                        params['text_decoder']['output_head'])
    logits = features.astype(jnp.float32) @ head['kernel'] + head['bias']
    pad_id = state.model.text_decoder.pad_id
    return (metrics['caption_loss'], losses.caption_loss(logits, batch['tokens'], pad_id),
            losses.caption_loss(logits.astype(jnp.bfloat16), batch['tokens'], pad_id))

  got, want, rounded = jax.jit(both)(state.params)
  assert float(got) == pytest.approx(float(want), rel=1e-6, abs=3e-6)
  assert abs(float(rounded) - float(want)) > 3e-5  # what the tolerance is there to catch


@pytest.mark.parametrize('chunk, microbatches', [(5, 1), (0, 2)])
def test_the_model_pad_id_is_the_one_the_losses_skip(config, chunk, microbatches):
  """A model with text.pad_id=4 on batches padded with 4 trains exactly as pad id 0 on the
  same batches padded with 0: the losses and every gradient agree (a step that skipped a
  hard-coded 0 would count the 4s as caption targets)."""
  config.loss.caption_chunk = chunk
  config.mesh.update(data=1)
  batch = next(iter(pipeline.train_dataset(config, 0, 1)))
  tokens = np.asarray(batch['tokens'])
  assert (tokens == 0).any() and not (tokens == 4).any()
  results = {}
  for pad_id in (0, 4):
    config.model.text.pad_id = pad_id
    state, _ = _state(config, jax.devices()[:1])
    sgd = optax.sgd(lambda count: 1.0)
    state = state.replace(tx=sgd, opt_state=sgd.init(state.params), microbatches=microbatches)
    padded = dict(batch, tokens=jnp.asarray(np.where(tokens == 0, pad_id, tokens)))
    results[pad_id] = jax.jit(step.train_step)(state, padded)
  (zero, zero_metrics), (four, four_metrics) = results[0], results[4]
  for key in ('train/caption_loss', 'train/contrastive_loss', 'train/grad_norm'):
    np.testing.assert_allclose(four_metrics[key], zero_metrics[key], rtol=1e-5, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               four.params, zero.params)


def _bits(x):
  x = np.asarray(x)
  return x.view(np.dtype(f'u{x.dtype.itemsize}'))


@pytest.mark.parametrize('scan_layers, microbatches', [(False, 1), (True, 2)])
def test_frozen_parameters_stay_bit_identical_and_take_no_gradient(config, scan_layers,
                                                                   microbatches):
  """optim.freeze: after real AdamW steps (non-zero rate, weight decay on) the frozen image
  tower, token embedding and temperature are bit for bit what they were, a -0.0 included
  (`param + 0` would flip it), while every other leaf moved; also scanned and with
  microbatches (the GradCache path). The step lowers to fewer dot products than the same
  state without its stop_gradient: the frozen tower's backward pass is gone."""
  config.optim.update(learning_rate=3e-3, warmup_steps=0, weight_decay=0.05,
                      freeze=('image_encoder/.*', 'logit_scale', 'text_decoder/token_embed/.*'))
  config.model.scan_layers = scan_layers
  config.microbatches = microbatches
  config.mesh.update(data=1)
  state, _ = _state(config, jax.devices()[:1])
  assert state.freeze == config.optim.freeze and state.microbatches == microbatches
  ln_final = state.params['image_encoder']['ln_final']
  ln_final = {**ln_final, 'bias': ln_final['bias'].at[0].set(-0.0)}
  state = state.replace(params={**state.params, 'image_encoder': {
      **state.params['image_encoder'], 'ln_final': ln_final}})
  batch = next(iter(pipeline.train_dataset(config, 0, 1)))
  lowered = jax.jit(step.train_step).lower(state, batch)
  without_stop = jax.jit(step.train_step).lower(state.replace(freeze=()), batch)
  assert (lowered.as_text().count('dot_general') <
          without_stop.as_text().count('dot_general'))
  train_step = lowered.compile()
  after = state
  for _ in range(3):
    after, metrics = train_step(after, batch)
    assert bool(metrics['train/finite'])
  before = dict(jax.tree_util.tree_leaves_with_path(state.params))
  frozen = 0
  for path, new in jax.tree_util.tree_leaves_with_path(after.params):
    name = jax.tree_util.keystr(path)
    if name.startswith(("['image_encoder']", "['logit_scale']",
                        "['text_decoder']['token_embed']")):
      assert np.array_equal(_bits(new), _bits(before[path])), name
      frozen += 1
    else:
      assert not np.array_equal(np.asarray(new), np.asarray(before[path])), name
  assert frozen > 10
  assert np.signbit(after.params['image_encoder']['ln_final']['bias'][0])
