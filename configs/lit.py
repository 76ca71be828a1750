"""LiT configs (Zhai et al. 2022, "LiT: Zero-Shot Transfer with Locked-image Text Tuning"):
CLIP's VARIANT (`configs/clip.py`) whose image side is taken from `--config.init_from` (a CLIP
run or export of the same variant) and locked, the text side trained from scratch.

  python -m vlrep.train --config=configs/lit.py:tiny --config.init_from=CLIP_RUN --workdir=...
"""

import ml_collections

from vlrep import variants


def get_config(variant: str = 'tiny') -> ml_collections.ConfigDict:
  return variants.lit(variant)
