"""The evaluation run during and after training: every entry of `config.evals` on a model.

`Evaluator(config)` validates the entries (`vlrep/evals/entries.py`) and loads their examples
once; `evaluator(model)` runs them on a `Pretrained` model and returns flat
`{'eval_name/metric': float}`: `<name>/top1`, `<name>/top5` (zero-shot, by embeddings or by
caption likelihood), `<name>/i2t_r@K`,
`<name>/t2i_r@K` (retrieval), `<name>/{cider,bleu4,exact_match,distinct_captions}_{greedy,beam}`
(captioning), `<name>/top1`, `<name>/top5` (classification by a fine-tuned head),
`<name>/accuracy` and the chosen `<name>/l2` (linear probe), `<name>/accuracy` (attentive
probe, on the frozen image tokens), `<name>/top<k>`, `<name>/v2t_r@K`, `<name>/t2v_r@K`
(zero-shot video classification and text-video retrieval, on clips of `frames` frames,
`vlrep/evals/video.py`). A FILIP model
(`loss.contrastive_similarity='token'`) ranks by its token-wise similarity in zero-shot and
retrieval (`Pretrained.zero_shot_scores`, `token_similarity_scores`), streaming the images
for each entry, as its patch embeddings are too large to keep; probes read its vectors.

Entries reading the same examples share them: examples and image embeddings are loaded /
computed once for the largest range any entry asks for and sliced for the others. Every
number is computed on the host from whole arrays that `Pretrained` returns identically on
every process and mesh (it pads the last chunk and drops the padding), so results do not
depend on the device or process count. Images are streamed: the evaluator keeps the
examples' captions, labels and indices, and each evaluation decodes the images again one
chunk (`Pretrained.batch_size`, i.e. `eval_batch_size`) at a time, embedding or captioning
each chunk before the next is read; so host memory holds one chunk of decoded images (plus
the float32 embeddings, E floats per example) whatever the set's size, where the whole set
used to be held (12 GB for ImageNet's 50,000 validation images at 288 px). Each process
decodes only the rows of each chunk that its devices hold (`Pretrained`'s chunking), and logs
how many it decoded.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import ml_collections
import numpy as np

from vlrep.data import pipeline
from vlrep.evals import attentive_probe, captioning, entries, probe, retrieval, video, zeroshot
from vlrep.models.coca import VIDEO_POOLS
from vlrep.pretrained import Pretrained

_Key = tuple[str, int, str]  # (source string, start, TFDS label key or '')


def check(config: ml_collections.ConfigDict) -> None:
  """Fails fast (ValueError naming the entry) on a bad `config.evals` or source string."""
  for name, entry in entries.evals_of(config).items():
    entries.check(name, entry)
    if entry.type in ('zeroshot', 'retrieval', *video.TYPES) and not config.model.contrastive:
      raise ValueError(f'evals.{name}: a {entry.type} evaluation needs text embeddings, which a '
                       'captioning-only model (model.contrastive=False) has none of; drop the '
                       'entry (captioning and linear_probe run)')
    if entry.type == 'classification' and (config.loss.kind != 'classification'
                                           or config.model.num_classes < 2):
      raise ValueError(f"evals.{name}: a classification evaluation reads the head that "
                       "loss.kind='classification' trains (model.num_classes >= 2)")
    if entry.get('max_len', 0) > config.data.max_text_len:
      raise ValueError(f'evals.{name}.max_len={entry.max_len} exceeds the text length the model '
                       f'is built for, data.max_text_len={config.data.max_text_len}')
    if entry.type in video.TYPES and entry.pool not in VIDEO_POOLS:
      raise ValueError(f'evals.{name}.pool={entry.pool!r}; expected one of {VIDEO_POOLS}')
    label_key = entry.get('label_key', '')
    for spec in {entry.data, entry.get('train_data', '') or entry.data}:
      source = pipeline.eval_source(config, spec, label_key)
      if label_key and not (spec or config.data.eval).startswith('tfds:') and len(source):
        # Records carry their labels: the first one shows whether this one exists.
        pipeline.select_label({**source[0], 'zero_shot_tasks': {}}, label_key,
                              spec or config.data.eval)
    if entry.type == 'attentive_probe' and config.model.vision.width % _heads(entry, config):
      raise ValueError(f'evals.{name}.heads={entry.heads} does not divide the image tokens\' '
                       f'width, model.vision.width={config.model.vision.width}')


class _Examples:
  """Eval examples and their image embeddings, loaded once per range and sliced."""

  def __init__(self, config: ml_collections.ConfigDict):
    self._config = config
    self._loaded: dict[_Key, dict[str, Any]] = {}
    self._requested: dict[_Key, int] = {}
    self._embedded: dict[_Key, np.ndarray] = {}
    self.videos = video.VideoExamples(config)

  def _key(self, spec: str, start: int, label_key: str) -> _Key:
    spec = spec or self._config.data.eval
    # A TFDS label is read through the source (see pipeline.eval_examples): its own load.
    return spec, start, label_key if spec.startswith('tfds:') else ''

  def request(self, spec: str, start: int, count: int, label_key: str = '') -> None:
    key = self._key(spec, start, label_key)
    count = int(count or self._config.data.eval_examples)
    self._requested[key] = max(self._requested.get(key, 0), count)

  def load(self) -> None:
    self.videos.load()
    for key, count in self._requested.items():
      if key not in self._loaded:
        spec, start, label_key = key
        self._loaded[key] = pipeline.eval_examples(self._config, spec, count, start, label_key,
                                                   stream=True)

  def get(self, spec: str, start: int, count: int, label_key: str = '') -> dict[str, Any]:
    key = self._key(spec, start, label_key)
    count = int(count or self._config.data.eval_examples)
    loaded = self._loaded[key]
    # Per-example values are sliced; the source's class names and tasks are not.
    out = {k: v if k in ('class_names', 'zero_shot_tasks') else v[:count]
           for k, v in loaded.items()}
    if label_key and not key[2]:
      out.update(pipeline.select_label(out, label_key, key[0]))
    return out

  def image_embeddings(self, model: Pretrained, spec: str, start: int, count: int,
                       label_key: str = '') -> np.ndarray:
    """Embeddings of `get(...)['images']`; valid until `clear`."""
    key = self._key(spec, start, label_key)
    if key not in self._embedded:
      self._embedded[key] = model.encode_image(self._loaded[key]['images'])
    return self._embedded[key][:len(self.get(spec, start, count, label_key)['images'])]

  def clear(self) -> None:
    self._embedded.clear()
    self.videos.clear()


def _classes(name: str, entry: Any, examples: dict[str, Any]) -> tuple[list[str], np.ndarray]:
  """(class names, labels) of a zero-shot entry, checked against each other."""
  if entry.class_names:
    class_names = zeroshot.read_class_names(entry.class_names)
  elif 'class_names' in examples:
    class_names = examples['class_names']
  else:
    raise ValueError(f'evals.{name}: the source has no names for {entry.label_key!r}; give '
                     f'a file with one per line as evals.{name}.class_names')
  labels = examples['label']
  num_classes = labels.shape[1] if labels.ndim == 2 else int(labels.max()) + 1
  if (labels.ndim == 2 and num_classes != len(class_names)) or num_classes > len(class_names):
    raise ValueError(f'evals.{name}: labels have {num_classes} classes but there are '
                     f'{len(class_names)} class names')
  return list(class_names), labels


def _topk(name: str, entry: Any, scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  # A k not below the class count always scores 1: not reported.
  return {f'{name}/top{k}': zeroshot.topk_hits(scores, labels, k)
          for k in entry.ks if k < scores.shape[1]}


def _zeroshot(name: str, entry: Any, data: _Examples, model: Pretrained) -> dict[str, float]:
  examples = data.get(entry.data, entry.start, entry.num_examples, entry.label_key)
  class_names, labels = _classes(name, entry, examples)
  if model.token_similarity:
    return _topk(name, entry, model.zero_shot_scores(examples['images'], class_names,
                                                     tuple(entry.templates)), labels)
  classifier = model.zero_shot_classifier(class_names, tuple(entry.templates))
  image_emb = data.image_embeddings(model, entry.data, entry.start, entry.num_examples,
                                    entry.label_key)
  return _topk(name, entry, image_emb @ classifier.T, labels)


def _zeroshot_scoring(name: str, entry: Any, data: _Examples,
                      model: Pretrained) -> dict[str, float]:
  if not model.config.model.text.multimodal_layers:
    logging.info('evals.%s skipped: the model has no multimodal layers to score prompts with',
                 name)
    return {}
  examples = data.get(entry.data, entry.start, entry.num_examples, entry.label_key)
  class_names, labels = _classes(name, entry, examples)
  templates = tuple(entry.templates)
  prompts = [template.format(c) for c in class_names for template in templates]
  scores = model.score_texts(examples['images'], prompts, entry.text_batch or None)
  # Mean log-likelihood over templates, not log-mean-exp: a template's own length and
  # likelihood shift every class's score alike, so each template weighs the same, where a
  # log-mean-exp would be ruled by whichever template the decoder finds likeliest.
  return _topk(name, entry, scores.reshape(len(scores), len(class_names), -1).mean(-1),
               labels)


def _captions_and_pairs(references: list[list[str]], entry: Any) -> tuple[list[str], Any]:
  """Every reference caption, flattened, and which (image or clip, caption) pairs are hits."""
  texts = [text for refs in references for text in refs]
  ids = np.repeat(np.arange(len(references)), [len(refs) for refs in references])
  return texts, retrieval.correct_pairs(ids, len(references), texts,
                                        entry.identical_text_is_hit)


def _retrieval(name: str, entry: Any, data: _Examples, model: Pretrained) -> dict[str, float]:
  examples = data.get(entry.data, entry.start, entry.num_examples)
  texts, correct = _captions_and_pairs(examples['references'], entry)
  if model.token_similarity:
    image_to_text, text_to_image = model.token_similarity_scores(examples['images'], texts)
    recalls = retrieval.recall_from_scores(image_to_text, text_to_image.T, correct,
                                           tuple(entry.ks))
  else:
    image_emb = data.image_embeddings(model, entry.data, entry.start, entry.num_examples)
    recalls = retrieval.recall_at_k(image_emb, model.encode_text(texts), correct,
                                    tuple(entry.ks))
  return {f'{name}/{metric}': value for metric, value in recalls.items()}


def _captioning(name: str, entry: Any, data: _Examples, model: Pretrained) -> dict[str, float]:
  if not model.config.model.text.multimodal_layers:
    logging.info('evals.%s skipped: the model has no multimodal layers to caption with', name)
    return {}
  examples = data.get(entry.data, entry.start, entry.num_examples)
  references = dict(enumerate(examples['references']))
  results = {}
  for method in entry.methods:
    options = dict(beam_size=entry.beam_size, length_penalty=entry.length_penalty) \
        if method == 'beam' else {}
    predictions = dict(enumerate(model.caption(examples['images'], entry.max_len or None,
                                               method=method, **options)))
    results[f'{name}/cider_{method}'] = captioning.cider_d(predictions, references)
    results[f'{name}/bleu4_{method}'] = captioning.bleu4(predictions, references)
    normalised = captioning.normalize_caption
    results[f'{name}/exact_match_{method}'] = float(np.mean(
        [normalised(predictions[i]) in {normalised(r) for r in refs}
         for i, refs in references.items()]))
    # A captioner that gives every image one caption can still score some CIDEr.
    results[f'{name}/distinct_captions_{method}'] = captioning.distinct_fraction(predictions)
  return results


def _classification(name: str, entry: Any, data: _Examples,
                    model: Pretrained) -> dict[str, float]:
  examples = data.get(entry.data, entry.start, entry.num_examples, entry.label_key)
  logits, labels = model.classify(examples['images']), examples['label']
  classes = labels.shape[1] if labels.ndim == 2 else int(labels.max()) + 1
  if (labels.ndim == 2 and classes != logits.shape[1]) or classes > logits.shape[1]:
    raise ValueError(f'evals.{name}: {entry.label_key!r} has {classes} classes, the head '
                     f'{logits.shape[1]} (model.num_classes)')
  return _topk(name, entry, logits, labels)


def _linear_probe(name: str, entry: Any, data: _Examples, model: Pretrained) -> dict[str, float]:
  test = data.get(entry.data, entry.start, entry.num_examples, entry.label_key)
  train_data = entry.train_data or entry.data
  train = data.get(train_data, entry.train_start, entry.train_examples, entry.label_key)
  test_x = data.image_embeddings(model, entry.data, entry.start, entry.num_examples,
                                 entry.label_key)
  train_x = data.image_embeddings(model, train_data, entry.train_start, entry.train_examples,
                                  entry.label_key)
  out = probe.linear_probe(train_x, train['label'], test_x, test['label'],
                           tuple(entry.l2_grid), entry.val_fraction, entry.steps)
  return {f'{name}/accuracy': out['accuracy'], f'{name}/l2': out['l2']}


def _heads(entry: Any, config: ml_collections.ConfigDict) -> int:
  return entry.heads or config.model.vision.heads


def _attentive_probe(name: str, entry: Any, data: _Examples,
                     model: Pretrained) -> dict[str, float]:
  train_data = entry.train_data or entry.data
  test = data.get(entry.data, entry.start, entry.num_examples, entry.label_key)
  train = data.get(train_data, entry.train_start, entry.train_examples, entry.label_key)
  tokens = lambda images: model.image_tokens(images, attentive_probe.HOST_DTYPE)
  out = attentive_probe.attentive_probe(
      tokens(train['images']), train['label'], tokens(test['images']), test['label'],
      model.mesh, queries=entry.queries, heads=_heads(entry, model.config), steps=entry.steps,
      learning_rate=entry.learning_rate, batch_size=entry.batch_size,
      weight_decay=entry.weight_decay, seed=entry.seed, chunk=model.batch_size)
  return {f'{name}/accuracy': out['accuracy']}


def _zeroshot_video(name: str, entry: Any, data: _Examples,
                    model: Pretrained) -> dict[str, float]:
  examples = data.videos.get(entry, entry.label_key)
  class_names, labels = _classes(name, entry, examples)
  classifier = model.zero_shot_classifier(class_names, tuple(entry.templates))
  return _topk(name, entry, data.videos.embeddings(model, entry) @ classifier.T, labels)


def _video_retrieval(name: str, entry: Any, data: _Examples,
                     model: Pretrained) -> dict[str, float]:
  texts, correct = _captions_and_pairs(data.videos.get(entry)['references'], entry)
  recalls = retrieval.recall_at_k(data.videos.embeddings(model, entry), model.encode_text(texts),
                                  correct, tuple(entry.ks))
  return {f"{name}/{metric.replace('i2t', 'v2t').replace('t2i', 't2v')}": value
          for metric, value in recalls.items()}


_RUN: dict[str, Callable[[str, Any, _Examples, Pretrained], dict[str, float]]] = {
    'zeroshot': _zeroshot, 'zeroshot_scoring': _zeroshot_scoring, 'retrieval': _retrieval,
    'captioning': _captioning, 'linear_probe': _linear_probe,
    'attentive_probe': _attentive_probe, 'classification': _classification,
    'zeroshot_video': _zeroshot_video, 'video_retrieval': _video_retrieval}


def _check_probe_overlap(name: str, entry: Any, config: ml_collections.ConfigDict) -> None:
  test_spec, train_spec = entry.data or config.data.eval, entry.train_data or entry.data or \
      config.data.eval
  test = (entry.start, entry.start + (entry.num_examples or config.data.eval_examples))
  train = (entry.train_start, entry.train_start + entry.train_examples)
  if test_spec == train_spec and test[0] < train[1] and train[0] < test[1]:
    raise ValueError(f'evals.{name}: the probe would train on test examples ({train_spec} '
                     f'{train[0]}..{train[1]} overlaps {test[0]}..{test[1]})')


class Evaluator:
  """Every entry of `config.evals` (or, for an old run's config, `entries.legacy_evals`)."""

  def __init__(self, config: ml_collections.ConfigDict):
    check(config)
    self.entries = entries.evals_of(config)
    self._data = _Examples(config)
    for name, entry in self.entries.items():
      label_key = entry.get('label_key', '')
      if entry.type in video.TYPES:
        self._data.videos.request(entry)
        continue
      self._data.request(entry.data, entry.start, entry.num_examples, label_key)
      if entry.type in entries.PROBES:
        _check_probe_overlap(name, entry, config)
        self._data.request(entry.train_data or entry.data, entry.train_start,
                           entry.train_examples, label_key)
    self._data.load()

  def __call__(self, model: Pretrained) -> dict[str, float]:
    results: dict[str, float] = {}
    decoded = pipeline.eval_images_decoded()
    try:
      for name, entry in self.entries.items():
        start = time.time()
        results.update(_RUN[entry.type](name, entry, self._data, model))
        logging.info('evals.%s: %.1fs', name, time.time() - start)
    finally:
      self._data.clear()  # embeddings belong to these parameters only
    logging.info('this process decoded %d evaluation images',
                 pipeline.eval_images_decoded() - decoded)
    return results
