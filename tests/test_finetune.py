"""Fine-tuning through the one loop (configs/finetune.py): a classification head trained with
cross-entropy from `init_from`, evaluated by top-1; a captioning fine-tune evaluated by CIDEr
and distinct captions. Losses and metrics against numpy, 1 device against 8."""

import json
import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

import vlrep
from vlrep import classification, step, train
from vlrep.data import pipeline, synthetic
from vlrep.evals import captioning, entries
from vlrep.evals.suite import Evaluator
from vlrep.models.build import build_model, init_params
from vlrep.pretrained import Pretrained
from vlrep.weights import export

from conftest import assert_same_params, load_config, shrink


def _finetune(kind: str) -> ml_collections.ConfigDict:
  config = shrink(load_config('finetune', kind))
  config.update(total_steps=3, checkpoint_every_steps=3, eval_every_steps=3, log_every_steps=3)
  return config


@pytest.fixture(scope='module')
def source(tmp_path_factory):
  """(export directory, its arrays): the CoCa weights fine-tuning starts from (an exported
  seed-1 initialisation: init_from reads it as it reads a run, and costs no training)."""
  config = shrink(load_config('coca'))
  model = build_model(config)
  arrays = jax.jit(lambda: nn.unbox(init_params(model, config, jax.random.key(1))))()
  return export.save(str(tmp_path_factory.mktemp('source')), config, arrays), arrays


@pytest.fixture(scope='module')
def classifier(source, tmp_path_factory):
  """(config, run directory, results) of a classification fine-tune through vlrep.train."""
  config = _finetune('classification')
  config.init_from = source[0]
  run = str(tmp_path_factory.mktemp('classify'))
  return config, run, train.train_and_evaluate(config, run)


def test_classification_fine_tune_from_init_from(source, classifier):
  config, run, results = classifier
  assert set(results) == {'classification_shape/top1'}  # 4 shapes: no top5
  assert json.load(open(os.path.join(run, 'results.json'))) == results
  tuned = export.named_arrays(vlrep.load(run).params)
  # Started from the source (the frozen text side is its arrays bit for bit), the image
  # tower trained, and a head of its own the source never had.
  start = export.named_arrays(source[1])
  for name, value in start.items():
    if name.startswith(('text_decoder/', 'text_projection/')):
      np.testing.assert_array_equal(tuned[name], value, err_msg=name)
  assert not np.array_equal(tuned['image_encoder/pos_embed'], start['image_encoder/pos_embed'])
  assert tuned['classifier/head/kernel'].shape == (config.model.embed_dim, 4)
  assert not any(name.startswith('classifier/') for name in start)
  records = [json.loads(line) for line in open(os.path.join(run, 'metrics.jsonl'))]
  train_record = next(r for r in records if 'train/classification_loss' in r)
  assert 0 <= train_record['train/accuracy'] <= 1


def test_classification_loss_and_top1_against_numpy(classifier):
  config, run, results = classifier
  loaded = vlrep.load(run)
  # The evaluation's chunk size, so that classify reuses the run's compiled function.
  model = Pretrained(loaded.config, loaded.params, batch_size=config.eval_batch_size)
  # The loss of one training batch, with its pipeline label (the shapes, multi-hot).
  batch = next(iter(pipeline.train_dataset(config, 0, 1)))
  assert batch['label'].shape == (config.batch_size, len(synthetic.SHAPES))
  assert batch['label'].any(axis=1).all()
  loss_config = step.LossConfig.from_config(config.loss)
  loss, metrics = jax.jit(lambda p, b: step.compute_losses(model.model, p, b, loss_config))(
      model.params, batch)
  logits = model.classify(batch['images']).astype(np.float64)
  log_softmax = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1,
                                keepdims=True)) - logits.max(1, keepdims=True)
  targets = batch['label'] / batch['label'].sum(1, keepdims=True)
  np.testing.assert_allclose(float(loss), -np.mean(np.sum(targets * log_softmax, 1)),
                             rtol=1e-5)
  assert abs(logits).max() > 0  # the zero-initialised head has moved
  best = np.argmax(logits, 1)
  np.testing.assert_allclose(float(metrics['accuracy']),
                             np.mean(batch['label'][np.arange(len(best)), best]), atol=1e-6)

  # The evaluation's top-1: numpy argmax of Pretrained.classify on the held-out examples.
  held_out = pipeline.eval_examples(config, label_key='labels/shape')
  best = np.argmax(model.classify(held_out['images']), 1)
  assert results['classification_shape/top1'] == pytest.approx(
      np.mean(held_out['label'][np.arange(len(best)), best]))


def test_classification_step_and_eval_equal_on_1_and_8_devices(classifier):
  config, run, results = classifier
  tuned = vlrep.load(run).params  # a head that has moved, so every parameter gets a gradient
  batch = next(iter(pipeline.train_dataset(config, 0, 1)))
  out = {}
  for devices in (jax.devices()[:1], jax.devices()):
    # The loop's own jitted step (on 8 devices, the run's compiled program again).
    setup = train.setup_step(config, devices)
    mesh = setup.mesh
    # The state's layout from the loop's abstract state, holding the tuned parameters and a
    # fresh optimizer state (no init program to compile).
    shardings = setup.state_shardings
    params = jax.device_put(jax.device_get(tuned), shardings.params)
    state = setup.abstract_state.replace(
        step=jax.device_put(np.int32(0), shardings.step), params=params,
        opt_state=jax.device_put(setup.tx.init(params), shardings.opt_state))
    placed = {k: jax.device_put(v, setup.batch_sharding) for k, v in batch.items()}
    new, metrics = setup.train_step(state, placed)
    evaluated = Evaluator(config)(Pretrained(config, new.params, config.eval_batch_size, mesh))
    out[len(devices)] = jax.device_get((new.params, metrics)), evaluated
  (params_1, metrics_1), eval_1 = out[1]
  (params_8, metrics_8), eval_8 = out[8]
  np.testing.assert_allclose(metrics_8['train/loss'], metrics_1['train/loss'], rtol=1e-5)
  assert_same_params(params_8, params_1, atol=1e-6)
  assert eval_8 == eval_1 and set(eval_1) == set(results)


