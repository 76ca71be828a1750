"""EMA of the parameters (`optim.ema_decay`): the update, its shardings, checkpoints, resume,
and the evaluators and `vlrep.load` reading it in place of the raw parameters."""

import os

import jax
import numpy as np
import pytest

import vlrep
from conftest import load_config, shrink
from vlrep import step, train
from vlrep.data import pipeline
from vlrep.evals import evaluate
from vlrep.models.build import build_model
from vlrep.optim import make_optimizer
from vlrep.parallel import sharding
from vlrep.runtime import checkpoint


class _Recorder:
  """Stands in for the evaluator: keeps the parameters of each model it is given."""
  seen: list = []

  def __init__(self, config):
    del config

  def __call__(self, pretrained):
    _Recorder.seen.append(jax.device_get(pretrained.params))
    return {'recorded/count': float(len(_Recorder.seen))}


def _assert_equal(got, want):
  jax.tree.map(np.testing.assert_array_equal, got, want)


def _max_difference(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _ema_config(decay=0.9):
  config = shrink(load_config('coca'))
  config.optim.ema_decay = decay
  return config


def _train(config, workdir):
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(train, 'Evaluator', _Recorder)
    _Recorder.seen.clear()
    train.train_and_evaluate(config, workdir)
    return list(_Recorder.seen)


@pytest.fixture(scope='module')
def ema_run(tmp_path_factory):
  """The shrunk tiny CoCa trained 4 steps with an EMA (checkpoints at 2 and 4), its final
  evaluation recorded."""
  config = _ema_config()
  workdir = str(tmp_path_factory.mktemp('ema_run'))
  seen = _train(config, workdir)
  return config, workdir, seen


def test_ema_is_the_bias_corrected_average_of_the_iterates_sharded_as_them(config):
  """On a data=2 x fsdp=4 mesh: the EMA has the parameters' shardings, and after t steps it
  equals sum_k d^(t-k) p_k / sum_k d^(t-k) over the parameters p_k after each step, leaf by
  leaf; a skipped (non-finite) step leaves it as it was."""
  decay = 0.8
  config.optim.update(learning_rate=1e-2, warmup_steps=0, ema_decay=decay)
  config.total_steps = 100
  config.mesh.update(data=2, fsdp=4)
  setup = train.setup_step(config)
  shardings = setup.state_shardings
  assert jax.tree.structure(shardings.ema_params) == jax.tree.structure(shardings.params)
  assert jax.tree.leaves(shardings.ema_params) == jax.tree.leaves(shardings.params)
  assert any('fsdp' in s.spec for s in jax.tree.leaves(shardings.ema_params))
  state, _ = step.create_train_state(setup.model, setup.tx, setup.learning_rate_fn, config,
                                     setup.mesh, jax.random.key(0), shardings)
  batches = iter(pipeline.train_dataset(config, 0, 1))
  iterates = []
  for _ in range(4):
    batch = {k: jax.device_put(v, setup.batch_sharding) for k, v in next(batches).items()}
    state, metrics = setup.train_step(state, batch)
    assert bool(metrics['train/finite'])
    iterates.append(jax.device_get(state.params))
  for ema, params in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(state.params)):
    assert ema.sharding == params.sharding and ema.dtype == np.float32
  weights = decay ** np.arange(len(iterates) - 1, -1, -1, dtype=np.float64)
  want = jax.tree.map(lambda *ps: sum(w * np.asarray(p, np.float64)
                                      for w, p in zip(weights, ps)) / weights.sum(), *iterates)
  got = jax.device_get(state.ema_params)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6), got, want)
  # Far from both the last parameters and their plain mean: the test would see either.
  assert _max_difference(got, iterates[-1]) > 1e-3
  plain_mean = jax.tree.map(lambda *ps: sum(np.asarray(p, np.float64) for p in ps) / 4,
                            *iterates)
  assert _max_difference(got, plain_mean) > 1e-3

  nan = state.params['logit_scale'] * np.nan
  bad = state.replace(params={**state.params, 'logit_scale': nan})
  batch = {k: jax.device_put(v, setup.batch_sharding) for k, v in next(batches).items()}
  after, metrics = setup.train_step(bad, batch)
  assert not bool(metrics['train/finite'])
  _assert_equal(jax.device_get(after.ema_params), got)


def test_decay_zero_keeps_no_ema_and_a_bad_decay_is_refused(config):
  model = build_model(config)
  tx, schedule = make_optimizer(config.optim, config.total_steps)
  mesh = sharding.make_mesh(config.mesh)
  abstract, shardings = step.abstract_train_state(model, tx, schedule, config, mesh)
  assert abstract.ema_params is None and shardings.ema_params is None
  config.optim.ema_decay = 1.0
  with pytest.raises(train.ConfigError, match=r'optim.ema_decay must be in \[0, 1\)'):
    train.setup_step(config)


def _state(config, seed):
  setup = train.setup_step(config)
  return step.create_train_state(setup.model, setup.tx, setup.learning_rate_fn, config,
                                 setup.mesh, jax.random.key(seed), setup.state_shardings)


