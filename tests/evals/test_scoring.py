"""Caption-likelihood zero-shot (`zeroshot_scoring`): `Pretrained.score_texts` is the
teacher-forced log-likelihood, its bounded batching and the mesh leave the numbers unchanged,
and the evaluator reports top-k from it (or skips a model that cannot caption)."""

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from conftest import load_config, pretrained_on_mesh, shrink
from vlrep.evals import entries
from vlrep.evals.suite import Evaluator
from vlrep.models.build import build_model, init_params

TEXTS = ['a red circle', 'two blue squares', 'three small green crosses and a circle']


def _init(config):
  coca = build_model(config)
  init = lambda rng: init_params(coca, config, rng)
  return jax.jit(lambda rng: nn.unbox(init(rng)))(jax.random.key(0)), \
      jax.eval_shape(init, jax.random.key(0))


@pytest.fixture(scope='module')
def models():
  """A shrunk tiny CoCa at its initialisation on 8 devices (data 2 x fsdp 4) and on one."""
  config = shrink(load_config('coca'))
  params, abstract = _init(config)
  return (config, pretrained_on_mesh(config, params, abstract, {'data': 2, 'fsdp': 4}),
          pretrained_on_mesh(config, params, abstract, {}, jax.devices()[:1], batch_size=4))


def _images(n):
  return np.random.default_rng(0).integers(0, 256, (n, 16, 16, 3), np.uint8)


def test_score_texts_is_the_summed_teacher_forced_log_likelihood(models):
  _, model, _ = models
  images = _images(5)
  scores = model.score_texts(images, TEXTS)
  assert scores.shape == (5, 3) and scores.dtype == np.float32
  tokens = model.tokenize(TEXTS)
  pad = model.config.model.text.pad_id
  for j in range(len(TEXTS)):
    rows = np.repeat(tokens[j:j + 1], len(images), axis=0)
    logits = model.caption_logits(images, rows)[:, :-1].astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    targets = rows[:, 1:]
    picked = np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    expected = np.where(targets != pad, picked, 0.0).sum(-1)
    np.testing.assert_allclose(scores[:, j], expected, rtol=1e-5)
  assert (scores < 0).all()


def test_text_groups_chunks_and_one_device_give_the_same_scores(models):
  _, on_eight, on_one = models
  images = _images(11)  # chunks of 8 (8 + 3 padded) and of 4 (4 + 4 + 3)
  reference = on_eight.score_texts(images, TEXTS)
  for model, text_batch in ((on_eight, 1), (on_eight, 2), (on_one, 2), (on_one, None)):
    np.testing.assert_allclose(model.score_texts(images, TEXTS, text_batch), reference,
                               rtol=1e-6, atol=1e-6, err_msg=str(text_batch))


def test_evaluator_reports_top_k_alike_on_one_and_eight_devices(models):
  config, on_eight, on_one = models
  config = config.copy_and_resolve_references()
  config.data.eval_examples = 13
  config.evals = ml_collections.ConfigDict({
      'scoring_colour': entries.entry('zeroshot_scoring', label_key='labels/colour',
                                      templates=('a {} shape', '{} shapes'), text_batch=4),
      'scoring_shape': entries.entry('zeroshot_scoring', label_key='labels/shape',
                                     templates=('a {}',))})
  evaluator = Evaluator(config)
  one, eight = evaluator(on_one), evaluator(on_eight)
  assert one == eight
  # 6 colours give top1 and top5; 4 shapes only top1 (a k not below the class count).
  assert set(one) == {'scoring_colour/top1', 'scoring_colour/top5', 'scoring_shape/top1'}
  for value in one.values():
    assert 0 <= value <= 1 and value * 13 == pytest.approx(round(value * 13), abs=1e-9)
  assert one['scoring_colour/top5'] >= one['scoring_colour/top1']


def test_a_model_without_multimodal_layers_is_skipped_and_bad_fields_refused():
  config = shrink(load_config('clip'))
  assert not config.model.text.multimodal_layers
  config.evals = ml_collections.ConfigDict({'scoring': entries.entry(
      'zeroshot_scoring', label_key='labels/shape', templates=('a {}',))})
  params, abstract = _init(config)
  model = pretrained_on_mesh(config, params, abstract, {}, jax.devices()[:1])
  assert Evaluator(config)(model) == {}
  with pytest.raises(ValueError, match='multimodal'):
    model.score_texts(_images(2), TEXTS)
  for bad in ({'text_batch': -1}, {'templates': ()}):
    with pytest.raises(ValueError, match='text_batch|templates'):
      entries.check('scoring', entries.entry('zeroshot_scoring', **bad))
