"""Checkpoints: an unfinished save is never restored; a mismatched config names the array."""

import os
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from vlrep import step
from vlrep.data import pipeline
from vlrep.models.build import build_model
from vlrep.optim import make_optimizer
from vlrep.parallel import sharding
from vlrep.runtime import checkpoint
from vlrep.weights import export


def _state(config):
  model = build_model(config)
  tx, schedule = make_optimizer(config.optim, config.total_steps)
  mesh = sharding.make_mesh(config.mesh)
  return step.create_train_state(model, tx, schedule, config, mesh, jax.random.key(0))


def test_check_shapes_names_the_array_and_both_shapes():
  expected = {'params': {'dense': {'kernel': np.zeros((4, 8)), 'bias': np.zeros(8)}}}
  export.check_shapes(expected, expected, 'the checkpoint')
  found = {'params': {'dense': {'kernel': np.zeros((4, 16)), 'bias': np.zeros(8)},
                      'extra': np.zeros(2)}}
  with pytest.raises(ValueError) as error:
    export.check_shapes(expected, found, 'the checkpoint')
  message = str(error.value)
  assert 'params/dense/kernel: (4, 16) in the checkpoint, (4, 8) in the config' in message
  assert 'params/extra: in the checkpoint (2,) but not in the config' in message
  assert 'bias' not in message


def test_unfinished_save_is_ignored_and_mismatched_config_names_the_array(config, tmp_path):
  workdir = str(tmp_path)
  state, shardings = _state(config)
  data = iter(pipeline.train_dataset(config, 0, 1))
  saver = checkpoint.Checkpointer(workdir, keep=3)
  saver.save(2, state, data)
  saver.wait()
  saver.close()
  # What a process killed while writing step 4 leaves: orbax's temporary directory.
  root = checkpoint.checkpoint_dir(workdir)
  unfinished = os.path.join(root, '4.orbax-checkpoint-tmp-1700000000')
  shutil.copytree(os.path.join(root, '2'), unfinished)
  resumed = checkpoint.Checkpointer(workdir, keep=3)
  assert resumed.latest_step() == 2
  restored = resumed.restore(2, state, shardings, data)
  jax.tree.map(np.testing.assert_array_equal, restored.params, state.params)
  resumed.wait()
  assert sorted(os.listdir(root)) == ['2']  # the unfinished save was cleaned up

  # The same checkpoint into a wider model: both restore paths name the array and the shapes.
  config.model.text.mlp_dim = 96
  wider = jax.eval_shape(lambda: _state(config)[0])  # shapes are all the check needs
  wider_shardings = jax.tree.map(lambda _: NamedSharding(state.mesh, P()), wider)
  expected = r'{}: \(32, 64\) in the checkpoint, \(32, 96\) in the config'
  kernel = 'params/text_decoder/unimodal_0/mlp/fc1/kernel'
  with pytest.raises(ValueError, match=expected.format(kernel)):
    resumed.restore(2, wider, wider_shardings, data)
  with pytest.raises(ValueError, match=expected.format('opt_state/.*/mlp/fc1/kernel')):
    resumed.restore(2, state.replace(opt_state=wider.opt_state), shardings, data)
  resumed.close()
  with pytest.raises(ValueError, match=expected.format(kernel)):
    checkpoint.restore_params(workdir, config)
