"""Attentive probe: a learned attentional pooler and a linear head on frozen image tokens.

CoCa's frozen-encoder protocol (the paper's 90.6% ImageNet top-1): the image encoder's output
tokens (`Pretrained.image_tokens`, what the model's own poolers read) stay fixed; a new
`AttentionalPooler` (`queries` learned queries, one `heads`-head attention layer; the mean of
its query outputs when queries > 1) and a linear head over the classes are trained on them
with AdamW (warmup-cosine `learning_rate`, `steps` minibatches of `batch_size`) on the
cross-entropy. Multi-hot labels are fitted as their normalised distribution and a prediction
counts as correct when the image shows that class, as in the linear probe and zero-shot.

Everything is deterministic: the probe's initialisation comes from `seed`, the minibatch
order from a numpy generator seeded with it. The steps run in jitted scans over a few of them
at a time (their minibatches sent together, about 64 MiB of tokens), each minibatch a global
array split over the mesh's batch axes (each process passes the rows its devices hold), with
the probe's parameters and optimizer state replicated; a minibatch is padded to whole
rows per device with zero-weight rows, so the loss and gradients, and hence the trained
probe and its accuracy, are the same on any device or process count up to float rounding.

Host memory: the train and test tokens are held whole, (train + test examples) x N x W
bfloat16 values (2 bytes each; N tokens of width W per image): 33 MB for the demo's
2 x 1,000 examples at 64 tokens x 128, 3.9 GB for 10,000 ImageNet images at base size
(256 tokens x 768: 288 px in 18 px patches). `train_examples` is the knob.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax

from vlrep.evals.probe import soft_targets
from vlrep.evals.zeroshot import topk_hits
from vlrep.models.layers import AttentionalPooler
from vlrep.parallel import sharding
from vlrep.parallel.chunks import in_chunks

HOST_DTYPE = ml_dtypes.bfloat16  # the tokens as kept on the host, see the module docstring


class Probe(nn.Module):
  """[B, N, W] tokens -> [B, num_classes] logits: attentional pooler, query mean, dense."""
  num_classes: int
  queries: int
  heads: int

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    pooled = AttentionalPooler(self.queries, self.heads, name='pooler')(
        tokens.astype(jnp.float32))
    return nn.Dense(self.num_classes, name='head')(jnp.mean(pooled, axis=1))


def loss_fn(probe: Probe, params: Any, tokens: jax.Array, targets: jax.Array,
            weights: jax.Array) -> jax.Array:
  """The `weights`-weighted mean cross-entropy of the probe's logits against `targets`
  (distributions [B, C]); zero-weight rows (padding) do not count."""
  logits = probe.apply({'params': params}, tokens)
  xent = optax.softmax_cross_entropy(logits, targets)
  return jnp.sum(weights * xent) / jnp.maximum(jnp.sum(weights), 1.0)


def _replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def minibatch_order(num_examples: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
  """int [steps, batch_size]: the examples of each step, epochs of seeded permutations."""
  rng = np.random.default_rng(seed)
  epochs = -(-steps * batch_size // num_examples)
  order = np.concatenate([rng.permutation(num_examples) for _ in range(epochs)])
  return order[:steps * batch_size].reshape(steps, batch_size)


def train_probe(tokens: np.ndarray, labels: np.ndarray, num_classes: int,
                mesh: jax.sharding.Mesh, *, queries: int, heads: int, steps: int,
                learning_rate: float, batch_size: int, weight_decay: float,
                seed: int) -> tuple[Probe, Any]:
  """(probe, trained params, replicated on `mesh`) on tokens [M, N, W], labels [M] or [M, C]."""
  probe = Probe(num_classes, queries, heads)
  targets = soft_targets(labels, num_classes)
  batch_size = min(batch_size, len(tokens))
  devices = sharding.batch_devices(mesh)
  padded = -(-batch_size // devices) * devices
  batch = sharding.batch_sharding(mesh)
  mine = sharding.process_rows(batch, padded)
  replicated = _replicated(mesh)
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(1, steps // 10),
                                                max(steps, 2))
  tx = optax.adamw(schedule, weight_decay=weight_decay)

  @functools.partial(jax.jit, out_shardings=replicated)
  def init(key):
    params = nn.unbox(probe.init(key, jnp.zeros((1, *tokens.shape[1:]), jnp.float32)))['params']
    return params, tx.init(params)

  @functools.partial(jax.jit, out_shardings=(replicated, replicated), donate_argnums=(0, 1))
  def run_steps(params, opt_state, xs, ys, ws):
    def one_step(carry, minibatch):
      params, opt_state = carry
      grads = jax.grad(functools.partial(loss_fn, probe))(params, *minibatch)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None
    return jax.lax.scan(one_step, (params, opt_state), (xs, ys, ws))[0]

  params, opt_state = init(jax.random.key(seed))
  weight = (np.arange(padded) < batch_size).astype(np.float32)
  order = minibatch_order(len(tokens), batch_size, steps, seed)
  order = np.concatenate([order, np.zeros((steps, padded - batch_size), order.dtype)], 1)
  # Several steps per call, their minibatches (near 2^26 bytes of tokens) sent together.
  per_call = int(np.clip(2 ** 26 // (padded * tokens[0].nbytes), 1, steps))
  steps_sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(None, sharding.BATCH_AXES))
  for start in range(0, steps, per_call):
    rows = order[start:start + per_call][:, mine]
    local = (tokens[rows], targets[rows], np.broadcast_to(weight[mine], rows.shape))
    xs, ys, ws = (jax.make_array_from_process_local_data(
        steps_sharding, a, (len(rows), padded, *a.shape[2:])) for a in local)
    params, opt_state = run_steps(params, opt_state, xs, ys, ws)
    # One call in flight at a time: queued calls' collectives on many simulated CPU
    # devices hit XLA:CPU's rendezvous timeout on a loaded host.
    jax.block_until_ready(params)
  return probe, params


def predict(probe: Probe, params: Any, tokens: np.ndarray, mesh: jax.sharding.Mesh,
            chunk: int) -> np.ndarray:
  """float32 [M, C] logits of tokens [M, N, W], in chunks of `chunk` rows over the mesh."""
  apply = jax.jit(lambda p, x: probe.apply({'params': p}, x))
  return in_chunks(lambda x: apply(params, x), tokens, chunk, sharding.batch_sharding(mesh))


def attentive_probe(train_tokens: np.ndarray, train_y: np.ndarray, test_tokens: np.ndarray,
                    test_y: np.ndarray, mesh: jax.sharding.Mesh, *, queries: int,
                    heads: int, steps: int, learning_rate: float, batch_size: int,
                    weight_decay: float, seed: int, chunk: int) -> dict[str, Any]:
  """{'accuracy': test top-1, 'params': the trained probe's (host numpy tree)}; the options
  are the `attentive_probe` entry's (defaults in `vlrep/evals/entries.py`).

  Tokens are [M, N, W] (any float dtype; `HOST_DTYPE` keeps them small); labels class
  indices [M] or multi-hot [M, C]. `chunk` is a multiple of the mesh's batch devices.
  """
  num_classes = int(max(train_y.max(), test_y.max()) + 1) if train_y.ndim == 1 else \
      train_y.shape[1]
  probe, params = train_probe(train_tokens, train_y, num_classes, mesh, queries=queries,
                              heads=heads, steps=steps, learning_rate=learning_rate,
                              batch_size=batch_size, weight_decay=weight_decay, seed=seed)
  logits = predict(probe, params, test_tokens, mesh, chunk)
  return {'accuracy': topk_hits(logits, test_y, 1),
          'params': jax.tree.map(np.asarray, jax.device_get(params))}
