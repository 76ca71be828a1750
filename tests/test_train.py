"""End to end: train, checkpoint, resume exactly, evaluate, load from Python."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import vlrep
from vlrep import checkpoint, train


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
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
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


@pytest.mark.parametrize('mesh', [{'data': 8}, {'data': 2, 'fsdp': 4},
                                  {'data': 2, 'fsdp': 2, 'tensor': 2}])
def test_every_mesh_gives_the_losses_of_one_device(one_device_losses, tmp_path, mesh):
  config, expected = one_device_losses
  config = config.copy_and_resolve_references()
  config.mesh.update({'data': 1, 'fsdp': 1, 'tensor': 1, **mesh})
  losses = _train_losses(config, str(tmp_path))
  np.testing.assert_allclose(losses, expected, rtol=2e-4)


@pytest.fixture(scope='module')
def one_device_losses(tmp_path_factory):
  """The tiny config (smaller batch, 3 steps) on one device: the reference every mesh meets."""
  from conftest import load_config
  config = load_config('coca')
  config.update(batch_size=16, total_steps=3, log_every_steps=1, checkpoint_every_steps=100,
                eval_every_steps=0)
  config.mesh.update(data=1, fsdp=1, tensor=1)
  losses = _train_losses(config, str(tmp_path_factory.mktemp('one')), jax.devices()[:1])
  assert len(losses) == 3
  return config, losses
