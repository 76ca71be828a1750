"""The entries of `config.evals`: one named ConfigDict per evaluation, with a `type`.

Each type's fields and defaults live here (`FIELDS`), so configs, the legacy default for
runs saved before `config.evals` existed, and validation agree. Every entry reads its images
from `data` (a source string as in `config.data.*`; '' = `config.data.eval`): examples
`start .. start+num_examples` in order (`num_examples` 0 = `config.data.eval_examples`).

- `zeroshot`: `label_key` (the example's label: `labels/<task>` for the synthetic set, a TFDS
  ClassLabel feature such as `label`), `class_names` ('' = the data set's label names, or a
  text file with one name per line, in label order), `templates` (prompts with one `{}`),
  `ks` (top-k accuracies; a k not below the class count is always 1 and is skipped).
- `zeroshot_scoring`: the fields of `zeroshot` plus `text_batch` (prompts scored per pass, 0 =
  as many as keep the logits near 1 GiB a device, see `Pretrained.score_texts`): each class's
  prompts scored by the captioner's log-likelihood given the image (CapPa's scoring
  classifier), a class by the mean over its templates. Skipped, with a logged reason, for a
  model without multimodal layers, as `captioning` is.
- `retrieval`: `ks`; `identical_text_is_hit` (a caption with exactly the text of a correct
  one counts too: fair for data, like the synthetic set, that repeats captions; off for COCO).
- `captioning`: `methods` ('greedy', 'beam'), `beam_size`, `length_penalty`, `max_len`
  (0 = `data.max_text_len`). References are all the captions of an image.
- `classification`: `label_key`, `ks`: a classification fine-tune's own head
  (`Pretrained.classify`, `loss.kind='classification'`) ranks the classes; a multi-hot label
  is hit by any of its classes.
- `zeroshot_video`, `video_retrieval`: the fields of `zeroshot` / `retrieval` on a video
  source (`synthetic_video:test`, or ArrayRecord video records), plus `frames` (T, sampled
  uniformly from each clip) and `pool` (`Pretrained.encode_video`: 'attn', the model's
  poolers over the tokens of all T frames, or 'mean' of the frame embeddings); metrics
  `<name>/top<k>` and `<name>/v2t_r@K`, `<name>/t2v_r@K`.
- `linear_probe`: `label_key`; trains on `train_data` examples `train_start ..
  train_start+train_examples`, holding out the last `val_fraction` of them to choose the L2
  strength among `l2_grid`, then retrains on all of them; `steps` of L-BFGS.
- `attentive_probe`: `label_key` and the data fields of `linear_probe`; a new attentional
  pooler (`queries` learned queries, `heads` heads, 0 = the image encoder's) and a linear
  head trained on the frozen image tokens for `steps` AdamW minibatches of `batch_size`
  (peak `learning_rate`, warmup then cosine; `weight_decay`; init and order from `seed`),
  see `vlrep/evals/attentive_probe.py`.

This module imports no JAX, so config files can import it.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from vlrep.data import synthetic
from vlrep.evals.zeroshot import DEFAULT_TEMPLATES

_COMMON = {'type': '', 'data': '', 'start': 0, 'num_examples': 0}
FIELDS: dict[str, dict[str, Any]] = {
    'zeroshot': {'label_key': 'label', 'class_names': '', 'templates': DEFAULT_TEMPLATES,
                 'ks': (1, 5)},
    'zeroshot_scoring': {'label_key': 'label', 'class_names': '',
                         'templates': DEFAULT_TEMPLATES, 'ks': (1, 5), 'text_batch': 0},
    'retrieval': {'ks': (1, 5, 10), 'identical_text_is_hit': False},
    'captioning': {'methods': ('greedy', 'beam'), 'beam_size': 4, 'length_penalty': 0.6,
                   'max_len': 0},
    'classification': {'label_key': 'label', 'ks': (1, 5)},
    'zeroshot_video': {'label_key': 'label', 'class_names': '', 'templates': DEFAULT_TEMPLATES,
                       'ks': (1, 5), 'frames': 8, 'pool': 'attn'},
    'video_retrieval': {'ks': (1, 5, 10), 'identical_text_is_hit': False, 'frames': 8,
                        'pool': 'attn'},
    'linear_probe': {'label_key': 'label', 'train_data': '', 'train_start': 0,
                     'train_examples': 10_000, 'val_fraction': 0.2,
                     'l2_grid': (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1), 'steps': 200},
    'attentive_probe': {'label_key': 'label', 'train_data': '', 'train_start': 0,
                        'train_examples': 10_000, 'steps': 300, 'learning_rate': 3e-3,
                        'batch_size': 256, 'weight_decay': 1e-4, 'queries': 1, 'heads': 0,
                        'seed': 0},
}
PROBES = ('linear_probe', 'attentive_probe')  # trained on `train_data`, scored on `data`
TYPES = tuple(FIELDS)


def entry(kind: str, **fields: Any) -> ml_collections.ConfigDict:
  """An entry of type `kind` with every field at its default except `fields`."""
  if kind not in FIELDS:
    raise ValueError(f'evals entry type {kind!r}; expected one of {TYPES}')
  unknown = set(fields) - set(FIELDS[kind]) - set(_COMMON)
  if unknown:
    raise ValueError(f'fields {sorted(unknown)} do not apply to a {kind!r} evaluation')
  return ml_collections.ConfigDict({**_COMMON, **FIELDS[kind], **fields, 'type': kind})


def check(name: str, config: Any) -> None:
  """Raises ValueError naming `evals.<name>` for an unknown type or field or a bad value."""
  if config.get('type') not in FIELDS:
    raise ValueError(f'evals.{name}.type={config.get("type")!r}; expected one of {TYPES}')
  allowed = set(FIELDS[config.type]) | set(_COMMON)
  unknown = set(config.keys()) - allowed
  if unknown:
    raise ValueError(f'evals.{name}: fields {sorted(unknown)} do not apply to type '
                     f'{config.type!r} (allowed: {sorted(allowed)})')
  if config.get('num_examples', 0) < 0 or config.get('start', 0) < 0:
    raise ValueError(f'evals.{name}: start and num_examples must be >= 0')
  for k in config.get('ks', ()):
    if k < 1:
      raise ValueError(f'evals.{name}.ks: every k must be >= 1, got {tuple(config.ks)}')
  if config.type in ('zeroshot', 'zeroshot_scoring', 'zeroshot_video') and not config.templates:
    raise ValueError(f'evals.{name}.templates is empty')
  if config.get('frames', 1) < 1:
    raise ValueError(f'evals.{name}.frames must be >= 1, got {config.frames}')
  if config.get('text_batch', 0) < 0:
    raise ValueError(f'evals.{name}.text_batch must be >= 0 (0: derived)')
  for template in config.get('templates', ()):
    if template.count('{}') != 1:
      raise ValueError(f'evals.{name}.templates: {template!r} must contain one {{}}')
  for method in config.get('methods', ()):
    if method not in ('greedy', 'beam'):
      raise ValueError(f"evals.{name}.methods: {method!r}; expected 'greedy' or 'beam'")
  if config.type == 'linear_probe':
    if not 0 < config.val_fraction < 1 or not config.l2_grid or config.train_examples < 2:
      raise ValueError(f'evals.{name}: needs 0 < val_fraction < 1, a non-empty l2_grid '
                       'and train_examples >= 2')
  if config.type == 'attentive_probe':
    for field in ('steps', 'batch_size', 'queries', 'train_examples'):
      if config[field] < 1:
        raise ValueError(f'evals.{name}.{field} must be >= 1, got {config[field]}')
    if config.heads < 0:
      raise ValueError(f'evals.{name}.heads must be >= 0 (0: the image encoder\'s), got '
                       f'{config.heads}')
    if not config.learning_rate > 0 or config.weight_decay < 0:
      raise ValueError(f'evals.{name}: needs learning_rate > 0 and weight_decay >= 0, got '
                       f'{config.learning_rate} and {config.weight_decay}')


def synthetic_evals(captioning: bool = True) -> ml_collections.ConfigDict:
  """The demo's evaluations on the held-out synthetic split (`config.data.eval`).

  Zero-shot and retrieval use the first `data.eval_examples`; captioning decodes the first
  250 (beam search is the costly part of the demo's evaluation); the probe learns shape from
  held-out examples 5,000.. that no other evaluation reads (the training split has no labels).
  """
  evals = ml_collections.ConfigDict()
  for task, (_, templates) in synthetic.ZERO_SHOT_TASKS.items():
    evals[f'zeroshot_{task}'] = entry('zeroshot', label_key=f'labels/{task}',
                                      templates=tuple(templates))
  evals.retrieval = entry('retrieval', identical_text_is_hit=True)
  if captioning:
    evals.captioning = entry('captioning', num_examples=250)
  evals.linear_probe_shape = entry('linear_probe', label_key='labels/shape',
                                   train_data='synthetic:test', train_start=5_000,
                                   train_examples=1_000)
  return evals


def benchmark_evals(captioning: bool = True) -> ml_collections.ConfigDict:
  """The standard benchmarks through TFDS (they must be prepared in `data.tfds_data_dir`).

  ImageNet's TFDS label names are WordNet ids: pass a file of readable names with
  `--config.evals.imagenet2012.class_names=PATH` for a meaningful zero-shot number.
  """
  evals = ml_collections.ConfigDict()
  evals.imagenet2012 = entry('zeroshot', data='tfds:imagenet2012:validation',
                             num_examples=50_000)
  evals.cifar10 = entry('zeroshot', data='tfds:cifar10:test', num_examples=10_000)
  evals.cifar100 = entry('zeroshot', data='tfds:cifar100:test', num_examples=10_000)
  evals.cifar10_probe = entry('linear_probe', data='tfds:cifar10:test', num_examples=10_000,
                              train_data='tfds:cifar10:train', train_examples=50_000)
  # TFDS's coco_captions splits are Karpathy and Li's: `test` is the 5k-image test set
  # (about 5 captions each) that COCO retrieval and captioning numbers are reported on.
  evals.coco_retrieval = entry('retrieval', data='tfds:coco_captions:test',
                               num_examples=5_000)
  if captioning:
    evals.coco_captioning = entry('captioning', data='tfds:coco_captions:test',
                                  num_examples=5_000)
  return evals


def legacy_evals(config: Any) -> ml_collections.ConfigDict:
  """For a run saved before `config.evals` existed: its old evaluation on `data.eval`
  (first `data.eval_examples`): zero-shot on the synthetic tasks, retrieval at 1/5, greedy
  captioning."""
  evals = ml_collections.ConfigDict()
  synthetic_data = config.data.eval.startswith('synthetic')
  if synthetic_data:
    for task, (_, templates) in synthetic.ZERO_SHOT_TASKS.items():
      evals[f'zeroshot_{task}'] = entry('zeroshot', label_key=f'labels/{task}',
                                        templates=tuple(templates), ks=(1,))
  evals.retrieval = entry('retrieval', ks=(1, 5), identical_text_is_hit=synthetic_data)
  if config.model.text.multimodal_layers:
    evals.captioning = entry('captioning', methods=('greedy',))
  return evals


def evals_of(config: Any) -> ml_collections.ConfigDict:
  """`config.evals`, or `legacy_evals` for a config saved before it existed."""
  evals = config.get('evals')
  return legacy_evals(config) if evals is None else evals
