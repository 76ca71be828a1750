"""FILIP's token-wise loss against explicit numpy loops, and its sharded gather / ring forms
against the global reference, values and gradients, on 1 and 8 simulated devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vlrep import late_interaction, losses

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')


def _normalised(rng, shape):
  x = rng.normal(size=shape)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _example(rng, batch, patches, length, width):
  img = _normalised(rng, (batch, patches, width))
  txt = _normalised(rng, (batch, length, width))
  lengths = rng.integers(1, length + 1, size=batch)
  mask = np.arange(length)[None] < lengths[:, None]
  return img, txt, mask


def _by_hand(img, txt, mask, scale, bias=None):
  """FILIP eq. 4-5 and the losses, one pair and one token at a time."""
  batch = len(img)
  s_i2t, s_t2i = np.zeros((batch, batch)), np.zeros((batch, batch))
  for i in range(batch):
    for j in range(batch):
      valid = [r for r in range(txt.shape[1]) if mask[j, r]]
      dots = [[float(np.dot(img[i, k], txt[j, r])) for r in valid] for k in range(img.shape[1])]
      s_i2t[i, j] = np.mean([max(row) for row in dots])
      s_t2i[i, j] = np.mean([max(dots[k][r] for k in range(img.shape[1]))
                             for r in range(len(valid))])
  if bias is not None:
    total = 0.0
    for s in (s_i2t, s_t2i):
      for i in range(batch):
        for j in range(batch):
          z = 1.0 if i == j else -1.0
          total += np.log1p(np.exp(-z * (scale * s[i, j] + bias)))
    return total / (2 * batch), s_i2t, s_t2i
  i2t = np.mean([np.log(np.sum(np.exp(scale * s_i2t[i]))) - scale * s_i2t[i, i]
                 for i in range(batch)])
  t2i = np.mean([np.log(np.sum(np.exp(scale * s_t2i[:, j]))) - scale * s_t2i[j, j]
                 for j in range(batch)])
  return (i2t + t2i) / 2, s_i2t, s_t2i


@pytest.mark.parametrize('loss_type', losses.CONTRASTIVE_TYPES)
def test_token_loss_matches_loops_and_padding_never_wins_a_max(loss_type):
  rng = np.random.default_rng(0)
  img, txt, mask = _example(rng, 3, 2, 3, 4)
  mask[:, 0] = True
  mask[1, 1:] = False
  # Text 1's padded tokens are image 0's patches: they would win every max they entered.
  txt[1, 1:] = img[0]
  scale, bias = 5.0, (-2.0 if loss_type == 'sigmoid' else None)
  want, want_i2t, want_t2i = _by_hand(img, txt, mask, scale, bias)
  s_i2t, s_t2i = late_interaction.token_similarities(img, txt, mask)
  np.testing.assert_allclose(s_i2t, want_i2t, rtol=1e-5)
  np.testing.assert_allclose(s_t2i, want_t2i, rtol=1e-5)
  assert s_i2t[0, 1] < 0.999  # a padded copy of the patch would have scored 1

  def loss(txt):
    return late_interaction.token_contrastive_loss(
        jnp.asarray(img), txt, jnp.asarray(mask), jnp.asarray(scale),
        None if bias is None else jnp.asarray(bias), loss_type)
  got, grad = jax.value_and_grad(loss)(jnp.asarray(txt))
  assert float(got) == pytest.approx(want, rel=1e-5)
  assert np.all(np.asarray(grad)[~mask] == 0) and np.all(np.abs(np.asarray(grad)[mask]) > 0)


def _mesh(shape):
  devices = jax.devices()[:int(np.prod(shape))]
  return Mesh(np.array(devices).reshape(shape), MESH_AXES)


@pytest.mark.parametrize('mesh_shape, chunk', [((1, 1, 1), 3), ((2, 2, 2), 3)])
@pytest.mark.parametrize('impl', losses.CONTRASTIVE_IMPLS)
@pytest.mark.parametrize('loss_type', losses.CONTRASTIVE_TYPES)
def test_sharded_token_loss_matches_reference(loss_type, impl, mesh_shape, chunk):
  if len(jax.devices()) < np.prod(mesh_shape):
    pytest.skip('needs 8 (simulated) devices')
  rng = np.random.default_rng(1)
  img, txt, mask = (jnp.asarray(x) for x in _example(rng, 16, 3, 4, 8))
  scale, bias = jnp.asarray(6.0), jnp.asarray(-3.0)
  sigmoid = loss_type == 'sigmoid'

  def reference(img, txt, scale, bias):
    return late_interaction.token_contrastive_loss(img, txt, mask, scale,
                                                   bias if sigmoid else None, loss_type)
  want, want_grads = jax.value_and_grad(reference, argnums=(0, 1, 2, 3))(img, txt, scale, bias)

  mesh = _mesh(mesh_shape)

  def sharded(img, txt, mask, scale, bias):
    return late_interaction.contrastive_loss(
        img, txt, mask, scale, bias if sigmoid else None, loss_type=loss_type, impl=impl,
        mesh=mesh, batch_axes=BATCH_AXES, chunk=chunk)
  rows = NamedSharding(mesh, P(BATCH_AXES))
  got, grads = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 3, 4)))(
      *(jax.device_put(x, rows) for x in (img, txt, mask)), scale, bias)
  np.testing.assert_allclose(got, want, rtol=2e-6)
  for name, grad, want_grad in zip(('image_tokens', 'text_tokens', 'logit_scale', 'logit_bias'),
                                   grads, want_grads):
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6, err_msg=name)
  assert np.abs(np.asarray(grads[1])).sum() > 0


def test_token_loss_rejects_bad_settings():
  x = jnp.zeros((2, 1, 4))
  mask = jnp.ones((2, 1), bool)
  with pytest.raises(ValueError, match='contrastive_type'):
    late_interaction.contrastive_loss(x, x, mask, 1.0, loss_type='hinge')
  with pytest.raises(ValueError, match='needs a logit_bias'):
    late_interaction.contrastive_loss(x, x, mask, 1.0, loss_type='sigmoid')
