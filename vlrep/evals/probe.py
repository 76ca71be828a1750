"""Linear probe: multinomial logistic regression with L2 on frozen image embeddings.

Features are the model's pooled, normalised image embeddings, standardised with the training
examples' mean and standard deviation. The classifier is fitted full-batch with optax's
L-BFGS for a fixed number of steps from zero weights: no randomness, so the result is a
function of the features alone (the same on every process). The L2 strength is the one of
`l2_grid` with the best accuracy on the last `val_fraction` of the training examples after
fitting on the rest; the probe refitted on all training examples with it is scored on the
test examples (every fit, held-out and final, in one vmapped and jitted call). Multi-hot
labels (images showing several classes) are fitted as the normalised label distribution and
a prediction counts as correct when the image shows the predicted class, the same rule as
zero-shot accuracy.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vlrep.evals.zeroshot import topk_hits


@functools.partial(jax.jit, static_argnames='steps')
@functools.partial(jax.vmap, in_axes=(None, None, 0, 0, None))
def _fit(x: jax.Array, targets: jax.Array, weights: jax.Array, l2: jax.Array,
         steps: int) -> dict[str, jax.Array]:
  """Weights {'w' [D, C], 'b' [C]} minimising the `weights`-weighted mean cross-entropy +
  l2/2 |w|^2; vmapped over (weights [F, N], l2 [F]) so that every fit compiles once."""
  def loss(params):
    logits = x @ params['w'] + params['b']
    xent = -jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1)
    # The bias is not penalised.
    return jnp.sum(weights * xent) / jnp.sum(weights) + 0.5 * l2 * jnp.sum(params['w'] ** 2)

  # Backtracking (Armijo) rather than optax's default zoom line search: as good on this
  # smooth convex loss, and quicker to compile (benchmarks/RESULTS.md, "Linear probe").
  optimizer = optax.lbfgs(linesearch=optax.scale_by_backtracking_linesearch(
      max_backtracking_steps=20, store_grad=True))
  value_and_grad = optax.value_and_grad_from_state(loss)

  def step(_, carry):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = optimizer.update(grad, state, params, value=value, grad=grad,
                                      value_fn=loss)
    return optax.apply_updates(params, updates), state

  params = {'w': jnp.zeros((x.shape[1], targets.shape[1]), jnp.float32),
            'b': jnp.zeros((targets.shape[1],), jnp.float32)}
  params, _ = jax.lax.fori_loop(0, steps, step, (params, optimizer.init(params)))
  return params


def soft_targets(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """float32 [N, C] target distributions: one-hot of indices [N], normalised multi-hot [N, C]."""
  if labels.ndim == 1:
    return np.eye(num_classes, dtype=np.float32)[labels]
  labels = labels.astype(np.float32)
  if (labels.sum(axis=1) == 0).any():
    raise ValueError('probe: an example has no positive label')
  return labels / labels.sum(axis=1, keepdims=True)


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                 test_y: np.ndarray, l2_grid: Sequence[float], val_fraction: float = 0.2,
                 steps: int = 200) -> dict[str, float]:
  """{'accuracy': test accuracy, 'l2': the chosen strength, 'val_accuracy': its val score}.

  Labels are class indices [N] or multi-hot [N, C]; embeddings float [N, D].
  """
  train_x, test_x = np.asarray(train_x, np.float32), np.asarray(test_x, np.float32)
  num_classes = int(max(train_y.max(), test_y.max()) + 1) if train_y.ndim == 1 else \
      train_y.shape[1]
  num_val = int(round(len(train_x) * val_fraction))
  if not 0 < num_val < len(train_x):
    raise ValueError(f'linear probe: val_fraction={val_fraction} of {len(train_x)} training '
                     'examples leaves no fitting or no validation examples')
  fit = len(train_x) - num_val
  # Standardised with all training examples' statistics (no labels involved), so the
  # held-out fits and the final fits share one feature matrix.
  mean, std = train_x.mean(axis=0), train_x.std(axis=0) + 1e-6
  train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
  # One vmapped call: each l2 fitted on the first `fit` examples, then on all of them.
  l2s = np.asarray(tuple(l2_grid) * 2, np.float32)
  weights = np.ones((len(l2s), len(train_x)), np.float32)
  weights[:len(l2_grid), fit:] = 0
  params = _fit(jnp.asarray(train_x), jnp.asarray(soft_targets(train_y, num_classes)),
                jnp.asarray(weights), jnp.asarray(l2s), steps)
  w, b = np.asarray(params['w']), np.asarray(params['b'])
  val_accuracy = [topk_hits(train_x[fit:] @ w[i] + b[i], train_y[fit:], 1)
                  for i in range(len(l2_grid))]
  best = int(np.argmax(val_accuracy))  # the first best: the weakest penalty among ties
  final = len(l2_grid) + best
  accuracy = topk_hits(test_x @ w[final] + b[final], test_y, 1)
  return {'accuracy': accuracy, 'l2': float(l2_grid[best]),
          'val_accuracy': val_accuracy[best]}
