"""Fine-tuning configs: `--config=configs/finetune.py:KIND[@VARIANT]`, KIND classification or
caption, VARIANT a CoCa variant (`configs/coca.py`, default tiny), from `--config.init_from`
(a run directory or an export) through the one training loop (`vlrep.train`).

  python -m vlrep.train --config=configs/finetune.py:classification \\
      --config.init_from=/tmp/vlrep_demo --workdir=/tmp/vlrep_classify
  python -m vlrep.train --config=configs/finetune.py:caption \\
      --config.init_from=/tmp/vlrep_demo --workdir=/tmp/vlrep_caption

`classification` trains a head on the image embedding with cross-entropy on
`data.label_key` (top-1 on held-out data: the `classification` evaluation); `caption` trains
the captioner alone (CIDEr and distinct captions: the `captioning` evaluation). What each
sets is in `vlrep/variants.py` (`finetune`).
"""

import ml_collections

from vlrep import variants


def get_config(arg: str = 'classification') -> ml_collections.ConfigDict:
  return variants.finetune(arg)
