"""vlrep: train, evaluate and load CoCa-family image-text models in JAX/Flax.

Public API: `vlrep.load(path, step=None) -> Pretrained` (a run directory or one written by
`Pretrained.save`) and `Pretrained` (`tokenize`, `encode_image`, `encode_text`, `caption`,
`save`). Training is `python -m vlrep.train`; `python -m vlrep.convert` imports open_clip.
"""

from vlrep.pretrained import Pretrained, load

__all__ = ['Pretrained', 'load']
__version__ = '0.1.0'
