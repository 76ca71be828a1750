"""Losses against numpy computed by hand."""

import jax.numpy as jnp
import numpy as np
import pytest

from vlrep import losses


def _log_softmax(x, axis):
  x = x - x.max(axis=axis, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


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


def test_contrastive_loss_of_two_orthogonal_pairs_by_hand():
  # Perfectly matched orthogonal pairs at scale s: each row is softmax over (s, 0).
  eye = jnp.eye(2)
  got = losses.softmax_contrastive_loss(eye, eye, jnp.asarray(3.0))
  assert float(got) == pytest.approx(np.log(1 + np.exp(-3.0)), rel=1e-6)


def test_caption_loss_ignores_padding():
  rng = np.random.default_rng(1)
  tokens = np.array([[1, 5, 6, 2, 0, 0], [1, 7, 2, 0, 0, 0]], np.int32)
  logits = rng.normal(size=(2, 5, 9)).astype(np.float32)
  logp = _log_softmax(logits, axis=-1)
  targets = tokens[:, 1:]
  terms = [-logp[b, t, targets[b, t]] for b in range(2) for t in range(5) if targets[b, t] != 0]
  got = losses.caption_loss(jnp.asarray(logits), jnp.asarray(tokens))
  assert float(got) == pytest.approx(np.mean(terms), rel=1e-5)
  # Logits at padded targets do not matter.
  logits[0, 4] += 100.0
  logits[1, 2:] -= 50.0
  assert float(losses.caption_loss(jnp.asarray(logits), jnp.asarray(tokens))) == pytest.approx(
      np.mean(terms), rel=1e-5)
