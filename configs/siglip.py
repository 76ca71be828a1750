"""SigLIP configs: the CLIP config with the sigmoid contrastive loss and its learned bias.

`--config=configs/siglip.py:VARIANT` (Zhai et al. 2023): the towers of the CoCa variant, no
multimodal layers, and `loss.contrastive_type='sigmoid'`, which also starts the temperature
at t' = log 10 and the bias at -10 (`vlrep/models/coca.py`).
"""

import importlib.util
import os

import ml_collections


def get_config(variant: str = 'tiny') -> ml_collections.ConfigDict:
  # Config files are loaded by path, not as a package, so the sibling is loaded the same way.
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'clip.py')
  spec = importlib.util.spec_from_file_location('vlrep_configs_clip', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(variant)
  c.loss.contrastive_type = 'sigmoid'
  return c
