"""vlrep.weights.convert's inputs: model configs by file or by open_clip name, and named errors.

The conversion itself runs end to end in tests/weights/test_convert_open_clip.py.
"""

import importlib.util
import json
import os

import pytest

from vlrep.weights import convert


def test_model_cfg_from_a_file_or_an_open_clip_name(tmp_path):
  cfg = {'embed_dim': 16, 'vision_cfg': {'width': 32}, 'text_cfg': {'width': 32}}
  path = tmp_path / 'cfg.json'
  path.write_text(json.dumps(cfg))
  assert convert.read_model_cfg(str(path)) == cfg
  with pytest.raises(FileNotFoundError, match="--model_cfg='nonesuch' is neither a JSON file"):
    convert.read_model_cfg('nonesuch')
  with pytest.raises(FileNotFoundError, match='--open_clip_state_dict=.*missing.pt.* not found'):
    convert.convert(str(tmp_path / 'missing.pt'), str(path), str(tmp_path / 'out'))
  if importlib.util.find_spec('open_clip') is None and not os.environ.get('CI'):
    pytest.skip('open_clip_torch not installed: model config names cannot be looked up')
  vit_b32 = convert.read_model_cfg('ViT-B-32')  # found without importing open_clip (torch)
  assert vit_b32['embed_dim'] == 512 and vit_b32['vision_cfg']['patch_size'] == 32
