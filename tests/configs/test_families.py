"""Model families that are CoCa with parts switched by config, each trained a few steps by the
one loop and checked for the property that defines it."""

import flax.linen as nn
import jax
import numpy as np
import pytest

import vlrep
from conftest import load_config, shrink
from vlrep import optim, train
from vlrep.config import LIT_IMAGE_SIDE
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
