"""The paper recipes learn: each family's base recipe (Adafactor, its schedule shape, weight
decay, loss weights, bfloat16) on the tiny demo's model and data (`configs/*.py:base@tiny`),
cut to 24 steps of batch 32 without evaluation; CLIP's recipe is CoCa's without captions
(compared field by field). The README's recipe table has the full-length (720-step) runs and
their evaluations."""

import json
import os

import jax
import numpy as np
import pytest

from conftest import load_config
from vlrep import train

RECIPE_FIELDS = ('optim', 'loss', 'model.dtype', 'model.param_dtype')


def _field(config, name):
  for part in name.split('.'):
    config = config[part]
  return config.to_dict() if hasattr(config, 'to_dict') else config


def test_clip_recipe_is_cocas_without_the_caption_loss():
  """So that CoCa's run below covers CLIP's recipe (it trains the same contrastive part)."""
  coca, clip = load_config('coca', 'base@tiny'), load_config('clip', 'base@tiny')
  for name in RECIPE_FIELDS:
    if name != 'loss':
      assert _field(clip, name) == _field(coca, name), name
  assert clip.loss.caption_weight == 0 and clip.model.text.multimodal_layers == 0
  assert clip.loss.contrastive_weight == coca.loss.contrastive_weight


@pytest.mark.parametrize('family', ['coca', 'siglip'])
def test_paper_recipe_learns_the_synthetic_set(family, tmp_path):
  base = load_config(family, 'base')
  for size in ('large', 'giant'):  # one recipe for the three sizes: base@tiny tests all
    other = load_config(family, size)
    for name in RECIPE_FIELDS:
      assert _field(other, name) == _field(base, name), (size, name)
  config = load_config(family, 'base@tiny')
  assert config.optim.name == 'adafactor' and config.model.dtype == 'bfloat16'
  assert config.optim.warmup_steps == round(0.02 * config.total_steps)
  config.update(batch_size=32, total_steps=24, log_every_steps=4, checkpoint_every_steps=24,
                eval_every_steps=0)
  config.optim.warmup_steps = round(0.02 * config.total_steps)
  # One device: the recipe, not the mesh, is under test, and on 2 CPU cores one device runs
  # these steps faster than 8 simulated ones.
  train.train_and_evaluate(config, str(tmp_path), jax.devices()[:1])
  records = [json.loads(line) for line in open(os.path.join(tmp_path, 'metrics.jsonl'))]
  # SigLIP's loss falls slowest: its learned bias starts at -10 and, like the temperature,
  # moves by about the learning rate per step (at these settings the mean of steps 4-8 to
  # that of steps 20-24: 4.62 -> 4.45). CoCa's contrastive part falls by less than a tenth
  # (3.46 -> 3.25) while its total falls by 0.7x: the parts' bound is a fall, the total's a
  # fraction.
  fraction = 0.99 if family == 'siglip' else 0.9
  for part, bound in (('loss', fraction), ('contrastive_loss', 1.0 if family == 'coca' else
                                           fraction)):
    values = [r[f'train/{part}'] for r in records if f'train/{part}' in r]
    first, last = np.mean(values[:2]), np.mean(values[-2:])  # steps 4-8 and 20-24
    assert last < bound * first, (family, part, values)
