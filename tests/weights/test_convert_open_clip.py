"""`python -m vlrep.convert` on a tiny random open_clip CLIP: the exported directory loads on
another device count, tokenizes and embeds as open_clip does, and fine-tunes with init_from.

Needs torch and open_clip_torch (the README's test command installs both; open_clip imports
torchvision, stubbed by tests/weights/open_clip_shim.py where it cannot load).
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


import open_clip_shim  # before open_clip: see the module

torch, open_clip = open_clip_shim.require()

import vlrep  # noqa: E402
from vlrep import train  # noqa: E402
from vlrep.parallel import sharding  # noqa: E402
from vlrep.weights import export, init_from  # noqa: E402

MODEL_CFG = dict(
    embed_dim=16, quick_gelu=True,
    vision_cfg=dict(image_size=16, patch_size=8, width=32, head_width=16, layers=1),
    text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1))
def _saved_config(path):
  spec = importlib.util.spec_from_file_location('saved', os.path.join(REPO, 'configs', 'saved.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(path)


TEXTS = ['a photo of a cat', 'Two RED circles &amp; one blue cross!', '',
         'a very long caption that goes on and on well past the sixteen token context length']


def test_convert_load_embed_and_fine_tune(tmp_path):
  torch.manual_seed(0)
  model = open_clip.CLIP(**MODEL_CFG).eval()
  with torch.no_grad():  # open_clip leaves biases at 0 and norms at 1: make every one count
    for name, p in model.named_parameters():
      if name != 'logit_scale':
        p.add_(0.05 * torch.randn_like(p))
  state_dict, model_cfg = tmp_path / 'model.pt', tmp_path / 'model_cfg.json'
  torch.save(model.state_dict(), state_dict)
  model_cfg.write_text(json.dumps(MODEL_CFG))
  output = tmp_path / 'export'

  result = subprocess.run(
      [sys.executable, '-m', 'vlrep.convert', f'--open_clip_state_dict={state_dict}',
       f'--model_cfg={model_cfg}', f'--output={output}'],
      cwd=tmp_path, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get('PYTHONPATH', '')])))
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'wrote {output}' in result.stdout
  assert sorted(os.listdir(output)) == ['config.json', 'params.safetensors']

  # Converted on 8 devices in the subprocess, loaded here on 1.
  one_device = sharding.make_mesh(sharding.DATA_PARALLEL, jax.devices()[:1])
  loaded = vlrep.load(str(output), mesh=one_device)
  tokens = open_clip.tokenize(TEXTS, context_length=16).numpy()
  np.testing.assert_array_equal(loaded.tokenize(TEXTS), tokens)
  images = np.random.default_rng(0).normal(size=(3, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    want_text = torch.nn.functional.normalize(model.encode_text(torch.as_tensor(tokens)), dim=-1)
    want_image = torch.nn.functional.normalize(
        model.encode_image(torch.as_tensor(images).permute(0, 3, 1, 2)), dim=-1)
  np.testing.assert_allclose(loaded.encode_text(TEXTS), want_text.numpy(), atol=1e-4)
  np.testing.assert_allclose(loaded.encode_image(images), want_image.numpy(), atol=1e-4)

  # init_from straight from the state dict gives the same parameters.
  like = export.abstract_params(loaded.config, one_device)
  direct = init_from.load_params(f'open_clip:{state_dict}:{model_cfg}', like)
  jax.tree.map(np.testing.assert_array_equal, direct, loaded.params)

  # The tiny synthetic run fine-tuned from the import. AdamW moves a parameter by at most
  # about the learning rate per step, so after 2 steps every parameter lies within a few
  # learning rates of the imported one (a fresh initialisation would be ~0.05 away).
  config = _saved_config(str(output))  # --config=configs/saved.py:DIR
  config.update(batch_size=8, total_steps=2, log_every_steps=1, checkpoint_every_steps=2,
                eval_every_steps=0, init_from=str(output))
  config.optim.update(warmup_steps=1, learning_rate=1e-3)
  run = str(tmp_path / 'tuned')
  train.train_and_evaluate(config, run)
  losses = [r['train/loss'] for r in map(json.loads, open(os.path.join(run, 'metrics.jsonl')))
            if 'train/loss' in r]
  assert len(losses) == 2 and np.isfinite(losses).all()
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                       vlrep.load(run).params, loaded.params)
  assert max(jax.tree.leaves(moved)) <= 3e-3, moved
  assert max(jax.tree.leaves(moved)) > 0  # it did train
