"""config.init_from: a new run starts from another run's or an export's parameters exactly."""

import json
import os

import jax
import numpy as np
import pytest

import vlrep
from vlrep import export, init_from, sharding, train


def test_run_exported_and_fine_tuned_from(config, tmp_path):
  config.total_steps = 1
  config.eval_every_steps = 0
  run_a = str(tmp_path / 'a')
  train.train_and_evaluate(config, run_a)
  a = vlrep.load(run_a)
  exported = a.save(str(tmp_path / 'a_export'))

  # From the exported directory: exactly A's parameters, in the new run's own shardings.
  like = export.abstract_params(config, sharding.make_mesh(sharding.DATA_PARALLEL))
  jax.tree.map(np.testing.assert_array_equal, init_from.load_params(exported, like), a.params)

  # A run started from A's run directory: with learning rate 0 its parameters stay exactly
  # A's, so they are what it started from; the loop still trains (metrics, checkpoints).
  b_config = config.copy_and_resolve_references()
  b_config.init_from = run_a
  b_config.optim.learning_rate = 0.0
  run_b = str(tmp_path / 'b')
  train.train_and_evaluate(b_config, run_b)
  jax.tree.map(np.testing.assert_array_equal, vlrep.load(run_b).params, a.params)
  records = [json.loads(line) for line in open(os.path.join(run_b, 'metrics.jsonl'))]
  assert [r['step'] for r in records if 'train/loss' in r] == [1]
  assert np.isfinite(records[-1]['train/loss'])

  # Running B again resumes from B's own checkpoint: init_from is not read (it would fail).
  b_config.init_from = str(tmp_path / 'missing')
  train.train_and_evaluate(b_config, run_b)
  assert sorted(os.listdir(os.path.join(run_b, 'checkpoints'))) == ['1']

  # A model of another shape: one error names the array and both shapes (train.py calls
  # load_params with the new run's initial parameters, as here).
  c_config = config.copy_and_resolve_references()
  c_config.model.embed_dim = 8
  c_like = export.abstract_params(c_config, sharding.make_mesh(sharding.DATA_PARALLEL))
  with pytest.raises(ValueError, match=r'text_projection/kernel: init_from=.* has shape '
                                       r'\(32, 16\), the model wants \(32, 8\)'):
    init_from.load_params(exported, c_like)
  with pytest.raises(FileNotFoundError, match='neither a vlrep run directory nor'):
    init_from.load_params(str(tmp_path / 'missing'), like)
  with pytest.raises(ValueError, match='open_clip:STATE_DICT_PATH:MODEL_CFG_JSON'):
    init_from.load_params('open_clip:weights.pt', like)
