"""Model families that are CoCa with parts switched by config, each trained a few steps by the
one loop and checked for the property that defines it."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

import vlrep
from conftest import load_config, shrink
from vlrep import optim, train
from vlrep.variants import LIT_IMAGE_SIDE
from vlrep.evals import entries
from vlrep.models.coca import build_model
from vlrep.step import init_params
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


@pytest.mark.parametrize('name', ['cap', 'cappa'])
def test_captioners_train_on_the_caption_loss_alone_and_evaluate_by_captioning(tmp_path, name):
  """configs/cap.py and configs/cappa.py (the paper's all-multimodal decoder): a few steps at a
  non-zero learning rate with a finite loss that is the caption loss, no contrastive parameter
  in the run, and the evaluations a captioner can run (captioning, probe), nothing else.
  CapPa's [MASK] embedding, which only the parallel rows read, moved: they trained."""
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
