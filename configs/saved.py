"""A saved config: `--config=configs/saved.py:DIR` with DIR a run or an exported model.

Reads `DIR/config.json` (or a `.json` file given directly), the resolved config that every
run and every `Pretrained.save` / `vlrep.convert` output carries, so that a new run can use
exactly that architecture, e.g. to fine-tune an imported open_clip model:

  python -m vlrep.train --config=configs/saved.py:models/vit_b32 \
      --config.init_from=models/vit_b32 --workdir=runs/ft ...

Fields the saved config predates take `configs/coca.py:tiny`'s values; every field can be
overridden on the command line as usual.
"""

import importlib.util
import json
import os

import ml_collections


def _defaults() -> ml_collections.ConfigDict:
  # Loaded by path, as the config flag loads config files (configs/ is not a package).
  spec = importlib.util.spec_from_file_location(
      'vlrep_configs_coca', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'coca.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config('tiny')


def _merge(config: ml_collections.ConfigDict, saved: dict) -> None:
  for key, value in saved.items():
    if isinstance(value, dict) and isinstance(config.get(key), ml_collections.ConfigDict):
      _merge(config[key], value)
    else:
      # JSON has no tuples; the configs' sequences are tuples.
      config[key] = tuple(value) if isinstance(value, list) else value


def get_config(path: str) -> ml_collections.ConfigDict:
  from vlrep.runtime import paths  # pylint: disable=g-import-not-at-top  (a local or gs:// DIR)
  file = path if path.endswith('.json') else paths.join(path, 'config.json')
  if not paths.isfile(file):
    raise FileNotFoundError(f'configs/saved.py:{path}: {file} not found (expected a vlrep run '
                            'directory, an exported model or a config.json)')
  saved = json.loads(paths.read_text(file))
  config = _defaults()
  config.unlock()
  _merge(config, saved)
  config.lock()
  return config