def test_checkpoints_hold_the_ema_only_when_on_and_restore_params_picks_it(tmp_path):
  """A checkpoint written with an EMA has an `ema_params` item, which `restore_params` gives
  unless raw_params; without one the layout is as before. Resuming with the EMA turned on
  starts it at the restored parameters; turned off, the checkpoint's EMA is not read."""
  on, off = _ema_config(), shrink(load_config('coca'))
  data = iter(pipeline.train_dataset(on, 0, 1))
  with_ema, _ = _state(on, 0)
  with_ema = with_ema.replace(ema_params=jax.tree.map(lambda x: x + 1, with_ema.ema_params))
  without, _ = _state(off, 1)
  for name, saved in (('on', with_ema), ('off', without)):
    saver = checkpoint.Checkpointer(str(tmp_path / name), keep=1)
    saver.save(2, saved, data)
    saver.close()
  items = {name: sorted(os.listdir(os.path.join(checkpoint.checkpoint_dir(
      str(tmp_path / name)), '2'))) for name in ('on', 'off')}
  assert 'ema_params' in items['on'] and 'ema_params' not in items['off']
  assert set(items['on']) - set(items['off']) == {'ema_params'}

  ema = checkpoint.restore_params(str(tmp_path / 'on'), on)
  raw = checkpoint.restore_params(str(tmp_path / 'on'), on, raw_params=True)
  _assert_equal(ema, with_ema.ema_params)
  _assert_equal(raw, with_ema.params)
  _assert_equal(checkpoint.restore_params(str(tmp_path / 'off'), off), without.params)

  def restore(name, config):
    saver = checkpoint.Checkpointer(str(tmp_path / name), keep=1)
    try:
      return saver.restore(2, *_state(config, 2), data)
    finally:
      saver.close()
  restored = restore('off', on)
  _assert_equal(restored.ema_params, without.params)  # turned on: starts at the parameters
  pointer = lambda x: x.addressable_shards[0].data.unsafe_buffer_pointer()
  assert pointer(restored.ema_params['logit_scale']) != pointer(restored.params['logit_scale'])
  restored = restore('on', off)
  assert restored.ema_params is None
  _assert_equal(restored.params, with_ema.params)


def test_training_evaluates_and_checkpoints_the_ema(ema_run):
  config, workdir, seen = ema_run
  ema = checkpoint.restore_params(workdir, config)
  raw = checkpoint.restore_params(workdir, config, raw_params=True)
  assert _max_difference(ema, raw) > 1e-5
  assert len(seen) == 1  # the final evaluation, of the EMA
  _assert_equal(seen[0], ema)


def test_resume_reproduces_the_ema_exactly(ema_run, tmp_path):
  config, workdir, _ = ema_run
  config = config.copy_and_resolve_references()
  interrupted = str(tmp_path)
  config.total_steps = 2
  _train(config, interrupted)  # "killed" after step 2
  config.total_steps = 4
  _train(config, interrupted)  # same command, longer: resumes at 2
  for raw_params in (False, True):
    _assert_equal(checkpoint.restore_params(interrupted, config, raw_params=raw_params),
                  checkpoint.restore_params(workdir, config, raw_params=raw_params))


def test_load_and_evaluate_take_the_ema_unless_raw_params(ema_run, tmp_path, monkeypatch):
  config, workdir, _ = ema_run
  ema = checkpoint.restore_params(workdir, config)
  raw = checkpoint.restore_params(workdir, config, raw_params=True)
  _assert_equal(vlrep.load(workdir).params, ema)
  _assert_equal(vlrep.load(workdir, raw_params=True).params, raw)

  monkeypatch.setattr(evaluate, 'Evaluator', _Recorder)
  _Recorder.seen.clear()
  evaluate.evaluate(workdir)
  evaluate.evaluate(workdir, raw_params=True)
  _assert_equal(_Recorder.seen[0], ema)
  _assert_equal(_Recorder.seen[1], raw)

  exported = vlrep.load(workdir).save(str(tmp_path / 'exported'))  # exports the EMA
  _assert_equal(vlrep.load(exported).params, ema)
  with pytest.raises(ValueError, match='one set of parameters'):
    vlrep.load(exported, raw_params=True)


def test_init_from_a_run_takes_its_ema(ema_run, tmp_path):
  """A new run (with an EMA of its own) started from a run directory starts from that run's
  EMA: at learning rate 0 both its parameters and its EMA stay exactly those."""
  config, workdir, _ = ema_run
  source = checkpoint.restore_params(workdir, config)
  config = config.copy_and_resolve_references()
  config.update(init_from=workdir, total_steps=1, eval_every_steps=0)
  config.optim.learning_rate = 0.0
  run = str(tmp_path)
  train.train_and_evaluate(config, run)
  _assert_equal(checkpoint.restore_params(run, config, raw_params=True), source)
  _assert_equal(checkpoint.restore_params(run, config), source)
