"""CapPa configs (Tschannen et al. 2023, "Image Captioners Are Scalable Vision Learners Too"):
Cap (`configs/cap.py`) with parallel prediction: 75% of each batch's rows
(`loss.parallel_fraction`) decode the whole caption from [MASK] inputs with no causal mask,
the rest autoregressively.

  python -m vlrep.train --config=configs/cappa.py:tiny --workdir=...
"""

import ml_collections

from vlrep import variants


def get_config(variant: str = 'tiny') -> ml_collections.ConfigDict:
  return variants.cappa(variant)
