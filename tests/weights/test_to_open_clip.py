"""vlrep -> open_clip (`--to=open_clip`): open_clip models imported into vlrep round-trip
exactly (state dict and model config) and `open_clip.create_model('local-dir:DIR')` loads the
export; a CLIP from transformers exports with open_clip's embeddings equal to vlrep's (1e-4);
layouts open_clip cannot express are refused naming the fields."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy

import open_clip_shim  # before open_clip: see the module

torch, open_clip = open_clip_shim.require()

from conftest import REPO, load_config, shrink  # noqa: E402
from test_open_clip import (CLIP_CASES, COCA_CASES, _build, _check_embeddings, _close,  # noqa: E402
                            _inputs, _load)
from vlrep.weights import open_clip as oc_import, to_open_clip  # noqa: E402

# Every parity case but one: vlrep keeps no captioning pooler for a decoder-less
# attentional_pool='parallel' model (open_clip's encode_image never reads it), so that one
# is refused (test_refusals_name_the_fields).
ROUND_TRIP = [(n, False) for n in sorted(CLIP_CASES) if n != 'parallel_pool_bidirectional']
ROUND_TRIP += [(n, True) for n in sorted(COCA_CASES)]
# Compared with open_clip's outputs after the round trip (the CLIP direction is also
# test_transformers_clip_to_open_clip_cli's).
PARITY = ('coca_legacy_pool',)


@pytest.mark.parametrize('name,coca', ROUND_TRIP)
def test_open_clip_round_trip_is_exact(tmp_path, name, coca):
  model_cfg = (COCA_CASES if coca else CLIP_CASES)[name]
  model = _build(model_cfg, coca)
  loaded = _load(tmp_path, model, model_cfg)
  out = tmp_path / 'export'
  to_open_clip.export_open_clip(loaded.config, loaded.params, str(out))
  written = safetensors.numpy.load_file(str(out / 'open_clip_model.safetensors'))
  want = {k: v.numpy() for k, v in model.state_dict().items() if not k.endswith('attn_mask')}
  if model_cfg['text_cfg'].get('proj_type') == 'none':  # exported as the identity it is
    want['text_projection'] = np.eye(model_cfg['text_cfg']['width'], dtype=np.float32)
  assert written.keys() == want.keys()
  for key, value in want.items():
    np.testing.assert_array_equal(written[key], value, err_msg=key)
  saved = json.loads((out / 'open_clip_config.json').read_text())
  again, _ = oc_import.convert_state_dict(written, saved['model_cfg'])
  assert again.to_dict() == loaded.config.to_dict()

  reloaded = open_clip.create_model(f'local-dir:{out}').eval()  # open_clip takes it as is
  if name not in PARITY:  # the weights are bit for bit those test_open_clip checks
    return
  images, tokens = _inputs()
  _check_embeddings(reloaded, loaded, images, tokens)
  if coca:
    with torch.no_grad():
      logits = reloaded(torch.from_numpy(images), tokens, output_labels=False)['logits']
    _close(loaded.caption_logits(images.transpose(0, 2, 3, 1), tokens.numpy()), logits,
           'caption_logits')


def test_transformers_clip_to_open_clip_cli(tmp_path):
  """A CLIP from transformers, converted to vlrep, then exported with `--to=open_clip`."""
  transformers = pytest.importorskip('transformers')
  from test_hf import make_hf_model  # pylint: disable=g-import-not-at-top
  from vlrep.weights import convert  # pylint: disable=g-import-not-at-top
  hf_model, tokenizer = make_hf_model(tmp_path / 'hf', 'clip', image_size=32)
  exported = convert.from_hf(str(tmp_path / 'hf'), str(tmp_path / 'vlrep'))
  config = json.loads((tmp_path / 'vlrep' / 'config.json').read_text())
  config['data']['tokenizer'] = 'clip_bpe'  # CLIP's BPE either way; open_clip has its own
  (tmp_path / 'vlrep' / 'config.json').write_text(json.dumps(config))
  out = tmp_path / 'open_clip'
  result = subprocess.run(
      [sys.executable, '-m', 'vlrep.convert', '--to=open_clip',
       f'--input={tmp_path / "vlrep"}', f'--output={out}'], capture_output=True, text=True,
      timeout=300,
      env=dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get('PYTHONPATH', '')])))
  assert result.returncode == 0, result.stderr[-3000:]
  reloaded = open_clip.create_model(f'local-dir:{out}').eval()
  exported.batch_size = 8
  images, _ = _inputs()
  tokens = torch.as_tensor(tokenizer(['a photo of a cat', 'two dogs', ''], padding='max_length',
                                     max_length=12)['input_ids'])
  _check_embeddings(reloaded, exported, images, tokens)
  with torch.no_grad():  # and both equal transformers' own
    want = hf_model.get_image_features(pixel_values=torch.from_numpy(images)).pooler_output
  _close(exported.encode_image(images.transpose(0, 2, 3, 1)),
         torch.nn.functional.normalize(want, dim=-1), 'transformers encode_image')
  assert transformers.__version__


def test_refusals_name_the_fields(tmp_path):
  native = shrink(load_config('coca'))
  native.data.tokenizer = 'clip_bpe'
  with pytest.raises(NotImplementedError, match="model.activation='gelu_tanh' .*different GELU"):
    to_open_clip.export_open_clip(native, {}, str(tmp_path))  # open_clip's decoder: exact GELU
  native.model.activation = 'gelu'
  with pytest.raises(NotImplementedError, match=r'no open_clip equivalent: .*'
                     r'model\.vision\.class_token=False \(open_clip: True\)') as error:
    to_open_clip.export_open_clip(native, {}, str(tmp_path))
  assert 'model.text.multimodal_layout=' in str(error.value)  # every difference is named
  model_cfg = CLIP_CASES['parallel_pool_bidirectional']
  loaded = _load(tmp_path, _build(model_cfg, coca=False), model_cfg)
  with pytest.raises(NotImplementedError, match="model.pooler='parallel' without a text decoder"):
    to_open_clip.export_open_clip(loaded.config, loaded.params, str(tmp_path / 'x'))
  config = loaded.config
  config.model.update(pooler='none', image_pool='tok')
  config.data.tokenizer = 'bytes'
  with pytest.raises(NotImplementedError, match="data.tokenizer='bytes'"):
    to_open_clip.export_open_clip(config, loaded.params, str(tmp_path / 'y'))
  captioner = shrink(load_config('cap'))
  with pytest.raises(NotImplementedError, match=r'model\.contrastive=False'):
    to_open_clip.export_open_clip(captioner, {}, str(tmp_path / 'z'))
