"""vlrep installed like a library (issue 17): run from outside the repo against a non-editable
`pip install .`, it converts a randomly initialised open_clip CLIP (`vlrep.convert` and
`vlrep.load_open_clip`), loads the export with `vlrep.load`, and trains 3 steps from
`vlrep.variants.coca('tiny')`, shrunk, through `vlrep.train.train_and_evaluate`. Fails if vlrep
is imported from the repo. `.ci/run` runs it; pytest does not collect it.
"""

import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Only the torchvision stub from the tests (open_clip imports torchvision, whose PyPI build does
# not load beside the CPU torch); nothing of the repo's vlrep.
sys.path.append(os.path.join(REPO, 'tests', 'weights'))
import open_clip_shim  # noqa: E402,F401  (before open_clip)
import numpy as np  # noqa: E402
import open_clip  # noqa: E402
import torch  # noqa: E402

import vlrep  # noqa: E402
from vlrep import variants  # noqa: E402
from vlrep import train  # noqa: E402

MODEL_CFG = dict(
    embed_dim=16, quick_gelu=True,
    vision_cfg=dict(image_size=16, patch_size=8, width=32, head_width=16, layers=1),
    text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1))
TEXTS = ['a photo of a cat', 'two red circles']


def main() -> None:
  where = os.path.dirname(os.path.realpath(vlrep.__file__))
  # The venv may live inside the repo (.ci/venv-installed): what matters is that vlrep comes
  # from an installed copy, not from the repo's own vlrep/ folder.
  assert where != os.path.realpath(os.path.join(REPO, 'vlrep')), f'vlrep from the repo: {where}'
  assert 'site-packages' in where.split(os.sep), f'vlrep not installed: {where}'
  assert os.getcwd() != REPO and not os.getcwd().startswith(REPO + os.sep), os.getcwd()
  print('vlrep from', where)
  tmp = tempfile.mkdtemp(prefix='vlrep_installed_')
  torch.manual_seed(0)
  model = open_clip.CLIP(**MODEL_CFG).eval()
  state_dict, model_cfg = os.path.join(tmp, 'model.pt'), os.path.join(tmp, 'model_cfg.json')
  torch.save(model.state_dict(), state_dict)
  with open(model_cfg, 'w') as f:
    json.dump(MODEL_CFG, f)

  output = os.path.join(tmp, 'export')
  subprocess.run([sys.executable, '-m', 'vlrep.convert', f'--open_clip_state_dict={state_dict}',
                  f'--model_cfg={model_cfg}', f'--output={output}'], cwd=tmp, check=True,
                 timeout=600)
  loaded = vlrep.load(output)
  direct = vlrep.load_open_clip(state_dict, MODEL_CFG)
  tokens = open_clip.tokenize(TEXTS, context_length=16).numpy()
  np.testing.assert_array_equal(loaded.tokenize(TEXTS), tokens)  # the packaged CLIP BPE
  with torch.no_grad():
    want = torch.nn.functional.normalize(model.encode_text(torch.as_tensor(tokens)), dim=-1)
  np.testing.assert_allclose(loaded.encode_text(TEXTS), want.numpy(), atol=1e-4)
  np.testing.assert_allclose(direct.encode_text(TEXTS), want.numpy(), atol=1e-4)
  print('converted, loaded and embedded as open_clip does')

  config = variants.coca('tiny')
  config.update(batch_size=8, total_steps=3, log_every_steps=1, checkpoint_every_steps=3,
                eval_every_steps=0)
  config.data.eval_examples = 8
  run = os.path.join(tmp, 'run')
  train.train_and_evaluate(config, run)
  with open(os.path.join(run, 'metrics.jsonl')) as f:
    losses = [r['train/loss'] for r in map(json.loads, f) if 'train/loss' in r]
  assert len(losses) == 3 and np.isfinite(losses).all(), losses
  assert vlrep.load(run).config.to_dict() == config.to_dict()
  print('trained 3 steps:', ', '.join(f'{x:.3f}' for x in losses))


if __name__ == '__main__':
  main()
