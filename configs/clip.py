"""CLIP configs: CoCa with no multimodal layers and caption weight 0 (same code, same loop).

`--config=configs/clip.py:VARIANT` takes the CoCa variant's towers (`configs/coca.py`,
`RECIPE@SIZE` included); the contrastive pooler reads the image tokens directly since there
is no captioning pooler (`vlrep.variants.clip`).
"""

import ml_collections

from vlrep import variants


def get_config(variant: str = 'tiny') -> ml_collections.ConfigDict:
  return variants.clip(variant)
