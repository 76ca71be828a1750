"""The attentive probe (vlrep/evals/attentive_probe.py): it beats the linear probe of the same
run on the synthetic shape label, gives the same probe and accuracy on 1 and 8 devices, its
loss is the cross-entropy numpy computes, and bad fields fail naming them."""

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from conftest import assert_same_params, load_config, shrink
from vlrep.evals import attentive_probe as ap
from vlrep.evals import entries
from vlrep.evals.suite import Evaluator
from vlrep.models.build import build_model, init_params
from vlrep.parallel import sharding
from vlrep.pretrained import Pretrained

_SHAPE = dict(label_key='labels/shape', train_data='synthetic:test', train_start=5_000)


def _config():
  """The shrunk tiny CoCa at 32 px in 4 px patches (64 tokens of width 32), plain patchify."""
  config = shrink(load_config('coca'))
  config.data.image_size = 32
  config.model.vision.update(patch_size=4, stem_channels=())
  return config


@pytest.fixture(scope='module')
def models():
  """The model at its initialisation, on all 8 devices and on one.

  Not trained: a run that learns shapes takes minutes (the Quickstart's; its figures are in
  the README's "Attentive probe"), and a few steps of the shrunk model change nothing that
  matters here. What the test needs is what holds at initialisation as after training: the
  tokens keep where each shape is, the pooled embedding (a 16-wide projection of a pooled
  mean) mostly does not."""
  config = _config()
  coca = build_model(config)
  params = jax.jit(lambda rng: nn.unbox(init_params(coca, config, rng)))(jax.random.key(0))
  eight = sharding.make_mesh(sharding.DATA_PARALLEL)
  one = sharding.make_mesh(sharding.DATA_PARALLEL, jax.devices()[:1])
  return config, {n: Pretrained(config, jax.device_put(params, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec())), batch_size=64, mesh=mesh)
                  for n, mesh in (('eight', eight), ('one', one))}


def _probe_config(config, **fields):
  config = config.copy_and_resolve_references()
  config.evals = ml_collections.ConfigDict({
      'linear': entries.entry('linear_probe', num_examples=200, train_examples=400, **_SHAPE),
      'attentive': entries.entry('attentive_probe', **{
          **_SHAPE, 'num_examples': 200, 'train_examples': 400, 'steps': 200, 'batch_size': 64,
          'learning_rate': 1e-2, 'heads': 2, **fields})})
  return config


def test_attentive_probe_beats_the_linear_probe_on_shape(models):
  config, on = models
  results = Evaluator(_probe_config(config))(on['eight'])
  # Measured: 0.49 against 0.345 (chance under the multi-label rule is about 0.36).
  assert results['attentive/accuracy'] > results['linear/accuracy'] + 0.05, results


def test_one_device_and_eight_train_the_same_probe(models):
  config, on = models
  images = np.stack([np.random.default_rng(i).integers(0, 256, (32, 32, 3), np.uint8)
                     for i in range(20)])
  tokens = {n: m.image_tokens(images) for n, m in on.items()}
  assert tokens['one'].shape == (20, 64, 32) and tokens['one'].dtype == np.float32
  np.testing.assert_allclose(tokens['one'], tokens['eight'], rtol=1e-5, atol=1e-5)
  labels = np.arange(20) % 3
  # A minibatch of 10 on 8 devices is padded to 16 rows of weight 0.
  fit = {n: ap.attentive_probe(tokens['eight'][:14], labels[:14], tokens['eight'][14:],
                               labels[14:], m.mesh, queries=2, heads=2, steps=5, batch_size=10,
                               learning_rate=3e-3, weight_decay=1e-4, seed=0, chunk=8)
         for n, m in on.items()}
  assert fit['one']['accuracy'] == fit['eight']['accuracy']
  assert len(jax.tree.leaves(fit['one']['params'])) > 10
  # Adam steps by about the learning rate (3e-3 at most here) whatever the gradient's size:
  # the key bias, whose exact gradient is 0 (softmax ignores a shift common to all keys),
  # moves by rounding noise; a wrong reduction would move every leaf by far more.
  assert_same_params(fit['one']['params'], fit['eight']['params'], atol=1e-4)
  # From config through the Evaluator: the same accuracy on either mesh.
  config = _probe_config(config, steps=20)
  del config.evals.linear
  evaluator = Evaluator(config)
  assert evaluator(on['one']) == pytest.approx(evaluator(on['eight']), abs=1e-9)


