"""Losses against numpy computed by hand, and the sharded contrastive losses against the
global references on simulated 8-device meshes (tests/conftest.py sets the device count)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vlrep import losses

# Stand-ins for vlrep.parallel.sharding's names: losses.py must take whatever the caller passes.
MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')

needs_8_devices = pytest.mark.skipif(len(jax.devices()) < 8, reason='needs 8 (simulated) devices')


def _log_softmax(x, axis):
  x = x - x.max(axis=axis, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def _normalised(rng, shape):
  x = rng.normal(size=shape)
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _mesh(shape):
  return Mesh(np.array(jax.devices()[:8]).reshape(shape), MESH_AXES)


def test_softmax_contrastive_loss_matches_numpy():
  rng = np.random.default_rng(0)
  img = rng.normal(size=(5, 4)); img /= np.linalg.norm(img, axis=1, keepdims=True)
  txt = rng.normal(size=(5, 4)); txt /= np.linalg.norm(txt, axis=1, keepdims=True)
  scale = 7.5
  logits = scale * img @ txt.T
  i2t = -np.diag(_log_softmax(logits, axis=1)).mean()
  t2i = -np.diag(_log_softmax(logits, axis=0)).mean()
  got = losses.softmax_contrastive_loss(jnp.asarray(img), jnp.asarray(txt), jnp.asarray(scale))
  assert float(got) == pytest.approx((i2t + t2i) / 2, rel=1e-5)
  # Without a mesh, contrastive_loss is the reference.
  got = losses.contrastive_loss(jnp.asarray(img), jnp.asarray(txt), jnp.asarray(scale))
  assert float(got) == pytest.approx((i2t + t2i) / 2, rel=1e-5)


def test_contrastive_loss_of_two_orthogonal_pairs_by_hand():
  # Perfectly matched orthogonal pairs at scale s: each row is softmax over (s, 0).
  eye = jnp.eye(2)
  got = losses.softmax_contrastive_loss(eye, eye, jnp.asarray(3.0))
  assert float(got) == pytest.approx(np.log(1 + np.exp(-3.0)), rel=1e-6)


def test_sigmoid_contrastive_loss_matches_numpy():
  rng = np.random.default_rng(2)
  img, txt = _normalised(rng, (6, 4)), _normalised(rng, (6, 4))
  scale, bias = 10.0, -4.0
  logits = scale * img.astype(np.float64) @ txt.T + bias
  signs = np.where(np.eye(6, dtype=bool), 1.0, -1.0)
  # -log sigmoid(x) = log(1 + exp(-x))
  want = np.log1p(np.exp(-signs * logits)).sum() / 6
  got = losses.sigmoid_contrastive_loss(jnp.asarray(img), jnp.asarray(txt), jnp.asarray(scale),
                                        jnp.asarray(bias))
  assert float(got) == pytest.approx(want, rel=1e-5)
  got = losses.contrastive_loss(jnp.asarray(img), jnp.asarray(txt), jnp.asarray(scale),
                                jnp.asarray(bias), loss_type='sigmoid')
  assert float(got) == pytest.approx(want, rel=1e-5)


def test_sigmoid_loss_of_two_orthogonal_pairs_by_hand():
  # Positives have logit s + b, negatives b: loss = (2 softplus(-(s+b)) + 2 softplus(b)) / 2.
  eye = jnp.eye(2)
  got = losses.sigmoid_contrastive_loss(eye, eye, jnp.asarray(3.0), jnp.asarray(-1.0))
  assert float(got) == pytest.approx(np.log1p(np.exp(-2.0)) + np.log1p(np.exp(-1.0)), rel=1e-6)


@pytest.mark.parametrize('kwargs, match', [
    (dict(loss_type='clip'), 'loss.contrastive_type'),
    (dict(impl='allreduce'), 'loss.contrastive_impl'),
    (dict(loss_type='sigmoid'), 'logit_bias'),
])
def test_contrastive_loss_rejects_bad_settings(kwargs, match):
  eye = jnp.eye(2)
  with pytest.raises(ValueError, match=match):
    losses.contrastive_loss(eye, eye, jnp.asarray(1.0), **kwargs)


@functools.cache
def _reference_value_and_grads(loss_type):
  """Inputs, global reference loss and its gradients w.r.t. all four inputs."""
  rng = np.random.default_rng(3)
  inputs = (_normalised(rng, (32, 8)), _normalised(rng, (32, 8)), np.float32(10.0),
            np.float32(-5.0))
  if loss_type == 'softmax':
    reference = lambda x, y, scale, bias: losses.softmax_contrastive_loss(x, y, scale)
  else:
    reference = losses.sigmoid_contrastive_loss
  return inputs, jax.value_and_grad(reference, argnums=(0, 1, 2, 3))(*inputs)


@needs_8_devices
@pytest.mark.parametrize('mesh_shape', [(8, 1, 1), (2, 2, 2), (2, 4, 1)])
@pytest.mark.parametrize('impl', losses.CONTRASTIVE_IMPLS)
@pytest.mark.parametrize('loss_type', losses.CONTRASTIVE_TYPES)
def test_sharded_contrastive_loss_matches_reference(loss_type, impl, mesh_shape):
  mesh = _mesh(mesh_shape)
  (img, txt, *scalars), (want, want_grads) = _reference_value_and_grads(loss_type)

  def sharded(x, y, scale, bias):
    return losses.contrastive_loss(x, y, scale, bias if loss_type == 'sigmoid' else None,
                                   loss_type=loss_type, impl=impl, mesh=mesh,
                                   batch_axes=BATCH_AXES)

  batch = NamedSharding(mesh, P(BATCH_AXES))
  got, grads = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2, 3)))(
      jax.device_put(img, batch), jax.device_put(txt, batch), *scalars)
  np.testing.assert_allclose(got, want, rtol=2e-6)
  for name, grad, want_grad in zip(('image_emb', 'text_emb', 'logit_scale', 'logit_bias'),
                                   grads, want_grads):
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6, err_msg=name)


@needs_8_devices
def test_ring_compiles_to_less_memory_than_gather():
  # Per-device temporaries of value-and-grad; compiled only, never run.
  mesh = _mesh((8, 1, 1))
  emb = jax.ShapeDtypeStruct((4096, 64), jnp.float32, sharding=NamedSharding(mesh, P(BATCH_AXES)))
  scalar = jax.ShapeDtypeStruct((), jnp.float32)
  temp = {}
  for impl in losses.CONTRASTIVE_IMPLS:
    loss = lambda x, y, scale: losses.contrastive_loss(x, y, scale, impl=impl, mesh=mesh,
                                                       batch_axes=BATCH_AXES)
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(emb, emb,
                                                                          scalar).compile()
    analysis = compiled.memory_analysis()
    if analysis is None or analysis.temp_size_in_bytes is None:
      pytest.skip('backend reports no compiled memory analysis')
    temp[impl] = analysis.temp_size_in_bytes
  # Gather holds two 512 x 4096 logits blocks and their gradients; ring a few 512 x 512.
  assert temp['ring'] * 3 < temp['gather'], temp


@pytest.mark.parametrize('pad_id', [0, 8])
def test_caption_loss_ignores_padding(pad_id):
  """Targets equal to the pad id weigh nothing, and only those: with pad id 8, token 0 is
  an ordinary target."""
  rng = np.random.default_rng(1)
  tokens = np.array([[1, 5, 0, 2, 0, 0], [1, 7, 2, 0, 0, 0]], np.int32)
  tokens[:, 3:] = np.where(tokens[:, 3:] == 0, pad_id, tokens[:, 3:])
  logits = rng.normal(size=(2, 5, 9)).astype(np.float32)
  logp = _log_softmax(logits, axis=-1)
  targets = tokens[:, 1:]
  terms = [-logp[b, t, targets[b, t]] for b in range(2) for t in range(5)
           if targets[b, t] != pad_id]
  assert len(terms) == (4 if pad_id == 0 else 5)
  got = losses.caption_loss(jnp.asarray(logits), jnp.asarray(tokens), pad_id)
  assert float(got) == pytest.approx(np.mean(terms), rel=1e-5)
  # Logits at padded targets do not matter.
  logits[0, 4] += 100.0
  logits[1, 3:] -= 50.0
  assert float(losses.caption_loss(jnp.asarray(logits), jnp.asarray(tokens), pad_id)) == \
      pytest.approx(np.mean(terms), rel=1e-5)


@pytest.mark.parametrize('pad_id', [0, 5])
def test_chunked_caption_loss_equals_the_plain_loss_and_its_gradient(pad_id):
  rng = np.random.default_rng(2)
  batch, length, width, vocab = 3, 10, 8, 37
  tokens = rng.integers(0, vocab, (batch, length)).astype(np.int32)
  tokens[tokens == pad_id] = pad_id + 1
  tokens[0, 6:] = pad_id  # padding: its positions must weigh nothing in either loss
  tokens[2, 3:] = pad_id
  features = jnp.asarray(rng.normal(size=(batch, length - 1, width)), jnp.float32)
  head = {'kernel': jnp.asarray(rng.normal(size=(width, vocab)), jnp.float32),
          'bias': jnp.asarray(rng.normal(size=(vocab,)), jnp.float32)}
  apply_head = lambda h, x: x @ h['kernel'] + h['bias']

  def plain(features, head):
    return losses.caption_loss(apply_head(head, features), jnp.asarray(tokens), pad_id)

  def chunked(features, head, chunk):
    return losses.chunked_caption_loss(features, jnp.asarray(tokens), apply_head, head, chunk,
                                       pad_id)

  value_and_grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1)), static_argnums=2)
  want, want_grads = value_and_grad(lambda f, h, _: plain(f, h))(features, head, 0)
  chunked_grad = value_and_grad(chunked)
  # 4 does not divide the 9 positions (a padded last slice); 50 is more than all of them.
  for chunk in (1, 4, 50):
    got, got_grads = chunked_grad(features, head, chunk)
    assert float(got) == pytest.approx(float(want), rel=1e-5), chunk
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
  # Without differentiation (the custom VJP's plain path), and a cotangent other than 1.
  assert float(jax.jit(chunked, static_argnums=2)(features, head, 4)) == pytest.approx(
      float(want), rel=1e-5)
  scaled_grads = jax.grad(lambda f, h: 2.5 * chunked(f, h, 4), argnums=(0, 1))(features, head)
  for g, w in zip(jax.tree.leaves(scaled_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, 2.5 * w, rtol=1e-4, atol=1e-6)
  # bfloat16 head parameters (model.param_dtype): gradients come back in bfloat16, summed
  # over the slices in float32 (so within bfloat16 rounding of the float32 ones).
  bf16_head = jax.tree.map(lambda p: p.astype(jnp.bfloat16), head)
  _, (_, bf16_grads) = chunked_grad(features, bf16_head, 1)
  for g, w in zip(jax.tree.leaves(bf16_grads), jax.tree.leaves(want_grads[1])):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(g), w, rtol=0.05, atol=0.05 * np.abs(w).max())
  with pytest.raises(ValueError, match='caption_chunk'):
    chunked(features, head, 0)
