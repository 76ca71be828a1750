"""vlrep: train, evaluate and load CoCa-family image-text models in JAX/Flax.

Public API: `vlrep.load(workdir, step=None) -> Pretrained` and `Pretrained` (`tokenize`,
`encode_image`, `encode_text`, `caption`); `vlrep.load_open_clip(state_dict_path, model_cfg)`
imports an open_clip CLIP or CoCa checkpoint. Training is `python -m vlrep.train`.
"""

from vlrep.interop.open_clip import load_open_clip
from vlrep.pretrained import Pretrained, load

__all__ = ['Pretrained', 'load', 'load_open_clip']
__version__ = '0.1.0'
