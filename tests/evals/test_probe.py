"""Linear probe: L-BFGS reaches the optimum, the held-out split picks L2, multi-hot labels.

Every call has the same shapes, so the fit compiles once.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlrep.evals import probe

GRID = (1e-4, 1e-2, 1.0, 30.0)


def _blobs(n, rng, centres):
  y = rng.integers(0, len(centres), n)
  return (centres[y] + rng.normal(size=(n, centres.shape[1])) * 1.5).astype(np.float32), y


def test_probe_converges_picks_l2_on_held_out_data_and_takes_multi_hot_labels():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(4, 16))
  x, y = _blobs(500, rng, centres)
  test_x, test_y = _blobs(400, rng, centres)
  out = probe.linear_probe(x, y, test_x, test_y, l2_grid=GRID, steps=100)
  # Equal-covariance Gaussians: the nearest centre is the Bayes-optimal (linear) rule.
  bayes = np.mean(((test_x[:, None] - centres) ** 2).sum(-1).argmin(1) == test_y)
  assert abs(out['accuracy'] - bayes) < 0.05
  assert out['l2'] != 30.0  # a penalty that flattens the classes loses on held-out data

  # The fit is the minimiser: the gradient of its objective vanishes there.
  xs = jnp.asarray((x - x.mean(0)) / (x.std(0) + 1e-6))
  targets = jnp.asarray(np.eye(4, dtype=np.float32)[y])
  l2 = 1e-2
  fits = probe._fit(xs, targets, jnp.ones((2 * len(GRID), len(y))),
                    jnp.full((2 * len(GRID),), l2), 100)
  params = jax.tree.map(lambda a: a[0], fits)

  def objective(p):
    xent = -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(xs @ p['w'] + p['b']), -1))
    return xent + 0.5 * l2 * jnp.sum(p['w'] ** 2)
  grad = jax.grad(objective)(params)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grad)) < 1e-4

  # Multi-hot labels: one-hot ones fit exactly as class indices do, and a test image that
  # also shows another class is right when either is predicted (never less accurate).
  one_hot = np.eye(4, dtype=bool)
  test_multi = one_hot[test_y] | one_hot[(test_y + 1) % 4]
  out_multi = probe.linear_probe(x, one_hot[y], test_x, test_multi, l2_grid=GRID, steps=100)
  assert out_multi['l2'] == out['l2'] and out_multi['accuracy'] > out['accuracy']

  with pytest.raises(ValueError, match='val_fraction'):
    probe.linear_probe(x[:2], y[:2], x, y, l2_grid=(1.0,), val_fraction=0.01)
