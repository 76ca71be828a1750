"""config.init_from: a new run starts from an export's or a run's parameters exactly."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

import vlrep
from vlrep import train
from vlrep.models.coca import build_model
from vlrep.parallel import sharding
from vlrep.pretrained import Pretrained
from vlrep.step import init_params
from vlrep.weights import export, init_from

from conftest import load_config


def test_fine_tune_from_export_then_from_run(config, tmp_path):
  config.total_steps = 1
  config.eval_every_steps = 0
  # The weights to start from: another initialisation (seed 1), exported.
  model = build_model(config)
  weights = jax.jit(lambda: nn.unbox(init_params(model, config, jax.random.key(1))))()
  exported = Pretrained(config, weights).save(str(tmp_path / 'export'))
  # configs/saved.py:DIR gives a new run the exported model's config.
  assert json.loads(load_config('saved', exported).to_json()) == json.loads(config.to_json())

  # A run started from it: with learning rate 0 its parameters stay exactly the exported
  # ones, so they are what it started from (not its own seed-0 initialisation); the loop
  # still runs end to end (metrics, checkpoint).
  config.init_from = exported
  config.optim.learning_rate = 0.0
  run = str(tmp_path / 'run')
  train.train_and_evaluate(config, run)
  tuned = vlrep.load(run)
  jax.tree.map(np.testing.assert_array_equal, tuned.params, weights)
  records = [json.loads(line) for line in open(os.path.join(run, 'metrics.jsonl'))]
  assert [r['step'] for r in records if 'train/loss' in r] == [1]
  assert np.isfinite(records[-1]['train/loss'])

  # Running it again resumes from its own checkpoint: init_from is not read (it would fail).
  config.init_from = str(tmp_path / 'missing')
  train.train_and_evaluate(config, run)
  assert sorted(os.listdir(os.path.join(run, 'checkpoints'))) == ['1']

  # A run directory as the source: its latest checkpoint's parameters.
  like = export.abstract_params(config, sharding.make_mesh(sharding.DATA_PARALLEL))
  jax.tree.map(np.testing.assert_array_equal, init_from.load_params(run, like), weights)

  # A model of another shape: one error names the array and both shapes (train.py calls
  # load_params with the new run's initial parameters, as here).
  other = config.copy_and_resolve_references()
  other.model.embed_dim = 8
  other_like = export.abstract_params(other, sharding.make_mesh(sharding.DATA_PARALLEL))
  with pytest.raises(ValueError, match=r'text_projection/kernel: \(32, 16\) in init_from=.*, '
                                       r'\(32, 8\) in the config'):
    init_from.load_params(exported, other_like)
  with pytest.raises(FileNotFoundError, match='neither a vlrep run directory nor'):
    init_from.load_params(str(tmp_path / 'missing'), like)
  with pytest.raises(ValueError, match='open_clip:STATE_DICT_PATH:MODEL_CFG_JSON'):
    init_from.load_params('open_clip:weights.pt', like)
