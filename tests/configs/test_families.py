"""Model families that are CoCa with parts switched by config, each trained a few steps by the
one loop and checked for the property that defines it."""

import functools
import json
import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

import vlrep
from conftest import load_config, shrink
from vlrep import optim, step, train
from vlrep.data import pipeline, synthetic
from vlrep.variants import LIT_IMAGE_SIDE
from vlrep.evals import entries, retrieval, zeroshot
from vlrep.evals.suite import Evaluator
from vlrep.models.build import build_model, init_params
from vlrep.models.coca import CoCa
from vlrep.parallel import sharding
from vlrep.pretrained import Pretrained
from vlrep.weights import export


def _init(config, seed):
  model = build_model(config)
  return jax.jit(lambda: nn.unbox(init_params(model, config, jax.random.key(seed))))()


def _bytes(tree):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_lit_trains_the_text_side_against_the_locked_image_side_of_a_clip_run(tmp_path):
  """configs/lit.py: the image tower, its pooler and projection are the CLIP source's bit for
  bit after training at a non-zero learning rate, and hold no optimizer state; the text
  side's matrices (each decayed, at least) and the temperature moved from their fresh
  initialisation."""
  clip = shrink(load_config('clip'))
  source = export.named_arrays(_init(clip, seed=1))
  exported = export.save(str(tmp_path / 'clip'), clip, source)

  config = shrink(load_config('lit'))
  with pytest.raises(ValueError, match='needs init_from'):
    train.validate(config)  # LiT without the weights to lock
  config.update(init_from=exported, total_steps=2, eval_every_steps=0)
  config.optim.warmup_steps = 0  # both updates at a non-zero learning rate
  run = str(tmp_path / 'lit')
  train.train_and_evaluate(config, run)

  got = export.named_arrays(vlrep.load(run).params)
  fresh = export.named_arrays(_init(config, seed=config.seed))
  assert set(got) == set(source)
  image_side = [n for n in got if n.split('/')[0] in
                ('image_encoder', 'contrastive_pooler', 'image_projection')]
  assert len(image_side) > 10
  for name in got:
    if name in image_side:
      np.testing.assert_array_equal(got[name], source[name], err_msg=name)
    elif name.endswith(('kernel', 'embedding', 'logit_scale')):
      assert not np.array_equal(got[name], fresh[name]), name

  # AdamW's two float32 moments for each trainable element, none for the locked ones.
  params = jax.eval_shape(lambda: _init(config, 0))
  tx, _ = optim.make_optimizer(config.optim, config.total_steps)
  clip_tx, _ = optim.make_optimizer(clip.optim, config.total_steps)
  locked = sum(source[n].size for n in image_side) * 4
  assert (_bytes(jax.eval_shape(clip_tx.init, params)) - _bytes(jax.eval_shape(tx.init, params))
          == 2 * locked)
  assert config.optim.freeze == config.init_from_include == LIT_IMAGE_SIDE


