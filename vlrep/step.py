"""The train state and the one train step: pure functions, jitted once by the caller.

`train_step(state, batch)` is the only function that updates parameters. The state carries
the model, optimizer, loss settings, mesh and microbatch count as static fields, so the step
needs nothing else and can be imported, jitted with any shardings and tested on its own.
`create_train_state` builds parameters and optimizer state directly in their shardings.
With `optim.ema_decay > 0` the state also carries an exponential moving average of the
parameters (`vlrep.ema`), which the evaluators and `vlrep.load` use when it is there.

With `microbatches=K > 1` the step keeps every negative of the global batch (GradCache,
Gao et al. 2021; open_clip's accum-freq): all embeddings are computed first without
gradients, the contrastive loss and its gradient with respect to those embeddings are taken
over the whole batch, and then each microbatch is re-run with gradients, its embeddings
weighted by the cached embedding gradients. Memory is that of one microbatch; loss and
update equal the K=1 step up to float rounding.
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

from vlrep import classification, late_interaction, losses, optim, param_groups
from vlrep.ema import ema_decay, ema_init, ema_update
from vlrep.models.build import init_params
from vlrep.models.coca import TEMPERATURE_KEYS, CoCa, clamp_temperature
from vlrep.models.text import parallel_rows
from vlrep.parallel import sharding

Batch = dict[str, jax.Array]  # images uint8 [B, H, W, 3], tokens int32 [B, L]
# train_step's metric that says whether the step's loss and gradients were all finite (and so
# whether its update was applied); a flag for the loop, not a number to log.
FINITE_METRIC = 'train/finite'


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """`config.loss`: weights of the two losses and how the contrastive one is computed."""
  contrastive_weight: float = 1.0
  caption_weight: float = 2.0
  contrastive_type: str = 'softmax'
  contrastive_impl: str = 'gather'
  # 'global' or FILIP's 'token' (`vlrep.late_interaction`), whose products are taken
  # `token_similarity_chunk` texts at a time.
  contrastive_similarity: str = 'global'
  token_similarity_chunk: int = 0
  # Positions per slice of the chunked caption loss (`losses.chunked_caption_loss`); 0 = the
  # plain loss over the whole [B, L-1, V] logits.
  caption_chunk: int = 0
  # The fraction of each batch's rows predicted in parallel from [MASK] inputs (CapPa;
  # `text.parallel_rows`); 0 = every row autoregressive.
  parallel_fraction: float = 0.0
  kind: str = 'pretrain'  # or 'classification' (`vlrep.classification`)

  @classmethod
  def from_config(cls, loss: ml_collections.ConfigDict) -> 'LossConfig':
    caption_chunk = int(loss.caption_chunk)
    if caption_chunk < 0:
      raise ValueError(f'loss.caption_chunk must be >= 0 (0 = unchunked), got {caption_chunk}')
    parallel_fraction = float(loss.parallel_fraction)
    token_similarity_chunk = int(loss.token_similarity_chunk)
    if token_similarity_chunk < 0:
      raise ValueError('loss.token_similarity_chunk must be >= 0 (0 = unchunked), got '
                       f'{token_similarity_chunk}')
    if not 0.0 <= parallel_fraction <= 1.0:
      raise ValueError(f'loss.parallel_fraction must be in [0, 1], got {parallel_fraction}')
    return cls(contrastive_weight=float(loss.contrastive_weight),
               caption_weight=float(loss.caption_weight),
               contrastive_type=loss.contrastive_type, contrastive_impl=loss.contrastive_impl,
               contrastive_similarity=loss.contrastive_similarity,
               token_similarity_chunk=token_similarity_chunk,
               caption_chunk=caption_chunk, parallel_fraction=parallel_fraction,
               kind=classification.check_kind(loss.kind))


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  model: CoCa = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  learning_rate_fn: Callable[[jax.Array], jax.Array] = flax.struct.field(pytree_node=False)
  loss_config: LossConfig = flax.struct.field(pytree_node=False)
  # The mesh the contrastive loss's collectives run over (None: plain global computation).
  mesh: Mesh | None = flax.struct.field(pytree_node=False, default=None)
  microbatches: int = flax.struct.field(pytree_node=False, default=1)
  # `optim.freeze`: the step takes no gradient of these parameters and keeps them bit for
  # bit; the optimizer (param_groups.partition_frozen) holds no state for them.
  freeze: tuple[str, ...] = flax.struct.field(pytree_node=False, default=())
  # The EMA of the parameters (float32, sharded as they are) and its decay; None when
  # optim.ema_decay is 0, so that a run without it keeps the checkpoint layout it had before.
  ema_params: Any = None
  ema_decay: float = flax.struct.field(pytree_node=False, default=0.0)


def _contrastive(embeddings: dict[str, jax.Array], temperature: dict[str, jax.Array],
                 loss_config: LossConfig, mesh: Mesh | None) -> jax.Array:
  """The contrastive loss of the model's `CONTRASTIVE_INPUTS` outputs."""
  scalars = (temperature['logit_scale'], temperature.get('logit_bias'))
  options = dict(loss_type=loss_config.contrastive_type, impl=loss_config.contrastive_impl,
                 mesh=mesh, batch_axes=sharding.BATCH_AXES)
  if loss_config.contrastive_similarity == 'token':
    return late_interaction.contrastive_loss(
        embeddings['image_tokens'], embeddings['text_tokens'], embeddings['text_mask'],
        *scalars, chunk=loss_config.token_similarity_chunk, **options)
  return losses.contrastive_loss(embeddings['image_emb'], embeddings['text_emb'], *scalars,
                                 **options)


