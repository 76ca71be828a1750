"""The benchmarks' config loader: `load_config('configs/coca.py:small')` reads a config file by
path and calls its `get_config(variant)`, as the `--config=FILE:VARIANT` flag of the CLIs does
(the benchmarks parse their own, simpler flags)."""

from __future__ import annotations

import importlib.util

import ml_collections


def load_config(spec: str) -> ml_collections.ConfigDict:
  """`path/to/config.py[:variant]` -> that file's config (its default variant without one)."""
  path, _, variant = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('benchmark_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()
