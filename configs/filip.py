"""FILIP configs (Yao et al. 2021, "FILIP: Fine-grained Interactive Language-Image
Pre-Training"): CLIP's VARIANT (`configs/clip.py`) whose contrastive similarity is token-wise
late interaction (`loss.contrastive_similarity='token'`): each image patch's best text token
and each text token's best patch, averaged; zero-shot and retrieval rank by it too.

  python -m vlrep.train --config=configs/filip.py:tiny --workdir=...
"""

import ml_collections

from vlrep import variants


def get_config(variant: str = 'tiny') -> ml_collections.ConfigDict:
  return variants.filip(variant)
