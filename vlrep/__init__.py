"""vlrep: train, evaluate and load CoCa-family image-text models in JAX/Flax.

Public API: `vlrep.load(workdir, step=None) -> Pretrained` and `Pretrained` (`tokenize`,
`encode_image`, `encode_text`, `caption`). Training is `python -m vlrep.train`.
"""

from vlrep.pretrained import Pretrained, load

__all__ = ['Pretrained', 'load']
__version__ = '0.1.0'