def _differentiable(embeddings: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """The float embeddings (not the text mask): those GradCache caches gradients of."""
  return {k: v for k, v in embeddings.items() if jnp.issubdtype(v.dtype, jnp.floating)}


def _metrics(contrastive: jax.Array, caption: jax.Array, temperature: dict[str, jax.Array],
             loss_config: LossConfig) -> dict[str, jax.Array]:
  total = loss_config.contrastive_weight * contrastive + loss_config.caption_weight * caption
  return {'loss': total, 'contrastive_loss': contrastive, 'caption_loss': caption,
          **temperature}


def output_head(model: CoCa, params: Any) -> tuple[Callable[[Any, jax.Array], jax.Array], Any]:
  """(head, head_params): the text decoder's output head as a function of its own
  parameters, `head(head_params, features [..., W]) -> logits [..., V]`, so that the fused
  caption loss differentiates only those (the rest of `params` never reaches its VJP)."""
  module = model.bind({'params': params}).text_decoder.output_head.clone(parent=None)
  return (lambda head_params, x: module.apply({'params': head_params}, x),
          params['text_decoder']['output_head'])


def _forward(model: CoCa, params: Any, batch: Batch, loss_config: LossConfig,
             mesh: Mesh | None) -> tuple[dict[str, jax.Array], jax.Array]:
  """The model's outputs and its caption loss (0 without multimodal layers)."""
  chunk, pad_id = loss_config.caption_chunk, model.text_decoder.pad_id
  out = model.apply({'params': params}, batch['images'], batch['tokens'],
                    caption_features=chunk > 0, parallel_rows=batch.get('parallel'))
  if 'caption_features' in out:
    head, head_params = output_head(model, params)
    caption = _chunked_caption_loss(out['caption_features'], batch['tokens'], head,
                                    head_params, loss_config, pad_id, mesh)
  elif 'caption_logits' in out:
    caption = losses.caption_loss(out['caption_logits'], batch['tokens'], pad_id)
  else:
    caption = jnp.zeros((), jnp.float32)
  return out, caption


def _chunked_caption_loss(features: jax.Array, tokens: jax.Array, head: Callable[..., Any],
                          head_params: Any, loss_config: LossConfig, pad_id: int,
                          mesh: Mesh | None) -> jax.Array:
  """`losses.chunked_caption_loss` taken per shard of the batch axes and summed, so that the
  output head's gradient, which the loss accumulates slice by slice, is reduced once after
  the slices rather than in each (`sharding.per_batch_shard`); the head is one matrix, so its
  unreduced gradient on every device costs little."""
  def token_count(tokens):
    return jnp.maximum(jnp.sum(tokens[:, 1:] != pad_id), 1).astype(jnp.float32)

  def shard_sum(features, tokens, head_params):
    return token_count(tokens) * losses.chunked_caption_loss(
        features, tokens, head, head_params, loss_config.caption_chunk, pad_id)
  sums = sharding.per_batch_shard(shard_sum, mesh, (0, 0, None), sharding.BATCH_AXES)(
      features, tokens, head_params)
  return jnp.sum(sums) / token_count(tokens)


def _with_parallel_rows(batch: Batch, loss_config: LossConfig) -> Batch:
  """`batch` with its [B] bool `parallel` rows, chosen over the global batch (so that
  microbatches see the rows the whole batch would)."""
  if not loss_config.parallel_fraction or 'parallel' in batch:
    return batch
  rows = parallel_rows(batch['tokens'].shape[0], loss_config.parallel_fraction)
  return {**batch, 'parallel': jnp.asarray(rows)}


def compute_losses(model: CoCa, params: Any, batch: Batch, loss_config: LossConfig,
                   mesh: Mesh | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted total loss and its parts (and the temperature) for one global batch; a
  captioning-only model's contrastive loss is 0; `kind='classification'` dispatches."""
  if loss_config.kind == 'classification':
    return classification.compute_losses(model, params, batch)
  out, caption = _forward(model, params, _with_parallel_rows(batch, loss_config), loss_config,
                          mesh)
  temperature = {k: out[k] for k in TEMPERATURE_KEYS if k in out}
  contrastive = _contrastive(out, temperature, loss_config, mesh) if model.contrastive else \
      jnp.zeros((), jnp.float32)
  metrics = _metrics(contrastive, caption, temperature, loss_config)
  return metrics['loss'], metrics


def _split_microbatches(x: jax.Array, count: int, mesh: Mesh | None) -> jax.Array:
  """[B, ...] -> [K, B/K, ...] where microbatch k is rows k, K+k, 2K+k, ...

  Strided rather than contiguous so that every microbatch is spread over all devices: each
  device's contiguous block of the batch holds an equal share of every microbatch.
  """
  x = x.reshape(x.shape[0] // count, count, *x.shape[1:]).swapaxes(0, 1)
  return sharding.constrain_microbatches(x, mesh) if mesh is not None else x


def _merge_microbatches(x: jax.Array) -> jax.Array:
  """Inverse of `_split_microbatches`: [K, B/K, ...] -> [B, ...] in the original order."""
  return x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _contrastive_grads(state: TrainState, micro: Batch, trainable: Callable[[Any], Any]):
  """GradCache's first two passes over the microbatches [K, B/K, ...]: (contrastive loss,
  temperature, its weighted parameter gradients, d(loss)/d(embedding) for each float
  embedding (`CONTRASTIVE_INPUTS`: vectors, or FILIP's token embeddings) split as the
  microbatches are)."""
  model, params, config, mesh = state.model, state.params, state.loss_config, state.mesh
  # 1. Every embedding of the global batch, without gradients (no activations are kept).
  def embed(mb: Batch) -> dict[str, jax.Array]:
    return model.apply({'params': params}, mb['images'], mb['tokens'], method=CoCa.embed)
  embeddings = jax.tree.map(_merge_microbatches, jax.lax.map(embed, micro))
  floats = _differentiable(embeddings)

  # 2. The contrastive loss over all of them, and its gradient with respect to each
  #    embedding and to the temperature parameters.
  def contrastive_of(floats, params):
    temperature = model.apply({'params': trainable(params)}, method=CoCa.temperature)
    return _contrastive({**embeddings, **floats}, temperature, config, mesh), temperature
  (contrastive, temperature), (embedding_grads, grads) = jax.value_and_grad(
      contrastive_of, argnums=(0, 1), has_aux=True)(floats, params)
  grads = jax.tree.map(lambda g: config.contrastive_weight * g, grads)
  embedding_grads = jax.tree.map(lambda g: _split_microbatches(g, state.microbatches, mesh),
                                 embedding_grads)
  return contrastive, temperature, grads, embedding_grads


def _microbatched_grads(state: TrainState, batch: Batch) -> tuple[dict[str, jax.Array], Any]:
  """Metrics and gradients of `compute_losses` over the whole batch, one microbatch at a time."""
  model, params, config, mesh = state.model, state.params, state.loss_config, state.mesh
  trainable = lambda p: param_groups.stop_frozen(p, state.freeze)
  batch = _with_parallel_rows(batch, config)
  micro = jax.tree.map(lambda x: _split_microbatches(x, state.microbatches, mesh), batch)
  if model.contrastive:
    contrastive, temperature, grads, embedding_grads = _contrastive_grads(state, micro,
                                                                          trainable)
  else:  # captioning-only: the caption loss's gradients accumulated, no first pass
    contrastive, temperature = jnp.zeros((), jnp.float32), {}
    grads, embedding_grads = jax.tree.map(jnp.zeros_like, params), None

  # 3. Each microbatch with gradients: d(loss)/d(params) = sum over embeddings of
  #    d(loss)/d(embedding) . d(embedding)/d(params), plus the microbatch's share of the
  #    caption loss (a mean over the non-padding targets of the whole batch).
  has_caption = bool(model.text_decoder.multimodal_layers)
  pad_id = model.text_decoder.pad_id
  targets = jnp.maximum(jnp.sum(batch['tokens'][:, 1:] != pad_id), 1).astype(jnp.float32)

  def surrogate(params, mb, embedding_grads):
    # No nested split for the caption loss: XLA's partitioner fails a check on a shard_map
    # over `fsdp` inside one over `data`, so here the head's gradient is reduced over `fsdp`
    # per slice.
    out, caption = _forward(model, trainable(params), mb, config, mesh=None)
    value = 0.0 if embedding_grads is None else config.contrastive_weight * sum(
        jnp.sum(out[k] * g) for k, g in embedding_grads.items())
    caption_sum = jnp.zeros((), jnp.float32)
    if has_caption:
      count = jnp.sum(mb['tokens'][:, 1:] != pad_id).astype(jnp.float32)
      caption_sum = caption * count
    return value + config.caption_weight * caption_sum / targets, caption_sum

  # Gradients per shard of `data`, accumulated unreduced over the microbatches and summed
  # once after them (`sharding.per_batch_shard`). Over `fsdp` they are still reduce-scattered
  # per microbatch: an unreduced accumulator there would be the whole gradient on every
  # device, which FSDP exists to avoid.
  shard_grads = sharding.per_batch_shard(jax.grad(surrogate, has_aux=True), mesh, (None, 0, 0))

  def accumulate(carry, xs):
    micro_grads, caption_sum = shard_grads(params, *xs)
    grads, caption_total = carry
    grads = sharding.constrain_batch_shards(jax.tree.map(jnp.add, grads, micro_grads), mesh)
    return (grads, caption_total + jnp.sum(caption_sum)), None

  shards = sharding.batch_shard_count(mesh, ('data',))
  zeros = sharding.constrain_batch_shards(
      jax.tree.map(lambda p: jnp.zeros((shards, *p.shape), p.dtype), params), mesh)
  (accumulated, caption_total), _ = jax.lax.scan(
      accumulate, (zeros, jnp.zeros((), jnp.float32)), (micro, embedding_grads))
  grads = jax.tree.map(lambda g, a: g + a.sum(0), grads, accumulated)
  return _metrics(contrastive, caption_total / targets, temperature, config), grads


def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update on one global batch; returns the new state and `train/*` metrics."""
  if state.microbatches > 1:
    metrics, grads = _microbatched_grads(state, batch)
  else:
    def loss_fn(params):
      return compute_losses(state.model, param_groups.stop_frozen(params, state.freeze),
                            batch, state.loss_config, state.mesh)
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = clamp_temperature(optax.apply_updates(state.params, updates))
  params = param_groups.keep_frozen(params, state.params, state.freeze)
  # Counted by `state.step`, so a skipped step (below) only shifts the weights of the average.
  ema = None if state.ema_params is None else ema_update(state.ema_params, params,
                                                        state.ema_decay, state.step + 1)
  # The rate this update applied: the optimizer's count, which skipped steps do not advance,
  # not `state.step`, which they do.
  metrics = dict(metrics, grad_norm=optax.global_norm(grads),
                 learning_rate=optim.applied_learning_rate(state.opt_state,
                                                           state.learning_rate_fn))
  # A non-finite loss or gradient drops the whole update: parameters, optimizer state and EMA
  # stay as they were (the step counter still advances past the batch). The loop decides, from
  # `train/finite`, whether to go on (config.nan_policy, vlrep.runtime.nonfinite). Written here
  # rather than with optax.apply_if_finite, which would check the gradients only and add
  # counters to the optimizer state (and so to every checkpoint's layout).
  finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in metrics.values()]))
  params, opt_state, ema = jax.tree.map(
      lambda new, old: jnp.where(finite, new, old), (params, opt_state, ema),
      (state.params, state.opt_state, state.ema_params))
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            ema_params=ema)
  return new_state, {**{f'train/{k}': v for k, v in metrics.items()}, FINITE_METRIC: finite}


def _relax_names(boxed: Any) -> Any:
  """Drops logical names whose rank no longer matches (e.g. Adafactor's factored moments)."""
  def relax(x):
    if isinstance(x, nn.Partitioned) and len(x.names) != x.value.ndim:
      return x.replace(names=(None,) * x.value.ndim)
    return x
  return jax.tree.map(relax, boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def _state_builder(model: CoCa, tx: optax.GradientTransformation,
                   learning_rate_fn: Callable[[jax.Array], jax.Array],
                   config: ml_collections.ConfigDict, mesh: Mesh) -> Callable[[jax.Array], Any]:
  """rng -> a new TrainState whose arrays are boxed with their logical names."""
  loss_config = LossConfig.from_config(config.loss)
  decay = ema_decay(config.optim)

  def boxed_state(rng):
    params = init_params(model, config, rng)
    # Mapped inside the boxes, so the EMA carries the parameters' logical names (and so
    # their shardings).
    ema = ema_init(params) if decay else None
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      model=model, tx=tx, learning_rate_fn=learning_rate_fn,
                      loss_config=loss_config, mesh=mesh,
                      microbatches=int(config.microbatches), freeze=tuple(config.optim.freeze),
                      ema_params=ema, ema_decay=decay)
  return boxed_state


def abstract_train_state(model: CoCa, tx: optax.GradientTransformation,
                         learning_rate_fn: Callable[[jax.Array], jax.Array],
                         config: ml_collections.ConfigDict, mesh: Mesh,
                         replicated: list[dict[str, Any]] | None = None) -> tuple[Any, Any]:
  """(the state's shapes and dtypes, its shardings), without creating it.

  Arrays replicated because a dimension does not divide over its mesh axes are appended to
  `replicated`; one above `mesh.replicate_max_bytes` raises ValueError naming it.
  """
  boxed_state = _state_builder(model, tx, learning_rate_fn, config, mesh)
  abstract = _relax_names(jax.eval_shape(boxed_state, jax.random.key(0)))
  shardings = sharding.logical_shardings(
      abstract, mesh, sharding.mesh_option(config.mesh, 'replicate_max_bytes'), replicated)
  return nn.unbox(abstract), shardings


def create_train_state(model: CoCa, tx: optax.GradientTransformation,
                       learning_rate_fn: Callable[[jax.Array], jax.Array],
                       config: ml_collections.ConfigDict, mesh: Mesh, rng: jax.Array,
                       shardings: Any = None) -> tuple[TrainState, Any]:
  """A new state created directly in its shardings (`abstract_train_state`'s unless given);
  returns (state, state shardings)."""
  if shardings is None:
    _, shardings = abstract_train_state(model, tx, learning_rate_fn, config, mesh)
  boxed_state = _state_builder(model, tx, learning_rate_fn, config, mesh)
  init = jax.jit(lambda rng: nn.unbox(boxed_state(rng)), out_shardings=shardings)
  return init(rng), shardings
