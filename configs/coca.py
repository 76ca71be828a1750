"""CoCa configs: `--config=configs/coca.py:VARIANT` with VARIANT in tiny|small|base|large|giant.

`tiny` is the CPU demo on the embedded synthetic data set; `small` is a CPU benchmark size;
`base`, `large` and `giant` are the paper's Table 1 models with its pretraining recipe
(batch 65,536, 500k steps, Adafactor, lr 8e-4, 2% warmup then linear decay, 288 px / 18 px
patches, 64k vocabulary). Every field can be overridden with `--config.FIELD=VALUE`.

`RECIPE@SIZE` (e.g. `base@tiny`) is SIZE's model, data, batch and length trained with
RECIPE's recipe: its optimizer and schedule shape (warmup as the same fraction of the
steps), weight decay, loss weights and dtypes. It checks on a CPU that a paper recipe
learns, before it costs accelerator time.

The fields, their defaults and what they mean are in `vlrep/config.py` (`defaults()`); the
variants' table of sizes and recipes is in `vlrep/variants.py` (`SIZES`, `RECIPES`), so that
the installed package builds the same configs.
"""

import ml_collections

from vlrep import variants


def get_config(variant: str = 'tiny') -> ml_collections.ConfigDict:
  return variants.coca(variant)
