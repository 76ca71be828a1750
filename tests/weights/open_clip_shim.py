"""Test-only import shim so that `import open_clip` works beside CPU-only torch.

open_clip imports torchvision at module import time (image transforms, FrozenBatchNorm2d)
although the parity tests never use it, and PyPI's torchvision wheel does not load beside
the CPU torch build ('operator torchvision::nms does not exist'). Only when the real
torchvision fails to import do we register placeholder modules whose attributes are inert
classes; anything that actually calls them fails loudly. Only test modules that import
this shim install it (for the rest of that pytest process, where torchvision was unusable
anyway). Import it before `open_clip`.

Not a conftest.py on purpose: tests/ has no __init__.py files, so a second conftest.py is
imported as the module `conftest` too and replaces tests/conftest.py's in sys.modules, and
later `from conftest import load_config` (tests/models, ...) fails in a whole-suite run.
"""

import importlib
import importlib.machinery
import os
import sys
import types


class _InertAttributes(type):
  # Class-level attributes (e.g. `InterpolationMode.BICUBIC` used as a default argument)
  # are read at open_clip's import time; they resolve to their own names.
  def __getattr__(cls, attr):
    if attr.startswith('__'):
      raise AttributeError(attr)
    return f'{cls.__name__}.{attr}'


def _placeholder_module(name: str) -> types.ModuleType:
  module = types.ModuleType(name)

  def __getattr__(attr):
    if attr.startswith('__'):
      raise AttributeError(attr)

    class Unavailable(metaclass=_InertAttributes):  # a class: subclassing, isinstance work
      def __init__(self, *args, **kwargs):
        raise RuntimeError(f'{name}.{attr} is a test stub: torchvision is not importable here')
    Unavailable.__name__ = attr
    return Unavailable

  module.__getattr__ = __getattr__
  module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # find_spec must not raise
  module.__path__ = []  # a package, so submodule imports resolve to further placeholders
  return module


def _install_torchvision_stub() -> None:
  try:
    importlib.import_module('torchvision')
    return
  except Exception:  # ImportError, or RuntimeError from a mismatched operator library
    for key in [k for k in sys.modules if k == 'torchvision' or k.startswith('torchvision.')]:
      del sys.modules[key]
  # open_clip imports transformers, which asks (once, cached) whether torchvision is
  # installed: ask before the stub exists, so that transformers never reaches for it.
  try:
    importlib.import_module('transformers.utils.import_utils').is_torchvision_available()
  except ImportError:
    pass
  for name in ('torchvision', 'torchvision.ops', 'torchvision.ops.misc', 'torchvision.transforms',
               'torchvision.transforms.functional'):
    sys.modules[name] = _placeholder_module(name)
  for name in ('torchvision.ops', 'torchvision.ops.misc', 'torchvision.transforms',
               'torchvision.transforms.functional'):
    parent, _, child = name.rpartition('.')
    setattr(sys.modules[parent], child, sys.modules[name])


try:
  import torch  # noqa: F401  (no torch: the tests skip themselves; nothing to shim)
  _install_torchvision_stub()
except ImportError:
  pass


def require() -> tuple[types.ModuleType, types.ModuleType]:
  """(torch, open_clip). CI installs both (the README's test command), so there a missing
  one is an error; elsewhere the calling test module is skipped."""
  import pytest  # pylint: disable=g-import-not-at-top
  if os.environ.get('CI'):
    return importlib.import_module('torch'), importlib.import_module('open_clip')
  return pytest.importorskip('torch'), pytest.importorskip('open_clip')
