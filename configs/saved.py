"""A saved config: `--config=configs/saved.py:DIR` with DIR a run or an exported model.

Reads `DIR/config.json` (or a `.json` file given directly), the resolved config that every
run and every `Pretrained.save` / `vlrep.convert` output carries, so that a new run can use
exactly that architecture, e.g. to fine-tune an imported open_clip model:

  python -m vlrep.train --config=configs/saved.py:models/vit_b32 \
      --config.init_from=models/vit_b32 --workdir=runs/ft ...

A config saved by an earlier layout is migrated (`vlrep.config.migrate`: absent fields take
the values that reproduce how it ran); every field can be overridden on the command line as
usual.
"""

import json

import ml_collections

from vlrep import config as vlrep_config
from vlrep.runtime import paths


def get_config(path: str) -> ml_collections.ConfigDict:
  file = path if path.endswith('.json') else paths.join(path, 'config.json')
  if not paths.isfile(file):
    raise FileNotFoundError(f'configs/saved.py:{path}: {file} not found (expected a vlrep run '
                            'directory, an exported model or a config.json)')
  return vlrep_config.migrate(json.loads(paths.read_text(file)))
