"""vlrep: train, evaluate and load CoCa-family image-text models in JAX/Flax.

Public API: `vlrep.load(path, step=None) -> Pretrained` (a run directory or one written by
`Pretrained.save`) and `Pretrained` (`tokenize`, `encode_image`, `encode_text`, `caption`,
`caption_logits`, `zero_shot_classifier`, `retrieve`, `save`);
`vlrep.load_open_clip(state_dict_path, model_cfg)` imports an open_clip CLIP or CoCa
checkpoint; `vlrep.load_hf(DIR)` a transformers CLIPModel or SiglipModel directory. Training
is `python -m vlrep.train`; `python -m vlrep.convert` moves weights between vlrep's exported
directories, open_clip and transformers.
"""

from vlrep.pretrained import Pretrained, load
from vlrep.weights.hf import load_hf
from vlrep.weights.open_clip import load_open_clip

__all__ = ['Pretrained', 'load', 'load_hf', 'load_open_clip']
__version__ = '0.1.0'
