"""CLIP configs: CoCa with no multimodal layers and caption weight 0 (same code, same loop).

`--config=configs/clip.py:VARIANT` takes the CoCa variant's towers; the contrastive pooler
reads the image tokens directly since there is no captioning pooler.
"""

import importlib.util
import os

import ml_collections


def _coca_config(variant: str) -> ml_collections.ConfigDict:
  # Config files are loaded by path, not as a package, so the sibling is loaded the same way.
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'coca.py')
  spec = importlib.util.spec_from_file_location('vlrep_configs_coca', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def get_config(variant: str = 'tiny') -> ml_collections.ConfigDict:
  c = _coca_config(variant)
  c.model.text.multimodal_layers = 0
  c.model.pooler = 'parallel'
  c.loss.caption_weight = 0.0
  return c
