"""`config.init_from`: start a training run from weights trained elsewhere, whole or in part.

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
continues from its own checkpoint.

`config.init_from_include` / `init_from_exclude` (regular expressions, each matched with
`re.fullmatch` against the '/'-joined parameter paths, e.g. `text_decoder/multimodal_0/...`)
choose the parameters taken: those matching an include pattern (all when there is none) and
no exclude pattern. The others keep the new run's own initialisation, and arrays of the
source that are not chosen are ignored. A chosen parameter the source lacks, a source array
the run's model lacks that is not left out, and an include pattern matching no parameter of
the run (an exclude pattern matching nothing in either) are errors naming them.

Two shape differences are bridged, each logged with both shapes: the image position
embedding is resized by 2-D interpolation of its patch grid (another `data.image_size` or
patch size), and the text position embedding is cut or extended (another
`data.max_text_len`). Every other mismatch fails with one error naming every misshapen
array with both shapes (`export.check_shapes`).
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging

from vlrep import param_groups
from vlrep.runtime import paths
from vlrep.weights import export

OPEN_CLIP_PREFIX = 'open_clip:'
HF_PREFIX = 'hf:'
PATTERN_FIELDS = ('init_from_include', 'init_from_exclude')
# models/coca.py's towers and their `pos_embed` parameters (models/vision.py, models/text.py).
IMAGE_POS_EMBED = 'image_encoder/pos_embed'
TEXT_POS_EMBED = 'text_decoder/pos_embed'


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


def _patterns(config: ml_collections.ConfigDict, field: str) -> tuple[re.Pattern, ...]:
  return param_groups.compile_patterns(config[field], field)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError on `init_from_include` / `init_from_exclude` values that cannot work
  (`vlrep.train.validate` calls it before anything compiles)."""
  for field in PATTERN_FIELDS:
    _patterns(config, field)
    if config[field] and not config.init_from:
      raise ValueError(f'{field}={tuple(config[field])!r} needs init_from (the weights to '
                       'take part of); it is empty')


def _selector(config: ml_collections.ConfigDict, target: list[str], source: list[str],
              what: str) -> Callable[[str], bool]:
  """name -> whether the parameter is taken; fails naming a pattern that matches nothing."""
  include, exclude = (_patterns(config, field) for field in PATTERN_FIELDS)
  # An exclude pattern may name only source arrays (a CLIP run from a CoCa one leaves out
  # the decoder it lacks); an include pattern must choose something this run has.
  unmatched = [f'init_from_include {p.pattern!r}' for p in include
               if not any(p.fullmatch(n) for n in target)]
  unmatched += [f'init_from_exclude {p.pattern!r}' for p in exclude
                if not any(p.fullmatch(n) for n in (*target, *source))]
  if unmatched:
    tops = sorted({n.split('/')[0] for n in target})
    raise ValueError(f'{what}: no parameter matches {", ".join(unmatched)} (a pattern must '
                     "match a whole '/'-joined path, e.g. 'image_encoder/.*'; this run's "
                     f'parameters start with {", ".join(tops)})')

  def taken(name: str) -> bool:
    return ((not include or any(p.fullmatch(name) for p in include)) and
            not any(p.fullmatch(name) for p in exclude))
  return taken


def _square_side(rows: int, prefix: int) -> int:
  """The side of the square patch grid of `rows` position rows after `prefix` (0 if none)."""
  side = math.isqrt(max(rows - prefix, 0))
  return side if side and side * side == rows - prefix else 0


def resize_image_pos_embed(old: np.ndarray, rows: int, class_token: bool) -> np.ndarray | None:
  """[g1*g1 (+1), W] -> [rows, W] by 2-D bilinear interpolation of the g1 x g1 patch grid
  (row-major, as `VisionTransformer` flattens it); None if either is not such a grid.

  The class token's row (first, with `class_token`) is no grid position: kept as it is.
  Bilinear, as big_vision and the original ViT resize position embeddings: it never
  overshoots the trained values, and JAX's bicubic would not reproduce open_clip's / timm's
  PyTorch bicubic resize anyway (another kernel coefficient and edge handling). Shrinking is
  antialiased (`jax.image.resize`'s default), as theirs is.
  """
  prefix = int(class_token)
  old_side, new_side = _square_side(old.shape[0], prefix), _square_side(rows, prefix)
  if not old_side or not new_side:
    return None
  grid = np.asarray(old[prefix:], np.float32).reshape(old_side, old_side, -1)
  grid = np.asarray(jax.image.resize(grid, (new_side, new_side, grid.shape[-1]), 'bilinear'))
  return np.concatenate([np.asarray(old[:prefix], np.float32),
                         grid.reshape(new_side * new_side, -1)])


