"""Cap configs (Tschannen et al. 2023, "Image Captioners Are Scalable Vision Learners Too"):
CoCa's VARIANT (`configs/coca.py`) trained on captioning alone, contrastive weight 0, with no
contrastive parameters (`model.contrastive=False`) and an all-multimodal decoder.

  python -m vlrep.train --config=configs/cap.py:tiny --workdir=...
"""

import ml_collections

from vlrep import variants


def get_config(variant: str = 'tiny') -> ml_collections.ConfigDict:
  return variants.cap(variant)
