"""Fine-tuning for classification: what `train_step` minimises with `loss.kind='classification'`.

The same step, optimizer and loop as pretraining (per-group rates, freezing, EMA and
checkpoints included); only the objective differs: softmax cross-entropy of the
classification head's logits (`CoCa.classify`, `vlrep/models/classifier.py`) against each
batch's `label` (read from the examples' `data.label_key` by the pipeline). A label is a
class index, or a multi-hot vector whose classes share the target mass equally (the
synthetic set's `labels/shape`: an image may show two shapes), so top-1 counts a hit when
the best class is any of them, as the `classification` evaluation does.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from vlrep.data.transforms import label_of

KINDS = ('pretrain', 'classification')


def check_kind(kind: str) -> str:
  if kind not in KINDS:
    raise ValueError(f'loss.kind={kind!r}; expected one of {KINDS}')
  return kind


def check_config(config: ml_collections.ConfigDict, source: Any) -> None:
  """Raises ValueError on a classification config that cannot run; nothing to check for
  pretraining. `source` is the training source (its first example shows the label)."""
  if check_kind(config.loss.kind) != 'classification':
    return
  classes = int(config.model.num_classes)
  if classes < 2:
    raise ValueError(f"loss.kind='classification' needs model.num_classes >= 2, got {classes}")
  if not config.data.label_key:
    raise ValueError("loss.kind='classification' needs data.label_key (the training label)")
  if config.microbatches != 1:
    raise ValueError("loss.kind='classification' takes microbatches=1 (microbatches keep "
                     "the contrastive loss's negatives, which classification has none of)")
  try:
    label = label_of(source[0], config.data.label_key)
  except KeyError as error:
    raise ValueError(error.args[0]) from None
  if label.ndim == 1 and label.shape[0] != classes:
    raise ValueError(f'data.label_key={config.data.label_key!r} is multi-hot over '
                     f'{label.shape[0]} classes, but model.num_classes={classes}')


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy of logits [B, C]; labels int [B] or multi-hot [B, C] (the
  target spread evenly over a row's classes; a row with none adds 0)."""
  logits = logits.astype(jnp.float32)
  if labels.ndim == 1:
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
  targets = labels.astype(jnp.float32)
  targets = targets / jnp.maximum(jnp.sum(targets, axis=-1, keepdims=True), 1.0)
  return jnp.mean(optax.softmax_cross_entropy(logits, targets))


def top1_hits(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """float32 [B]: 1 where the best class (first of ties) is the label, or one of them."""
  best = jnp.argmax(logits, axis=-1)
  if labels.ndim == 1:
    return (best == labels).astype(jnp.float32)
  return jnp.take_along_axis(labels, best[:, None], axis=-1)[:, 0].astype(jnp.float32)


def compute_losses(model: Any, params: Any,
                   batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(loss, metrics) of one global batch: the head's cross-entropy on `batch['label']`,
  and the batch's top-1 accuracy. Only the image side runs."""
  if 'label' not in batch:
    raise ValueError("loss.kind='classification': the batch has no 'label' (data.label_key)")
  logits = model.apply({'params': params}, batch['images'], method=type(model).classify)
  loss = cross_entropy(logits, batch['label'])
  return loss, {'loss': loss, 'classification_loss': loss,
                'accuracy': jnp.mean(top1_hits(logits, batch['label']))}