def resize_text_pos_embed(old: np.ndarray, rows: int, cls_last: bool,
                          fresh: Callable[[], np.ndarray]) -> np.ndarray:
  """The text position table [L1 (+1), W] cut or extended to [rows, W].

  With `cls_last` the last row is the [CLS] token's (text `cls_position='last'`), kept
  aside; otherwise every row is a position (without [CLS], or with 'after_tokens', where a
  caption of length l puts [CLS] at row l). Shorter: the first positions. Longer: every
  trained position is kept as it is and the new ones take this run's own initialisation
  (the rows of `fresh()`, called only then), rather than a stretch of the table by
  interpolation, which would move every position the text tower learned (Long-CLIP, Zhang
  et al. 2024, found stretching all of them hurts short captions): captions that fitted
  before are embedded exactly as before, and the new positions are learned like any fresh
  parameter.
  """
  cls_rows = int(cls_last)
  old_len, new_len = old.shape[0] - cls_rows, rows - cls_rows
  positions = np.asarray(old[:min(old_len, new_len)], np.float32)
  if new_len > old_len:
    positions = np.concatenate([positions, np.asarray(fresh()[old_len:new_len], np.float32)])
  return np.concatenate([positions, np.asarray(old[old_len:], np.float32)])


def _resized(source: dict[str, Any], target: dict[str, Any],
             model: ml_collections.ConfigDict) -> dict[str, Any]:
  """`source` with its position embeddings fitted to `target`'s shapes where they differ
  only in the number of positions (and the image one is a square grid in both)."""
  out = dict(source)
  for name in (IMAGE_POS_EMBED, TEXT_POS_EMBED):
    if name not in source or name not in target:
      continue
    old, new = source[name], target[name]
    if old.shape == new.shape or old.ndim != 2 or new.ndim != 2 or old.shape[1] != new.shape[1]:
      continue  # equal, or a mismatch check_shapes reports
    if name == IMAGE_POS_EMBED:
      resized = resize_image_pos_embed(old, new.shape[0], model.vision.class_token)
      how = 'by bilinear 2-D interpolation of the patch grid'
    else:
      cls_last = model.text.embed_cls and model.text.cls_position == 'last'
      # A collective for a sharded array: every process takes this branch alike.
      resized = resize_text_pos_embed(old, new.shape[0], cls_last,
                                      lambda: export.host_arrays({name: new})[name])
      how = 'cut' if new.shape[0] < old.shape[0] else 'extended with fresh positions'
    if resized is not None:
      logging.info('init_from: %s resized from %s to %s, %s', name, tuple(old.shape),
                   tuple(new.shape), how)
      out[name] = resized
  return out


def load_params(spec: str, like: Any, config: ml_collections.ConfigDict | None = None) -> Any:
  """The parameters `spec` points to, in the shapes, dtypes and shardings of the tree of
  arrays `like` (the new run's own initial parameters).

  `config`: the new run's config; its `init_from_include` / `init_from_exclude` choose the
  arrays taken (the others are `like`'s), and its model's layout says which position rows
  are no positions when a position embedding is resized. Without it every array is taken
  and must fit exactly.
  """
  what = f'init_from={spec!r}'
  source, target = named_arrays(spec), export.named_arrays(like)
  if config is not None:
    taken = _selector(config, list(target), list(source), what)
    source = _resized({n: a for n, a in source.items() if taken(n)},
                      {n: a for n, a in target.items() if taken(n)}, config.model)
    chosen = [n for n in target if taken(n)]
  else:
    chosen = list(target)
  abstract = {n: jax.ShapeDtypeStruct(target[n].shape, target[n].dtype,
                                      sharding=target[n].sharding) for n in chosen}
  try:
    placed = export.place(source, abstract, what)
  except ValueError as e:
    if config is None:
      raise
    raise ValueError(f'{e}. init_from_include / init_from_exclude take part of the weights '
                     '(README "Weights in and out")') from None
  if len(chosen) < len(target):
    logging.info('init_from: %d of %d parameter arrays taken from %s; the other %d keep this '
                 "run's initialisation", len(chosen), len(target), spec,
                 len(target) - len(chosen))
  return jax.tree.unflatten(jax.tree.structure(like), [placed.get(n, target[n]) for n in target])
