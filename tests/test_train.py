"""End to end: train, checkpoint, resume exactly, evaluate, load from Python."""

import json
import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import vlrep
from conftest import COMPILE_FLAGS, REPO, assert_same_params, override_flags
from vlrep import train
from vlrep.runtime import checkpoint, nonfinite


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A shrunk tiny CoCa trained 4 steps (checkpoints at 2 and 4, eval at the end)."""
  from conftest import load_config, shrink
  config = shrink(load_config('coca'))
  workdir = str(tmp_path_factory.mktemp('run'))
  results = train.train_and_evaluate(config, workdir)
  return config, workdir, results


def test_run_writes_metrics_checkpoints_config_and_results(trained):
  config, workdir, results = trained
  records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  train_records = [r for r in records if 'train/loss' in r]
  assert [r['step'] for r in train_records] == [2, 4]
  for key in ('train/contrastive_loss', 'train/caption_loss', 'train/learning_rate',
              'train/logit_scale', 'train/examples_per_s'):
    assert key in train_records[-1]
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']
  assert json.load(open(os.path.join(workdir, 'config.json')))['batch_size'] == 8
  on_disk = json.load(open(os.path.join(workdir, 'results.json')))
  assert on_disk == pytest.approx(results)
  keys = ['zeroshot_colour/top1', 'zeroshot_colour/top5', 'zeroshot_shape/top1',
          'zeroshot_count/top1', 'linear_probe_shape/accuracy']
  keys += [f'retrieval/{d}_r@{k}' for d in ('i2t', 't2i') for k in (1, 5, 10)]
  keys += [f'captioning/{m}_{d}' for m in ('cider', 'bleu4', 'exact_match')
           for d in ('greedy', 'beam')]
  for key in keys:
    assert 0.0 <= on_disk[key] <= (10.0 if 'cider' in key else 1.0), key
  assert on_disk['linear_probe_shape/l2'] in config.evals.linear_probe_shape.l2_grid
  assert any(f.startswith('events.out.tfevents') for f in
             os.listdir(os.path.join(workdir, 'tensorboard')))


def test_resumed_run_is_bit_exact(trained, tmp_path):
  config, workdir, _ = trained
  config = config.copy_and_resolve_references()
  config.eval_every_steps = 0
  config.total_steps = 2
  interrupted = str(tmp_path)
  train.train_and_evaluate(config, interrupted)  # "killed" after step 2
  config.total_steps = 4
  train.train_and_evaluate(config, interrupted)  # same command, longer: resumes at 2
  straight = vlrep.load(workdir).params
  resumed = vlrep.load(interrupted).params
  jax.tree.map(np.testing.assert_array_equal, straight, resumed)
  assert not os.path.exists(os.path.join(interrupted, 'results.json'))  # evaluation off


def test_load_round_trip(trained):
  config, workdir, _ = trained
  model = vlrep.load(workdir)
  assert model.config.batch_size == 8
  earlier = vlrep.load(workdir, step=2)
  assert not np.array_equal(model.params['logit_scale'], earlier.params['logit_scale'])
  images = np.random.default_rng(0).integers(0, 255, (3, 16, 16, 3)).astype(np.uint8)
  image_emb = model.encode_image(images)
  assert image_emb.shape == (3, config.model.embed_dim)
  np.testing.assert_allclose(np.linalg.norm(image_emb, axis=-1), 1.0, rtol=1e-5)
  texts = ['two red circles', 'a blue square']
  np.testing.assert_allclose(model.encode_text(texts), model.encode_text(model.tokenize(texts)),
                             rtol=1e-6)
  captions = model.caption(images)
  assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
  with pytest.raises(FileNotFoundError, match='no checkpoint 7'):
    vlrep.load(workdir, step=7)


def test_load_on_another_device_count(trained):
  """A run trained on 8 (simulated) devices loads on 4 and gives the same numbers."""
  _, workdir, _ = trained
  code = ('import numpy as np, jax, vlrep; m = vlrep.load(%r); '
          'assert jax.device_count() == 4; '
          'np.save(%r, m.encode_text(["two red circles", "a cross"]))')
  out = os.path.join(workdir, 'emb4.npy')
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count=4 {COMPILE_FLAGS}',
             JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-c', code % (workdir, out)], env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  here = vlrep.load(workdir).encode_text(['two red circles', 'a cross'])
  np.testing.assert_allclose(np.load(out), here, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('field, value, message', [
    ('model.text.vocab_size', 100, 'vocab_size=100'),
    ('data.tokenizer', 'words', "'words'"),
    ('data.train', 'laion', "'laion'"),
    ('total_steps', 0, 'total_steps'),
    ('mesh.data', 3, 'mesh .* has 3 devices, but 8'),
    ('batch_size', 12, 'batch_size 12 does not divide into 8'),
    ('microbatches', 2, 'batch_size 8 does not divide into 2 microbatches'),
    ('loss.contrastive_impl', 'allgather', 'loss.contrastive_impl'),
    ('loss.contrastive_type', 'hinge', 'loss.contrastive_type'),
    ('evals.captioning.methods', ('greedy', 'bem'), "evals.captioning.methods: 'bem'"),
    ('evals.zeroshot_colour.label_key', 'labels/hue', "no label 'labels/hue'"),
    ('evals.captioning.max_len', 25, 'evals.captioning.max_len=25 exceeds .* '
     'data.max_text_len=24'),
    ('model.text.pad_id', 3, "model.text.pad_id=3, but the 'bytes' tokenizer pads with 0"),
    ('optim.factor_min_dim', 64, "optim.factor_min_dim=64 applies to optim.name='adafactor'"),
])
def test_bad_config_fails_before_anything_runs(config, tmp_path, field, value, message):
  section, _, name = field.rpartition('.')
  target = config
  for part in filter(None, section.split('.')):
    target = target[part]
  target[name] = value
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')


def _train_losses(config, workdir, devices=None) -> list[float]:
  train.train_and_evaluate(config, workdir, devices)
  records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  return [r['train/loss'] for r in records if 'train/loss' in r]


@pytest.mark.parametrize('mesh', [{'data': 8}, {'data': 2, 'fsdp': 2, 'tensor': 2}])
def test_every_mesh_trains_like_one_device(one_device_losses, tmp_path, mesh):
  """The same losses at every step and, after 3 updates at non-zero learning rates, the same
  value of every parameter: pure data parallelism, and all three axes at once (data=2 x
  fsdp=4 is the resume test's mesh below, and spans processes in tests/launch)."""
  config, expected, expected_params = one_device_losses
  config = config.copy_and_resolve_references()
  config.mesh.update({'data': 1, 'fsdp': 1, 'tensor': 1, **mesh})
  losses = _train_losses(config, str(tmp_path))
  np.testing.assert_allclose(losses, expected, rtol=2e-4)
  assert_same_params(vlrep.load(str(tmp_path)).params, expected_params,
                     atol=0.05 * config.optim.learning_rate)


@pytest.mark.parametrize('mesh, devices', [({'data': 2, 'fsdp': 4}, 8), ({'data': -1}, 4)])
def test_resume_on_another_mesh_or_device_count(trained, tmp_path, mesh, devices):
  """Step 2 of the 8-device (data=8) run resumed on data=2 x fsdp=4, or on 4 devices: the
  same loss at step 4."""
  config, workdir, _ = trained
  shutil.copytree(os.path.join(workdir, 'checkpoints'), tmp_path / 'checkpoints')
  shutil.rmtree(tmp_path / 'checkpoints' / '4')
  config = config.copy_and_resolve_references()
  config.eval_every_steps = 0
  config.mesh.update({'data': 1, 'fsdp': 1, 'tensor': 1, **mesh})
  resumed = _train_losses(config, str(tmp_path), jax.devices()[:devices])
  records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  straight = [r['train/loss'] for r in records if 'train/loss' in r]
  assert len(straight) == 2 and len(resumed) == 1  # logged at steps 2 and 4
  np.testing.assert_allclose(resumed, straight[1:], rtol=2e-4)


@pytest.fixture(scope='module')
def one_device_losses(tmp_path_factory):
  """The tiny config (smaller batch, 3 steps) on one device: the reference every mesh meets."""
  from conftest import load_config
  config = load_config('coca')  # not shrunk: its 4 image tokens make many gradients ~0
  config.update(batch_size=16, total_steps=3, log_every_steps=1, checkpoint_every_steps=100,
                eval_every_steps=0)
  config.optim.warmup_steps = 0  # every update, the first included, at a non-zero rate
  config.mesh.update(data=1, fsdp=1, tensor=1)
  workdir = str(tmp_path_factory.mktemp('one'))
  losses = _train_losses(config, workdir, jax.devices()[:1])
  assert len(losses) == 3
  assert losses[2] < losses[0] - 0.01, losses  # the updates changed the model
  return config, losses, vlrep.load(workdir).params


def _checkpoint_entries(workdir):
  root = os.path.join(workdir, 'checkpoints')
  return sorted(os.listdir(root)) if os.path.isdir(root) else []


def test_kill_9_anywhere_then_rerun_is_bit_exact(trained, tmp_path):
  """SIGKILL while the first checkpoint is being written, rerun, SIGKILL while the last is
  being written, rerun: the final parameters are those of the run that never stopped."""
  config, reference, _ = trained
  workdir = str(tmp_path / 'run')
  command = [sys.executable, '-m', 'vlrep.train', '--config=configs/coca.py:tiny',
             f'--workdir={workdir}', *override_flags(config, eval_every_steps=0)]
  env = dict(os.environ)  # with the session's compilation cache: no compile after the first

  def run_until_writing(step):
    """Runs the command; SIGKILLs it once orbax's temporary directory for `step` exists."""
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not any(e.startswith(f'{step}.orbax-checkpoint-tmp') for e in
                  _checkpoint_entries(workdir)):
      assert process.poll() is None, process.communicate()[0][-3000:]
      assert time.time() < deadline
      time.sleep(0.002)
    process.kill()
    return process.communicate()[0]

  output = run_until_writing(2)
  assert 'resumed from' not in output
  assert '2' not in _checkpoint_entries(workdir) or _checkpoint_entries(workdir) == ['2']
  output = run_until_writing(4)
  assert 'resumed from' not in output  # the unfinished save of step 2 was not picked up
  assert '2' in _checkpoint_entries(workdir) and '4' not in _checkpoint_entries(workdir)
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'at step 2' in result.stderr
  assert _checkpoint_entries(workdir) == ['2', '4']  # what the kills left was cleaned up
  jax.tree.map(np.testing.assert_array_equal, vlrep.load(reference).params,
               vlrep.load(workdir).params)


def test_config_errors_are_one_line_and_fast(tmp_path):
  """From the command line: exit status 1, one line naming the problem, before compiling."""
  cases = [('--config.model.text.widht=3', '--config.model.text.widht: unknown config key '
                                            "'widht' Did you mean \"width\""),
           ('--config.batch_size=abc', "--config.batch_size=abc: invalid literal for int()"),
           ('--config=configs/coca.py:huge', "Unknown coca variant 'huge'"),
           ('--config.data.train=arrayrecord:/no/such/dir', "No ArrayRecord files at "
                                                             "'/no/such/dir'")]
  for flag, message in cases:
    start = time.time()
    result = subprocess.run([sys.executable, '-m', 'vlrep.train', '--config=configs/coca.py:tiny',
                             f'--workdir={tmp_path}/run', flag], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if 'vlrep.train: error:' in line]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert 'Traceback' not in result.stderr
    assert time.time() - start < 30  # the tiny model alone takes longer than that to compile
  assert not os.path.exists(tmp_path / 'run')


def test_nan_halt_names_the_step_and_keeps_the_last_good_checkpoint(config, tmp_path):
  """A learning rate of 1e30 blows the parameters up; nan_policy=halt stops at the first
  non-finite step, and every checkpoint left is from before it."""
  config.update(total_steps=8, log_every_steps=1, checkpoint_every_steps=1, eval_every_steps=0,
                nan_policy='halt')
  config.optim.learning_rate = 1e30
  workdir = str(tmp_path)
  with pytest.raises(nonfinite.NonFiniteError) as error:
    train.train_and_evaluate(config, workdir)
  records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  # The bad step is checked before its metrics are written: every logged loss is finite.
  assert all(isinstance(r['train/loss'], float) for r in records)
  bad = records[-1]['step'] + 1
  assert 1 < bad <= 8
  assert f'at step {bad}: train/caption_loss=nan' in str(error.value)
  assert 'nan_policy=halt' in str(error.value)
  assert checkpoint.Checkpointer(workdir, 3).latest_step() == bad - 1
  assert int(_checkpoint_entries(workdir)[-1]) == bad - 1
