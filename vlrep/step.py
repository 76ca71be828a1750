"""The train state and the one train step: pure functions, jitted once by the caller.

`train_step(state, batch)` is the only function that updates parameters. The state carries
the model, optimizer and loss weights as static fields, so the step needs nothing else and
can be imported, jitted with any shardings and tested on its own. `create_train_state`
builds parameters and optimizer state directly in their final shardings.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from vlrep import losses, sharding
from vlrep.models.coca import CoCa

Batch = dict[str, jax.Array]  # images uint8 [B, H, W, 3], tokens int32 [B, L]


@dataclasses.dataclass(frozen=True)
class LossWeights:
  contrastive: float = 1.0
  caption: float = 2.0

  @classmethod
  def from_config(cls, loss: ml_collections.ConfigDict) -> 'LossWeights':
    return cls(contrastive=float(loss.contrastive_weight), caption=float(loss.caption_weight))


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  model: CoCa = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  learning_rate_fn: Callable[[jax.Array], jax.Array] = flax.struct.field(pytree_node=False)
  loss_weights: LossWeights = flax.struct.field(pytree_node=False)


def compute_losses(model: CoCa, params: Any, batch: Batch,
                   weights: LossWeights) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted total loss and its parts for one global batch."""
  out = model.apply({'params': params}, batch['images'], batch['tokens'])
  contrastive = losses.softmax_contrastive_loss(out['image_emb'], out['text_emb'],
                                                out['logit_scale'])
  caption = (losses.caption_loss(out['caption_logits'], batch['tokens'])
             if 'caption_logits' in out else jnp.zeros((), jnp.float32))
  total = weights.contrastive * contrastive + weights.caption * caption
  return total, {'loss': total, 'contrastive_loss': contrastive, 'caption_loss': caption,
                 'logit_scale': out['logit_scale']}


def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update on one global batch; returns the new state and `train/*` metrics."""
  grad_fn = jax.value_and_grad(compute_losses, argnums=1, has_aux=True)
  (_, metrics), grads = grad_fn(state.model, state.params, batch, state.loss_weights)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(metrics, grad_norm=optax.global_norm(grads),
                 learning_rate=state.learning_rate_fn(state.step))
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, {f'train/{k}': v for k, v in metrics.items()}


def _relax_names(boxed: Any) -> Any:
  """Drops logical names whose rank no longer matches (e.g. Adafactor's factored moments)."""
  def relax(x):
    if isinstance(x, nn.Partitioned) and len(x.names) != x.value.ndim:
      return x.replace(names=(None,) * x.value.ndim)
    return x
  return jax.tree.map(relax, boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def example_batch(config: ml_collections.ConfigDict, batch_size: int = 1) -> Batch:
  """Zero batch with the shapes and dtypes the pipeline produces (for init and tracing)."""
  size = config.data.image_size
  return {'images': jnp.zeros((batch_size, size, size, 3), jnp.uint8),
          'tokens': jnp.zeros((batch_size, config.data.max_text_len), jnp.int32)}


def init_params(model: CoCa, config: ml_collections.ConfigDict, rng: jax.Array) -> Any:
  """Parameters boxed with their logical axis names (unbox with `nn.unbox`)."""
  batch = example_batch(config)
  return model.init(rng, batch['images'], batch['tokens'])['params']


def create_train_state(model: CoCa, tx: optax.GradientTransformation,
                       learning_rate_fn: Callable[[jax.Array], jax.Array],
                       config: ml_collections.ConfigDict, mesh: Mesh,
                       rng: jax.Array) -> tuple[TrainState, Any]:
  """A new state created directly in its shardings; returns (state, state shardings)."""
  weights = LossWeights.from_config(config.loss)

  def boxed_state(rng):
    params = init_params(model, config, rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      model=model, tx=tx, learning_rate_fn=learning_rate_fn,
                      loss_weights=weights)

  abstract = _relax_names(jax.eval_shape(boxed_state, rng))
  shardings = sharding.logical_shardings(abstract, mesh)
  init = jax.jit(lambda rng: nn.unbox(boxed_state(rng)), out_shardings=shardings)
  return init(rng), shardings