def _numpy_layer_norm(x, p, eps=1e-6):
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p['scale'] + p['bias']


def test_forward_and_loss_match_numpy():
  """One query, two heads, multi-hot labels: logits and weighted cross-entropy by hand."""
  rng = np.random.default_rng(0)
  tokens = rng.normal(size=(3, 5, 4)).astype(np.float32)
  probe = ap.Probe(num_classes=3, queries=2, heads=2)
  params = nn.unbox(probe.init(jax.random.key(1), tokens))['params']
  params = jax.tree.map(lambda x: np.asarray(x) + rng.normal(size=x.shape).astype(np.float32)
                        * 0.3, params)  # LayerNorm scales and biases away from 1 and 0
  p = params['pooler']
  context = _numpy_layer_norm(tokens, p['ln_context'])
  attention = p['attention']
  project = lambda x, name: np.einsum('...w,whd->...hd', x, attention[name]['kernel']) + \
      attention[name]['bias']
  q = project(p['queries'], 'query')  # [Q, heads, d]
  k, v = project(context, 'key'), project(context, 'value')  # [B, N, heads, d]
  scores = np.einsum('qhd,bnhd->bhqn', q, k) / np.sqrt(q.shape[-1])
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  pooled = np.einsum('bhqn,bnhd->bqhd', weights, v)
  pooled = np.einsum('bqhd,hdw->bqw', pooled, attention['out']['kernel']) + \
      attention['out']['bias']
  pooled = _numpy_layer_norm(pooled, p['ln_out']).mean(axis=1)
  logits = pooled @ params['head']['kernel'] + params['head']['bias']
  np.testing.assert_allclose(probe.apply({'params': params}, tokens), logits, rtol=1e-4,
                             atol=1e-5)

  labels = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 1]])
  targets = labels / labels.sum(1, keepdims=True)
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  xent = -(targets * log_p).sum(-1)
  row_weights = np.array([1.0, 1.0, 0.0])  # the last row is padding
  want = (xent * row_weights).sum() / 2
  got = ap.loss_fn(probe, params, tokens, targets.astype(np.float32), row_weights)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_minibatch_order_is_seeded_epochs():
  order = ap.minibatch_order(5, 3, 4, seed=7)
  assert order.shape == (4, 3)
  flat = order.reshape(-1)
  assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:10]) == list(range(5))
  np.testing.assert_array_equal(order, ap.minibatch_order(5, 3, 4, seed=7))
  assert not np.array_equal(order, ap.minibatch_order(5, 3, 4, seed=8))


@pytest.mark.parametrize('field, value, match', [
    ('steps', 0, r'evals\.bad\.steps must be >= 1'),
    ('batch_size', 0, r'evals\.bad\.batch_size must be >= 1'),
    ('queries', 0, r'evals\.bad\.queries must be >= 1'),
    ('heads', -1, r'evals\.bad\.heads must be >= 0'),
    ('heads', 3, r'evals\.bad\.heads=3 does not divide .*model\.vision\.width=32'),
    ('learning_rate', 0.0, r'evals\.bad: needs learning_rate > 0'),
    ('train_start', 0, r'evals\.bad: the probe would train on test examples'),
])
def test_bad_fields_fail_naming_them(config, field, value, match):
  fields = dict(_SHAPE, num_examples=12, train_examples=24)
  fields[field] = value
  if field == 'train_start':
    fields['train_data'] = ''
  with config.unlocked():
    config.evals = ml_collections.ConfigDict({'bad': entries.entry('attentive_probe', **fields)})
  with pytest.raises(ValueError, match=match):
    Evaluator(config)


def test_unknown_field_fails_naming_it():
  entry = entries.entry('attentive_probe')
  entry.l2_grid = (1.0,)  # a linear_probe field
  with pytest.raises(ValueError, match=r"evals\.bad: fields \['l2_grid'\] do not apply"):
    entries.check('bad', entry)
