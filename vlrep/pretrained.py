"""`vlrep.load(workdir)` and `Pretrained`: a trained model as plain Python functions.

`Pretrained` wraps a config and its parameters and exposes `tokenize`, `encode_image`,
`image_tokens`, `encode_video`, `encode_text`, `caption`, `zero_shot_classifier`,
`zero_shot_scores`, `retrieve`, `score_texts`, `classify` and, for FILIP models,
`token_similarity_scores`; evaluators
use the same methods, so what is measured is what users get. Inputs of any batch size are
processed in fixed-size chunks (the last one padded), so each method compiles once per chunk
shape. Each chunk is split over the batch axes of a device mesh (the training mesh during
training, all devices otherwise), so it runs data-parallel on every device of every process;
every process passes the same inputs and gets the full outputs back. Streamed evaluation images
(`pipeline.EvalImages`) are decoded chunk by chunk, each process only its devices' rows.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vlrep.data.tokenizer import get_tokenizer
from vlrep.evals import retrieval, token_scores, zeroshot
from vlrep.evals import video as video_embeddings
from vlrep.models import decode
from vlrep.models.build import build_model
from vlrep.models.coca import CoCa
from vlrep.parallel import sharding
from vlrep.parallel.chunks import in_chunks, host_inputs

if TYPE_CHECKING:
  from vlrep.data import pipeline


# Decoding methods of `Pretrained.caption` and the options each accepts.
CAPTION_METHODS = {
    'greedy': {'min_len', 'repetition_penalty'},
    'beam': {'beam_size', 'length_penalty', 'min_len', 'repetition_penalty'},
    'sample': {'temperature', 'top_k', 'top_p', 'repetition_penalty', 'min_len', 'seed'},
}


@functools.partial(jax.jit, static_argnums=0)
def _encode_image(model: CoCa, params: Any, images: jax.Array) -> jax.Array:
  return model.apply({'params': params}, images, method=CoCa.encode_image)[0]


@functools.partial(jax.jit, static_argnums=(0, 3))
def _image_tokens(model: CoCa, params: Any, images: jax.Array, dtype: Any) -> jax.Array:
  return model.apply({'params': params}, images,
                     method=lambda module, x: module.image_encoder(x)).astype(dtype)


@functools.partial(jax.jit, static_argnums=0)
def _classify(model: CoCa, params: Any, images: jax.Array) -> jax.Array:
  return model.apply({'params': params}, images, method=CoCa.classify)


@functools.partial(jax.jit, static_argnums=0)
def _encode_text(model: CoCa, params: Any, tokens: jax.Array) -> jax.Array:
  return model.apply({'params': params}, tokens, method=CoCa.encode_text)[0]


@functools.partial(jax.jit, static_argnums=0)
def _next_token_logits(model: CoCa, params: Any, images: jax.Array,
                       tokens: jax.Array) -> jax.Array:
  return model.apply({'params': params}, images, tokens, method=CoCa.next_token_logits)


@functools.partial(jax.jit, static_argnums=0)
def _caption_tokens(model: CoCa, params: Any, images: jax.Array) -> jax.Array:
  return model.apply({'params': params}, images, method=CoCa.encode_image)[1]


@functools.partial(jax.jit, static_argnums=0)
def _unimodal_features(model: CoCa, params: Any, tokens: jax.Array) -> jax.Array:
  # The text decoder's own `encode`: captioning-only models have no `CoCa.encode_text`.
  return model.apply({'params': params}, tokens,
                     method=lambda module, t: module.text_decoder.encode(t)[1])


@functools.partial(jax.jit, static_argnums=0)
def _score_group(model: CoCa, params: Any, caption_tokens: jax.Array,
                 token_features: jax.Array, tokens: jax.Array) -> jax.Array:
  """Summed log p(tokens[g, 1:] | image b) over non-pad targets, float32 [B, G], for every
  image x prompt pair: the multimodal layers run on all B x G pairs at once."""
  images, prompts = caption_tokens.shape[0], tokens.shape[0]

  def score(module):
    context = jnp.repeat(caption_tokens, prompts, axis=0)  # image-major: row b * G + g
    features = jnp.tile(token_features[:, :-1], (images, 1, 1))
    targets = jnp.tile(tokens[:, 1:], (images, 1))
    logits = module.text_decoder.caption_logits(features, context).astype(jnp.float32)
    logp = -optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    keep = targets != module.text_decoder.pad_id
    return jnp.sum(jnp.where(keep, logp, 0.0), axis=-1).reshape(images, prompts)
  return model.apply({'params': params}, method=score)


def _zero_shot_templates(caller: str, class_names: Sequence[str],
                         templates: Sequence[str] | None) -> tuple[str, ...]:
  templates = zeroshot.DEFAULT_TEMPLATES if templates is None else tuple(templates)
  if not class_names or not templates:
    raise ValueError(f'{caller} needs at least one class name and one template')
  return templates


class Pretrained:
  """A CoCa-family model with its parameters, config and tokenizer."""

  def __init__(self, config: ml_collections.ConfigDict, params: Any, batch_size: int = 256,
               mesh: jax.sharding.Mesh | None = None):
    """`params` live on `mesh` (default: all devices on the batch axes, as `load` places them)."""
    self.config, self.params = config, params
    self.mesh = sharding.make_mesh(sharding.DATA_PARALLEL) if mesh is None else mesh
    self._batch_sharding = sharding.batch_sharding(self.mesh)
    # A whole number of rows per device.
    devices = sharding.batch_devices(self.mesh)
    self.batch_size = -(-batch_size // devices) * devices
    self.model = build_model(config)
    # FILIP (`loss.contrastive_similarity='token'`): image-text scores are token-wise.
    self.token_similarity = self.model.token_similarity
    self.decoder = build_model(config, decode=True)
    self.tokenizer = get_tokenizer(config.data.tokenizer)

  def tokenize(self, texts: Sequence[str] | np.ndarray) -> np.ndarray:
    """int32 [len(texts), data.max_text_len]; int token rows are taken as they are."""
    if isinstance(texts, np.ndarray) and texts.dtype.kind == 'i':
      return texts.astype(np.int32)
    return np.asarray(self.tokenizer.encode(list(texts), self.config.data.max_text_len), np.int32)

  def preprocess_images(self, images: np.ndarray) -> np.ndarray:
    """uint8 [B, H, W, 3] of any size -> uint8 at the model's size; float input unchanged."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'images must be [B, H, W, 3], got {images.shape}')
    size = self.config.data.image_size
    if images.dtype != np.uint8:
      if images.shape[1:3] != (size, size):
        raise ValueError(f'float images are taken as preprocessed and must be {size}x{size}, '
                         f'got {images.shape[1:3]}')
      return images.astype(np.float32)
    if images.shape[1:3] == (size, size):
      return images
    resized = jax.image.resize(images.astype(np.float32), (len(images), size, size, 3),
                               'bilinear', antialias=True)
    return np.clip(np.round(np.asarray(resized)), 0, 255).astype(np.uint8)

  def encode_image(self, images: np.ndarray | pipeline.EvalImages) -> np.ndarray:
    """L2-normalised image embeddings float32 [B, E]; `images` as `preprocess_images` takes
    them, or streamed evaluation images (each process decodes only its devices' rows)."""
    return in_chunks(lambda x: _encode_image(self.model, self.params, x),
                      host_inputs(images), self.batch_size, self._batch_sharding,
                      self.preprocess_images)

  def image_tokens(self, images: np.ndarray | pipeline.EvalImages,
                   dtype: Any = np.float32) -> np.ndarray:
    """The frozen image encoder's output tokens [B, N, W] (what the model's attentional
    poolers read; a class token, if any, first) in `dtype` (the attentive probe keeps
    bfloat16); `images` as `encode_image` takes them."""
    return in_chunks(lambda x: _image_tokens(self.model, self.params, x, np.dtype(dtype)),
                     host_inputs(images), self.batch_size, self._batch_sharding,
                     self.preprocess_images)

  def classify(self, images: np.ndarray | pipeline.EvalImages) -> np.ndarray:
    """Logits float32 [B, model.num_classes] of a classification fine-tune's head
    (`loss.kind='classification'`); `images` as `encode_image` takes them."""
    if not self.model.num_classes:
      raise ValueError("this model has no classification head (it is built for "
                       "loss.kind='classification' with model.num_classes > 0)")
    return in_chunks(lambda x: _classify(self.model, self.params, x), host_inputs(images),
                     self.batch_size, self._batch_sharding, self.preprocess_images)

  def encode_video(self, videos: np.ndarray, pool: str = 'attn') -> np.ndarray:
    """L2-normalised video embeddings float32 [B, E] of frames [B, T, H, W, 3] (each frame
    as `preprocess_images` takes it): `pool='attn'` runs the model's attentional poolers on
    the tokens of all T frames at once, 'mean' averages the frame embeddings
    (`CoCa.encode_video`). Chunks hold about `batch_size` frames."""
    return video_embeddings.encode_video(self, videos, pool)

  def encode_text(self, texts: Sequence[str] | np.ndarray) -> np.ndarray:
    """L2-normalised text embeddings float32 [B, E] of strings or int token rows."""
    return in_chunks(lambda x: _encode_text(self.model, self.params, x), self.tokenize(texts),
                      self.batch_size, self._batch_sharding)

  def caption_ids(self, images: np.ndarray | pipeline.EvalImages, max_len: int | None = None, *,
                  method: str = 'greedy', **options: Any) -> np.ndarray:
    """Decoded token rows int32 [B, max_len] (`[BOS, ..., EOS, PAD ...]`).

    `method` is one of CAPTION_METHODS: 'greedy' (options: min_len, repetition_penalty),
    'beam' (beam_size, length_penalty, min_len, repetition_penalty) or 'sample'
    (temperature, top_k, top_p, repetition_penalty, min_len, seed); see `vlrep.models.decode`.
    """
    if not self.config.model.text.multimodal_layers:
      raise ValueError('this model has no multimodal layers, so it cannot caption')
    if method not in CAPTION_METHODS:
      raise ValueError(f'method={method!r}; expected one of {tuple(CAPTION_METHODS)}')
    unknown = set(options) - CAPTION_METHODS[method]
    if unknown:
      raise ValueError(f'options {sorted(unknown)} do not apply to method {method!r}')
    max_len = max_len or self.config.data.max_text_len
    images = host_inputs(images)
    options.update(bos_id=self.tokenizer.bos_id, eos_id=self.tokenizer.eos_id)
    if method == 'sample':
      rng = jax.random.key(options.pop('seed', 0))
      chunks = iter(range(len(images)))  # a different key for each chunk

      def decode_chunk(context):
        key = jax.random.fold_in(rng, next(chunks))
        return decode.sample(self.decoder, self.params, context, max_len, key, **options)
    elif method == 'beam':
      decode_chunk = lambda context: decode.beam_search(self.decoder, self.params, context,
                                                        max_len, **options)
    else:
      decode_chunk = lambda context: decode.greedy(self.decoder, self.params, context,
                                                   max_len, **options)

    def run(chunk):
      return decode_chunk(_caption_tokens(self.model, self.params, chunk))
    return in_chunks(run, images, self.batch_size, self._batch_sharding,
                      self.preprocess_images)

  def caption(self, images: np.ndarray, max_len: int | None = None, *, method: str = 'greedy',
              **options: Any) -> list[str]:
    """Captions, one string per image; arguments as `caption_ids`."""
    return [self.tokenizer.decode(row)
            for row in self.caption_ids(images, max_len, method=method, **options)]

  def zero_shot_classifier(self, class_names: Sequence[str],
                           templates: Sequence[str] | None = None) -> np.ndarray:
    """float32 [C, E]: one normalised text embedding per class, for zero-shot classification.

    Each class's prompts (`template.format(name)` for every template; default
    `vlrep.evals.zeroshot.DEFAULT_TEMPLATES`) are embedded, averaged and re-normalised, as
    the zero-shot evaluator does: `scores = m.encode_image(images) @ classifier.T`.
    """
    if self.token_similarity:
      raise ValueError('a FILIP model (token similarity) has no vector classifier: '
                       'zero_shot_scores ranks classes as its evaluator does')
    templates = _zero_shot_templates('zero_shot_classifier', class_names, templates)
    return zeroshot.class_embeddings(self.encode_text, list(class_names), templates)

  def zero_shot_scores(self, images: np.ndarray | pipeline.EvalImages,
                       class_names: Sequence[str],
                       templates: Sequence[str] | None = None) -> np.ndarray:
    """float32 [N_images, C]: each image's score for each class, as the zero-shot evaluator
    ranks them: `encode_image(images) @ zero_shot_classifier(...).T`, or for a FILIP model
    the mean over a class's prompts of their token-wise image->text similarity (token sets
    have no mean to ensemble, as vectors do)."""
    if not self.token_similarity:
      return self.encode_image(images) @ self.zero_shot_classifier(class_names, templates).T
    templates = _zero_shot_templates('zero_shot_scores', class_names, templates)
    prompts = [template.format(name) for name in class_names for template in templates]
    image_to_text, _ = self.token_similarity_scores(images, prompts)
    return image_to_text.reshape(len(image_to_text), len(class_names), -1).mean(-1)

  def token_similarity_scores(self, images: np.ndarray | pipeline.EvalImages,
                              texts: Sequence[str] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FILIP's (s^I, s^T), float32 [N_images, N_texts] each (`vlrep.late_interaction`):
    image->text and text->image token-wise similarity of every image with every text.

    `texts` are strings or int token rows; memory as `vlrep.evals.token_scores` says.
    """
    if not self.token_similarity:
      raise ValueError("token_similarity_scores needs loss.contrastive_similarity='token'")
    return token_scores.similarity_scores(self, images, self.tokenize(texts))

  def retrieve(self, queries: np.ndarray | Sequence[str], candidates: np.ndarray | Sequence[str],
               k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """(indices int [Q, k], scores float32 [Q, k]): each query's k nearest candidates.

    Queries and candidates are each images (a [B, H, W, 3] array, as `encode_image` takes)
    or texts (a list of str), so this is text->image, image->text, image->image or
    text->text search (token rows int [B, L] work as texts); ranking (cosine similarity,
    ties in candidate order) is the retrieval evaluator's. A FILIP model ranks image->text
    and text->image by its token-wise similarity (`token_similarity_scores`) and refuses
    same-modality search.
    """
    is_images = lambda x: isinstance(x, np.ndarray) and x.ndim == 4
    if self.token_similarity:  # FILIP: its image->text or text->image similarity
      if is_images(queries) == is_images(candidates):
        raise ValueError('a FILIP model (token similarity) compares images with texts only')
      scores = self.token_similarity_scores(queries, candidates)[0] if is_images(queries) \
          else self.token_similarity_scores(candidates, queries)[1].T
      return retrieval.rank_scores(scores, min(k, len(candidates)))

    def embed(x):
      if isinstance(x, np.ndarray):  # images, or token rows
        return self.encode_image(x) if is_images(x) else self.encode_text(x)
      return self.encode_text(list(x))
    return retrieval.rank(embed(queries), embed(candidates), min(k, len(candidates)))

  def caption_logits(self, images: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Teacher-forced next-token logits float32 [B, L, V] for int token rows [B, L].

    `[:, t]` is the prediction for `tokens[:, t + 1]` given the image and `tokens[:, :t + 1]`,
    at every position including the last (open_clip's CoCa forward with
    `output_labels=False`; its default forward drops the last position: `[:, :-1]` here).
    """
    if not self.config.model.text.multimodal_layers:
      raise ValueError('this model has no multimodal layers, so it has no caption logits')
    images, tokens = self.preprocess_images(images), np.asarray(tokens)
    if tokens.ndim != 2 or tokens.dtype.kind not in 'iu' or len(tokens) != len(images):
      raise ValueError(f'tokens must be int [B, L] with B = {len(images)} images, got '
                       f'{tokens.dtype} {tokens.shape}')
    # Logits are [rows, L, V] floats: keep a chunk near 2^28 of them (1 GiB).
    devices = sharding.batch_devices(self.mesh)
    rows = (2 ** 28 // max(1, tokens.shape[1] * self.config.model.text.vocab_size))
    chunk = min(self.batch_size, max(devices, rows // devices * devices))
    return in_chunks(functools.partial(_next_token_logits, self.model, self.params),
                      (images, tokens.astype(np.int32)), chunk, self._batch_sharding)

  def score_texts(self, images: np.ndarray | pipeline.EvalImages, texts: Sequence[str],
                  text_batch: int | None = None) -> np.ndarray:
    """float32 [N_images, N_texts]: log p(text | image) under the captioner, summed over the
    text's tokens after BOS (EOS included, padding not); CapPa's scoring classifier ranks
    classes by it. `images` as `encode_image` takes them. A sum, not a per-token mean: the
    prompts of one template share every word but the class name, so the sum ranks classes by
    the likelihood of their names in context, where a mean would divide that by a length that
    is mostly the template's. Being a probability, it favours names of fewer tokens.

    The unimodal features of every text are computed once (T x L x W values on each device);
    each image chunk then runs the multimodal layers on its images x `text_batch` texts at a
    time, so a device holds [chunk / devices x text_batch, L - 1, V] float32 logits at most.
    `text_batch` None: as many as keep that within 2^28 floats (1 GiB). The numbers do not
    depend on `text_batch`, the chunk size or the mesh beyond float rounding (tested).
    """
    if not self.config.model.text.multimodal_layers:
      raise ValueError('this model has no multimodal layers, so it cannot score texts')
    texts = list(texts)
    if not texts:
      raise ValueError('score_texts needs at least one text')
    tokens = self.tokenize(texts)
    if text_batch is None:
      rows = self.batch_size // sharding.batch_devices(self.mesh)
      logits = rows * (tokens.shape[1] - 1) * self.config.model.text.vocab_size
      text_batch = max(1, 2 ** 28 // logits)
    text_batch = min(text_batch, len(texts))
    # Whole groups only (one compiled shape); the padding rows' scores are dropped.
    padded = -(-len(texts) // text_batch) * text_batch
    tokens = np.concatenate([tokens, np.full((padded - len(texts), tokens.shape[1]),
                                             self.config.model.text.pad_id, tokens.dtype)])
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    groups = []
    for start in range(0, padded, text_batch):
      group = jax.make_array_from_process_local_data(
          replicated, tokens[start:start + text_batch].astype(np.int32))
      with sharding.axis_rules(self.mesh):  # as `in_chunks` runs the rest
        groups.append((_unimodal_features(self.model, self.params, group), group))

    def run(chunk):
      context = _caption_tokens(self.model, self.params, chunk)
      return jnp.concatenate([_score_group(self.model, self.params, context, features, group)
                              for features, group in groups], axis=1)
    return in_chunks(run, host_inputs(images), self.batch_size, self._batch_sharding,
                      self.preprocess_images)[:, :len(texts)]

  def save(self, path: str) -> str:
    """Writes the model to the directory `path` (config.json + params.safetensors, see
    `vlrep.weights.export`); `vlrep.load(path)` reads it on any device count. Call on every
    process."""
    from vlrep.weights import export  # pylint: disable=g-import-not-at-top
    return export.save(path, self.config, self.params)


def load(path: str, step: int | None = None, *, mesh: jax.sharding.Mesh | None = None,
         raw_params: bool = False) -> Pretrained:
  """The model of a training run directory (its latest checkpoint, or `step`) or of a
  directory written by `Pretrained.save`, placed on `mesh` (default: every device on the
  batch axes) whatever the device count it was trained or saved on.

  A run that kept an EMA of its parameters (`optim.ema_decay`) gives the EMA, as its
  evaluations measured it; `raw_params=True` gives the trained parameters themselves. An
  exported model holds one set, the one it was saved with."""
  from vlrep.weights import export  # pylint: disable=g-import-not-at-top
  from vlrep.runtime import paths  # pylint: disable=g-import-not-at-top
  path = paths.local(paths.check(path))
  mesh = sharding.make_mesh(sharding.DATA_PARALLEL) if mesh is None else mesh
  config = export.read_config(path)
  abstract = export.abstract_params(config, mesh)
  if export.is_exported(path):
    if step is not None:
      raise ValueError(f'{path!r} is an exported model, which has no steps (step={step})')
    if raw_params:
      raise ValueError(f'{path!r} is an exported model, which holds one set of parameters '
                       '(raw_params=True applies to training run directories)')
    params = export.place(export.read_arrays(path), abstract, path)
  else:
    from vlrep.runtime import checkpoint  # orbax is only needed here, not for Pretrained itself
    params = checkpoint.restore_params(path, config, step, mesh, raw_params=raw_params)
  return Pretrained(config, params, mesh=mesh)
