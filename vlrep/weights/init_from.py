"""`config.init_from`: start a training run from weights trained elsewhere.

`config.init_from` is one of
  DIR                                a vlrep run directory (the parameters of its latest
                                     checkpoint, their EMA if it kept one, as `vlrep.load`)
                                     or a directory written by `Pretrained.save`;
  open_clip:STATE_DICT:MODEL_CFG     an open_clip state dict file and its model config JSON
                                     (open_clip's `model_configs/*.json` format), converted
                                     by `vlrep.weights.open_clip` (the last ':' separates them);
  hf:DIR                             a transformers CLIPModel / SiglipModel directory,
                                     converted by `vlrep.weights.hf`.
Only parameters are taken: the step, the optimizer state and the data stream start afresh.
The train loop applies it only to a run with no checkpoint of its own, so a resumed run
continues from its own checkpoint. The weights must fit the run's model exactly (same
architecture and sizes); otherwise one error names every missing, unexpected or misshapen
array with both shapes (`export.check_shapes`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax

from vlrep.runtime import paths
from vlrep.weights import export

OPEN_CLIP_PREFIX = 'open_clip:'
HF_PREFIX = 'hf:'


def _open_clip_arrays(spec: str) -> dict[str, Any]:
  state_dict, sep, model_cfg = spec[len(OPEN_CLIP_PREFIX):].rpartition(':')
  if not sep or not state_dict or not model_cfg:
    raise ValueError(f'init_from={spec!r}: expected open_clip:STATE_DICT_PATH:MODEL_CFG_JSON')
  for path in (state_dict, model_cfg):
    if not paths.isfile(path):
      raise FileNotFoundError(f'init_from={spec!r}: {path!r} not found')
  cfg = json.loads(paths.read_text(model_cfg))
  cfg = cfg.get('model_cfg', cfg)  # open_clip_config.json nests it
  # Imported here: the conversion needs open_clip's layout, not every run does.
  from vlrep.weights import open_clip  # pylint: disable=g-import-not-at-top
  with paths.reading_locally(state_dict) as local_state_dict:
    return export.host_arrays(open_clip.load_open_clip(local_state_dict, cfg).params)


def _hf_arrays(spec: str) -> dict[str, Any]:
  path = paths.local(spec[len(HF_PREFIX):])
  if paths.is_remote(path):
    raise ValueError(f'init_from={spec!r}: transformers directories are read locally; copy '
                     'it down first')
  if not os.path.isdir(path):
    raise FileNotFoundError(f'init_from={spec!r}: {path!r} is not a directory')
  from vlrep.weights import hf  # pylint: disable=g-import-not-at-top
  return export.named_arrays(hf.convert_dir(path)[1])


def _run_arrays(path: str) -> dict[str, Any]:
  from vlrep.runtime import checkpoint  # pylint: disable=g-import-not-at-top
  config = export.read_config(path)
  # Restored in the shapes of the run that wrote them, so that a mismatch with this run's
  # model is reported by name rather than as an Orbax restore error.
  return export.host_arrays(checkpoint.restore_params(path, config))


def named_arrays(spec: str) -> dict[str, Any]:
  """The named parameter arrays (numpy, on every process) that `spec` points to."""
  if spec.startswith(OPEN_CLIP_PREFIX):
    return _open_clip_arrays(spec)
  if spec.startswith(HF_PREFIX):
    return _hf_arrays(spec)
  path = paths.local(paths.check(spec))
  if export.is_exported(path):
    return export.read_arrays(path)
  return _run_arrays(path)  # fails, naming the path, if it is not a run directory either


def load_params(spec: str, like: Any) -> Any:
  """The parameters `spec` points to, in the shapes, dtypes and shardings of the tree of
  arrays `like` (the new run's own initial parameters)."""
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          like)
  return export.place(named_arrays(spec), abstract, f'init_from={spec!r}')
