"""`vlrep.config.migrate`: a saved config.json of every earlier layout becomes a current config.

`tests/data/saved_configs/tiny_<commit>.json` is `configs/coca.py:tiny` as the commit that
last changed the layout wrote it (`get_config('tiny').to_json()` in a checkout of that
commit), one per layout since the first; `base_<commit>.json` is the first layout's `base`.
A migrated config must build the model, and the fields its layout lacked must take the
values that reproduce how such a run behaved.
"""

import glob
import json
import os

import jax
import ml_collections
import pytest

from vlrep import config as vlrep_config
from vlrep import variants
from vlrep.evals import entries
from vlrep.models.build import build_model, init_params

SAVED = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'saved_configs')
FILES = sorted(glob.glob(os.path.join(SAVED, '*.json')))
FIRST = 'tiny_67fa492.json'  # the first layout (the foundation commit)


def _saved(name: str) -> dict:
  with open(os.path.join(SAVED, name)) as f:
    return json.load(f)


def test_every_earlier_layout_is_stored():
  assert len(FILES) >= 13 and os.path.join(SAVED, FIRST) in FILES


@pytest.mark.parametrize('path', FILES, ids=os.path.basename)
def test_saved_config_migrates_and_builds_the_model(path):
  with open(path) as f:
    saved = json.load(f)
  config = vlrep_config.migrate(saved)
  assert config.is_locked
  # What the saved config states is kept.
  assert config.batch_size == saved['batch_size']
  assert config.model.vision.width == saved['model']['vision']['width']
  for name, entry in config.evals.items():
    entries.check(name, entry)
  model = build_model(config)
  if os.path.basename(path).startswith('tiny'):
    params = jax.eval_shape(lambda: init_params(model, config, jax.random.key(0)))
    assert 'image_encoder' in params and 'text_decoder' in params


def test_absent_fields_take_the_old_behaviour():
  saved = _saved(FIRST)
  assert 'caption_chunk' not in saved['loss'] and 'evals' not in saved
  config = vlrep_config.migrate(saved)
  assert config.loss.caption_chunk == 0  # the plain caption loss (today's default: 8)
  assert config.model.vision.stem_channels == ()  # no conv stem then (tiny's today: 3 convs)
  assert config.evals.to_dict() == entries.legacy_evals(config).to_dict()
  assert config.optim.factor_min_dim == 128
  assert config.optim.ema_decay == 0.0  # no EMA before optim.ema_decay
  assert (config.nan_policy, config.nan_max_consecutive) == ('skip', 5)
  assert config.profile_steps == '' and config.init_from == ''
  assert config.microbatches == 1 and config.loss.contrastive_impl == 'gather'
  assert config.data.augment == 'resize' and config.data.workers == 0
  assert config.total_steps == saved['total_steps'] == 1500  # stated: kept
  base = vlrep_config.migrate(_saved('base_67fa492.json'))
  assert base.model.dtype == 'float32'  # before model.dtype (today's base: bfloat16)
  assert base.evals.to_dict() == entries.legacy_evals(base).to_dict()


def test_tower_ln_eps_absent_follows_the_saved_model_ln_eps():
  saved = json.loads(vlrep_config.defaults().to_json())
  saved['model']['ln_eps'] = 1e-5
  del saved['model']['vision']['ln_eps'], saved['model']['text']['ln_eps']
  config = vlrep_config.migrate(saved)
  assert config.model.vision.ln_eps == config.model.text.ln_eps == 1e-5


@pytest.mark.parametrize('make', [variants.coca, variants.clip, variants.siglip])
@pytest.mark.parametrize('variant', ['tiny', 'base', 'base@tiny'])
def test_current_config_round_trips(make, variant):
  config = make(variant)
  migrated = vlrep_config.migrate(json.loads(config.to_json()))
  assert migrated.to_dict() == config.to_dict()
  assert isinstance(migrated.evals, ml_collections.ConfigDict) and migrated.evals.is_locked


def test_unknown_field_is_named():
  saved = json.loads(vlrep_config.defaults().to_json())
  saved['model']['vision']['widht'] = 3
  with pytest.raises(ValueError, match=r"'model\.vision\.widht'"):
    vlrep_config.migrate(saved)
