"""SigLIP configs: the CLIP config with the sigmoid contrastive loss and its learned bias.

`--config=configs/siglip.py:VARIANT` (Zhai et al. 2023): the towers of the CoCa variant, no
multimodal layers, and `loss.contrastive_type='sigmoid'`, which also starts the temperature
at t' = log 10 and the bias at -10 (`vlrep/models/build.py`; `vlrep.variants.siglip`).
"""

import ml_collections

from vlrep import variants


def get_config(variant: str = 'tiny') -> ml_collections.ConfigDict:
  return variants.siglip(variant)
