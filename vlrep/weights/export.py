"""Exported models: one self-contained directory that `vlrep.load` reads on any device count.

Layout: `DIR/config.json` (the resolved config, as a run writes it) and
`DIR/params.safetensors` (every parameter as one tensor named by its '/'-joined path in the
Flax tree, e.g. `text/embed/embedding`). Safetensors rather than an Orbax checkpoint: one
plain file with no device layout in it, memory-mapped on reading, and readable without vlrep,
JAX or Orbax (numpy, PyTorch, Rust); an Orbax checkpoint is a directory tree tied to Orbax's
versions. The package reads and writes it through numpy alone (no torch).

This module is also where parameters change form between a tree and named arrays:
`named_arrays(tree)` flattens, `place(named, abstract, source)` fits named arrays into a
model's tree, in its shardings, and fails on any mismatch with one error that names every
missing, unexpected or misshapen array and both shapes (used by `vlrep.load` and
`config.init_from`).
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import safetensors.numpy
from jax.experimental import multihost_utils

from vlrep.config import migrate
from vlrep.models.build import build_model, init_params
from vlrep.parallel import sharding
from vlrep.parallel.chunks import to_host
from vlrep.runtime import paths

CONFIG_FILE = 'config.json'
PARAMS_FILE = 'params.safetensors'
FORMAT = 'vlrep.export/1'


def is_exported(path: str) -> bool:
  """Whether `path` is a directory written by `save`."""
  return paths.isfile(paths.join(path, PARAMS_FILE))


def _key_name(key: Any) -> str:
  return str(getattr(key, 'key', getattr(key, 'idx', key)))


def named_arrays(tree: Any) -> dict[str, Any]:
  """{'a/b/c': leaf} for a tree of arrays (Flax boxes unboxed)."""
  leaves = jax.tree_util.tree_flatten_with_path(nn.unbox(tree))[0]
  return {'/'.join(_key_name(k) for k in path): leaf for path, leaf in leaves}


def _storable(x: np.ndarray) -> np.ndarray:
  # Safetensors' numpy API knows numpy's own dtypes only; bfloat16 and friends are stored
  # as float32 (exact) and cast back to the model's dtype by `place`.
  return x.astype(np.float32) if x.dtype.kind == 'V' or x.dtype.name == 'bfloat16' else x


def save(path: str, config: ml_collections.ConfigDict, params: Any) -> str:
  """Writes `config` and `params` to the directory `path`; returns `path`.

  Every process must call it (gathering sharded arrays is collective); process 0 writes. The
  parameter file is written under a temporary name and renamed, so a reader never sees half.
  """
  arrays = {name: np.asarray(_storable(to_host(x)), order='C')
            for name, x in named_arrays(params).items()}
  path = paths.check(path)
  if jax.process_index() == 0:
    paths.makedirs(path)
    paths.write_text(paths.join(path, CONFIG_FILE), config.to_json(indent=2))
    with paths.writing_locally(paths.join(path, PARAMS_FILE)) as partial:
      safetensors.numpy.save_file(arrays, partial, metadata={'format': FORMAT})
  multihost_utils.sync_global_devices(f'vlrep.export.save:{path}')
  return path


def read_config(path: str) -> ml_collections.ConfigDict:
  """The config saved in a run directory or an exported one, migrated to the current layout
  (`vlrep.config.migrate`)."""
  file = paths.join(path, CONFIG_FILE)
  if not paths.isfile(file):
    raise FileNotFoundError(f'{file} not found: {path!r} is neither a vlrep run directory nor '
                            'an exported model')
  return migrate(json.loads(paths.read_text(file)))


def read_arrays(path: str) -> dict[str, np.ndarray]:
  """The named parameter arrays of an exported directory, as numpy."""
  if not is_exported(path):
    raise FileNotFoundError(f'{paths.join(path, PARAMS_FILE)} not found: {path!r} is not an '
                            'exported vlrep model')
  with paths.reading_locally(paths.join(path, PARAMS_FILE)) as file:
    return safetensors.numpy.load_file(file)


def abstract_params(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Any:
  """The model's parameter tree as ShapeDtypeStructs carrying their shardings on `mesh`."""
  model = build_model(config)
  boxed = jax.eval_shape(lambda: init_params(model, config, jax.random.key(0)))
  shardings = sharding.logical_shardings(boxed, mesh)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      nn.unbox(boxed), shardings)


def _shapes_by_path(tree: Any) -> dict[str, tuple[int, ...]]:
  """'a/b/0/c' -> shape for every leaf; namedtuple fields, dict keys and indices alike (a
  flat {'a/b/c': array} dict gives the same names as the nested tree)."""
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {jax.tree_util.keystr(path, simple=True, separator='/'): tuple(leaf.shape)
          for path, leaf in leaves}


def check_shapes(expected: Any, found: Any, what: str) -> None:
  """Raises ValueError unless `found` has exactly the arrays of `expected`, same shapes.

  `expected`: the tree the config builds (arrays or `jax.ShapeDtypeStruct`s); `found`: the
  same from somewhere else, as a tree or a flat {'a/b/c': array} dict (a checkpoint's
  metadata, an export, converted weights), described by `what` ('the checkpoint'). The
  message names every mismatched, missing or unexpected array with both shapes, so that
  loading the wrong weights says why instead of failing somewhere inside the loader.
  """
  want, have = _shapes_by_path(expected), _shapes_by_path(found)
  problems = [f'{path}: {have[path]} in {what}, {shape} in the config'
              for path, shape in want.items() if path in have and have[path] != shape]
  problems += [f'{path}: not in {what} (the config has {shape})'
               for path, shape in want.items() if path not in have]
  problems += [f'{path}: in {what} {have[path]} but not in the config'
               for path in have if path not in want]
  if problems:
    more = f' (and {len(problems) - 5} more)' if len(problems) > 5 else ''
    raise ValueError(f'the arrays of {what} do not match the config\'s shapes ({len(problems)} '
                     f'arrays): ' +
                     '; '.join(problems[:5]) + more)


def place(named: Mapping[str, Any], abstract: Any, source: str) -> Any:
  """Named arrays (numpy, identical on every process) -> the tree of `abstract`, each array
  cast to its dtype and laid out in its sharding. `source` names them in errors."""
  check_shapes(abstract, named, source)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)

  def one(path, target):
    value = np.asarray(named['/'.join(_key_name(k) for k in path)], target.dtype)
    return jax.make_array_from_callback(target.shape, target.sharding, lambda i: value[i])
  return jax.tree_util.tree_unflatten(treedef, [one(p, t) for p, t in leaves])


def host_arrays(params: Any) -> dict[str, np.ndarray]:
  """Named numpy copies of a parameter tree (collective for arrays spread over processes)."""
  return {name: to_host(x) for name, x in named_arrays(params).items()}