def _logged(run):
  with open(os.path.join(run, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.mark.parametrize('name', ['cappa'])
def test_captioners_train_on_the_caption_loss_alone_and_evaluate_by_captioning(tmp_path, name):
  """configs/cappa.py (the paper's all-multimodal decoder): a few steps at a non-zero learning
  rate with a finite loss that is the caption loss, no contrastive parameter in the run, and
  the evaluations a captioner can run (captioning, probe), nothing else. CapPa's [MASK]
  embedding, which only the parallel rows read, moved: they trained. (configs/cap.py is this
  config with parallel_fraction 0: tests/models/test_cappa.py checks its parameters and loss.)"""
  config = shrink(load_config(name))
  config.model.text.update(unimodal_layers=0, multimodal_layers=2)
  config.update(total_steps=3, eval_every_steps=3)
  config.optim.warmup_steps = 0
  run = str(tmp_path / name)
  results = train.train_and_evaluate(config, run)

  assert {k.split('/')[0] for k in results} == {'captioning', 'linear_probe_shape'}
  assert all(np.isfinite(v) for v in results.values()), results
  logged = [m for m in _logged(run) if 'train/loss' in m]
  assert logged and all(np.isfinite(m['train/loss']) and m['train/contrastive_loss'] == 0
                        and m['train/loss'] == m['train/caption_loss'] for m in logged)
  got = export.named_arrays(vlrep.load(run).params)
  assert not [n for n in got if n.split('/')[0] in ('contrastive_pooler', 'image_projection',
                                                    'text_projection', 'logit_scale')]
  assert not [n for n in got if n.startswith(('text_decoder/unimodal',
                                              'text_decoder/cls_embed'))]
  fresh = export.named_arrays(_init(config, seed=config.seed))
  assert ('text_decoder/mask_embed' in got) == (name == 'cappa')
  if name == 'cappa':
    assert not np.array_equal(got['text_decoder/mask_embed'], fresh['text_decoder/mask_embed'])


def test_a_captioner_refuses_what_needs_a_text_embedding():
  config = shrink(load_config('cappa'))
  config.loss.contrastive_weight = 1.0
  with pytest.raises(ValueError, match='no embeddings to contrast'):
    train.validate(config)
  config = shrink(load_config('cap'))
  with config.unlocked():
    config.evals.retrieval = entries.entry('retrieval')
  with pytest.raises(ValueError, match='evals.retrieval: .*captioning-only'):
    train.validate(config)
  config = shrink(load_config('coca'))
  config.loss.parallel_fraction = 0.75
  with pytest.raises(ValueError, match='needs model.contrastive=False'):
    build_model(config)


def _token_scores_by_hand(model, images, tokens):
  """FILIP's s^I and s^T [images, texts] from the model's own token embeddings, in numpy."""
  apply = lambda method, x: jax.jit(functools.partial(model.model.apply, method=method))(
      {'params': model.params}, x)
  image_tokens = np.asarray(apply(CoCa.encode_image_tokens, images), np.float64)
  text_tokens, mask = (np.asarray(x) for x in apply(CoCa.encode_text_tokens, tokens))
  sim = np.einsum('ike,jre->ijkr', image_tokens, text_tokens.astype(np.float64))
  sim = np.where(mask[None, :, None, :], sim, -np.inf)
  per_token = np.where(mask[None], sim.max(axis=2), 0.0).sum(2) / mask.sum(1)[None]
  return sim.max(axis=3).mean(axis=2), per_token


def test_filip_trains_token_wise_and_its_evaluators_rank_by_token_similarity(tmp_path):
  """configs/filip.py: a few steps with a finite loss, the step's loss being FILIP's token-wise
  one by hand; the run's zero-shot and retrieval numbers are those of FILIP's token-wise
  similarities computed by hand from the trained model's patch and token embeddings (which
  rank otherwise than its vectors' cosine similarity), on 1 device and on 8 alike."""
  config = shrink(load_config('filip'))
  config.update(total_steps=2, eval_every_steps=2)
  config.optim.warmup_steps = 0
  with config.unlocked():
    config.evals = ml_collections.ConfigDict({name: config.evals[name] for name in
                                              ('zeroshot_colour', 'retrieval')})
  run = str(tmp_path / 'filip')
  results = train.train_and_evaluate(config, run)
  logged = [m for m in _logged(run) if 'train/loss' in m]
  assert logged and all(np.isfinite(m['train/contrastive_loss']) and
                        m['train/loss'] == m['train/contrastive_loss'] for m in logged)
  model = vlrep.load(run)
  clip = set(export.named_arrays(jax.eval_shape(lambda: _init(shrink(load_config('clip')), 0))))
  assert set(export.named_arrays(model.params)) == {
      n for n in clip if not n.startswith('contrastive_pooler/')}  # CLIP's, less the pooler

  # The loss the step trains on is FILIP's of the model's token embeddings, by hand.
  batch = next(iter(pipeline.train_dataset(config, 0, 1)))
  loss_config = step.LossConfig.from_config(config.loss)
  _, metrics = jax.jit(step.compute_losses, static_argnums=(0, 3))(
      model.model, model.params, batch, loss_config)
  s_i2t, s_t2i = (scale * s for s, scale in zip(
      _token_scores_by_hand(model, batch['images'], batch['tokens']),
      [np.exp(float(model.params['logit_scale']))] * 2))
  xent = lambda logits: np.mean(np.log(np.exp(logits).sum(1)) - np.diag(logits))
  assert float(metrics['contrastive_loss']) == pytest.approx(
      (xent(s_i2t) + xent(s_t2i.T)) / 2, rel=1e-5)

  examples = pipeline.eval_examples(config, label_key='labels/colour')
  images = examples['images']
  names, templates = synthetic.ZERO_SHOT_TASKS['colour']
  prompts = [t.format(name) for name in names for t in templates]
  texts = [text for refs in examples['references'] for text in refs]
  s_i2t, _ = _token_scores_by_hand(model, images, model.tokenize(prompts))
  classes = s_i2t.reshape(len(images), len(names), -1).mean(-1)
  r_i2t, r_t2i = _token_scores_by_hand(model, images, model.tokenize(texts))
  ids = np.repeat(np.arange(len(images)), [len(refs) for refs in examples['references']])
  correct = retrieval.correct_pairs(ids, len(images), texts, identical_text_is_hit=True)
  want = {'zeroshot_colour/top1': zeroshot.topk_hits(classes, examples['label'], 1),
          'zeroshot_colour/top5': zeroshot.topk_hits(classes, examples['label'], 5),
          **{f'retrieval/{k}': v for k, v in
             retrieval.recall_from_scores(r_i2t, r_t2i.T, correct).items()}}
  assert results == pytest.approx(want, abs=1e-9)
  one_device = sharding.make_mesh(sharding.DATA_PARALLEL, jax.devices()[:1])
  on_one = Pretrained(config, jax.device_put(model.params, jax.devices()[0]), batch_size=8,
                      mesh=one_device)
  assert Evaluator(config)(on_one) == results
  got_i2t, got_t2i = on_one.token_similarity_scores(images, texts)
  np.testing.assert_allclose(got_i2t, r_i2t, atol=1e-5)
  np.testing.assert_allclose(got_t2i, r_t2i, atol=1e-5)
  # The Python API searches by the same scores, each direction its own.
  assert (on_one.retrieve(images, texts, k=3)[0] == retrieval.rank_scores(got_i2t, 3)[0]).all()
  assert (on_one.retrieve(texts[:4], images, k=3)[0] ==
          retrieval.rank_scores(got_t2i.T[:4], 3)[0]).all()
  with pytest.raises(ValueError, match='compares images with texts only'):
    on_one.retrieve(texts, texts)
  with pytest.raises(ValueError, match='zero_shot_scores'):
    on_one.zero_shot_classifier(names)
  # The similarity the run trained is not its vectors' cosine: the rankings differ.
  cosine = model.encode_image(images) @ model.encode_text(texts).T
  assert (np.argsort(-cosine, 1)[:, :5] != np.argsort(-r_i2t, 1)[:, :5]).any()
  with pytest.raises(ValueError, match="needs model.pooler='none'"):
    config.model.update(pooler='parallel', image_pool='attn')
    build_model(config)
