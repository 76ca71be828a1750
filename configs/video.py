"""Video configs: CoCa trained on clips of the moving-shapes set (`synthetic_video`).

`--config=configs/video.py:VARIANT` takes the CoCa variant (`configs/coca.py`) and trains
it on clips of `data.frames` frames: every frame through the image encoder, the tokens of
all of them through the attentional poolers (`CoCa.encode_video`). Its evaluations are
zero-shot motion, colour and shape, and text-video retrieval, on the held-out clips; the
motion task is also run on one frame per clip (`zeroshot_motion_one_frame`), what a model
that sees no motion would score, and with the mean of the frame embeddings.
"""

import ml_collections

from vlrep import variants
from vlrep.data import synthetic_video
from vlrep.evals import entries

FRAMES = 4


def get_config(variant: str = 'tiny') -> ml_collections.ConfigDict:
  c = variants.coca(variant)
  c.data.train, c.data.eval, c.data.frames = 'synthetic_video', 'synthetic_video:test', FRAMES
  c.data.image_size = 32
  evals = ml_collections.ConfigDict()
  for task in ('motion', 'colour', 'shape'):
    evals[f'zeroshot_{task}'] = entries.entry(
        'zeroshot_video', label_key=f'labels/{task}', frames=FRAMES, ks=(1,),
        templates=synthetic_video.ZERO_SHOT_TASKS[task][1])
  evals.zeroshot_motion_one_frame = evals.zeroshot_motion.copy_and_resolve_references()
  evals.zeroshot_motion_one_frame.frames = 1
  evals.zeroshot_motion_mean = evals.zeroshot_motion.copy_and_resolve_references()
  evals.zeroshot_motion_mean.pool = 'mean'
  evals.retrieval = entries.entry('video_retrieval', frames=FRAMES, ks=(1, 5),
                                  identical_text_is_hit=True)
  c.evals = evals
  c.data.eval_examples = 500
  return c