def test_classification_config_errors_name_the_field(config):
  config.loss.kind = 'classify'
  with pytest.raises(ValueError, match="loss.kind='classify'"):
    train.validate(config)
  config.loss.kind = 'classification'
  config.model.num_classes = 4
  with pytest.raises(ValueError, match='needs data.label_key'):
    train.validate(config)
  config.data.label_key = 'labels/texture'
  with pytest.raises(ValueError, match=r"data.label_key='labels/texture' is not a field"):
    train.validate(config)
  config.data.label_key, config.model.num_classes = 'labels/colour', 4
  with pytest.raises(ValueError, match='multi-hot over 6 classes, but model.num_classes=4'):
    train.validate(config)
  # A pretraining config has no head to evaluate, and no head in its parameters.
  pretrain = shrink(load_config('coca'))
  with pretrain.unlocked():
    pretrain.evals.head = entries.entry('classification', label_key='labels/shape')
  with pytest.raises(ValueError, match=r'evals.head: a classification evaluation reads the'):
    train.validate(pretrain)
  pretrain.model.num_classes = 4  # read only by loss.kind='classification'
  assert 'classifier' not in jax.eval_shape(
      lambda: init_params(build_model(pretrain), pretrain, jax.random.key(0)))
  # The head with an attentional pooler of its own (shapes only: nothing compiles).
  config.data.label_key, config.model.classifier_pool = 'labels/shape', 'attn'
  model = build_model(config)
  params = jax.eval_shape(lambda: nn.unbox(init_params(model, config, jax.random.key(0))))
  assert set(params['classifier']) == {'pooler', 'head'}
  logits = jax.eval_shape(lambda p, x: model.apply({'params': p}, x, method=type(model).classify),
                          params, jax.ShapeDtypeStruct((3, 16, 16, 3), np.uint8))
  assert logits.shape == (3, 4) and logits.dtype == np.float32
  config.model.classifier_pool = 'mean'
  with pytest.raises(ValueError, match="model.classifier_pool='mean'"):
    build_model(config)


def test_unknown_fine_tuning_is_named():
  with pytest.raises(ValueError, match="Unknown fine-tuning 'detect'"):
    load_config('finetune', 'detect')
  assert load_config('finetune', 'caption@base').model.vision.width == 768


def test_distinct_captions_fraction():
  assert captioning.distinct_fraction({0: 'a red circle', 1: 'A red circle.', 2: 'a square',
                                       3: 'a red  circle'}) == 0.5
  assert captioning.distinct_fraction({i: 'two shapes' for i in range(8)}) == 1 / 8
  assert captioning.distinct_fraction({'x': 'a', 'y': 'b'}) == 1.0
  with pytest.raises(ValueError, match='no predictions'):
    captioning.distinct_fraction({})


def test_caption_fine_tune_from_init_from(source, tmp_path):
  """Caption loss alone (contrastive weight 0), the contrastive-only parameters frozen at the
  source's; evaluated by CIDEr and the fraction of distinct greedy captions."""
  config = _finetune('caption')
  assert config.loss.contrastive_weight == 0 and config.loss.kind == 'pretrain'
  config.init_from = source[0]
  results = train.train_and_evaluate(config, str(tmp_path))
  assert set(results) == {f'captioning/{m}_greedy'
                          for m in ('cider', 'bleu4', 'exact_match', 'distinct_captions')}
  loaded = vlrep.load(str(tmp_path))
  model = Pretrained(loaded.config, loaded.params, batch_size=config.eval_batch_size)
  captions = model.caption(pipeline.eval_examples(config)['images'])
  assert results['captioning/distinct_captions_greedy'] == pytest.approx(
      len({captioning.normalize_caption(c) for c in captions}) / len(captions))
  tuned, start = export.named_arrays(model.params), export.named_arrays(source[1])
  for name in ('logit_scale', 'text_projection/kernel', 'contrastive_pooler/queries'):
    np.testing.assert_array_equal(tuned[name], start[name], err_msg=name)
  assert not np.array_equal(tuned['text_decoder/output_head/kernel'],
                            start['text_decoder/output_head/kernel'])


def test_classification_cross_entropy_of_integer_labels():
  logits = np.array([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]], np.float32)
  labels = np.array([1, 2], np.int32)
  want = -np.mean([logits[i, l] - np.log(np.exp(logits[i]).sum()) for i, l in enumerate(labels)])
  np.testing.assert_allclose(float(classification.cross_entropy(logits, labels)), want,
                             rtol=1e-6)
  np.testing.assert_array_equal(classification.top1_hits(logits, labels), [0.0, 1.0])
