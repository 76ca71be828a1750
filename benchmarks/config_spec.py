"""The benchmarks' config loader: `load_config('configs/coca.py:small')` gives the config the
`--config=FILE:VARIANT` flag of the CLIs gives (the benchmarks parse their own, simpler
flags): `configs/coca.py`, `clip.py` and `siglip.py` through `vlrep.config`, any other file
by path through its `get_config(variant)`."""

from __future__ import annotations

import importlib.util
import os

import ml_collections

from vlrep import variants

_PACKAGED = {'coca': variants.coca, 'clip': variants.clip, 'siglip': variants.siglip}


def load_config(spec: str) -> ml_collections.ConfigDict:
  """`path/to/config.py[:variant]` -> that file's config (its default variant without one)."""
  path, _, variant = spec.partition(':')
  name = os.path.splitext(os.path.basename(path))[0]
  if os.path.basename(os.path.dirname(os.path.abspath(path))) == 'configs' and name in _PACKAGED:
    return _PACKAGED[name](variant or 'tiny')
  module_spec = importlib.util.spec_from_file_location('benchmark_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()
