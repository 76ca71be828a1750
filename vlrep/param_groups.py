"""Parameter groups by path: the frozen parameters (`optim.freeze`) and the factor that
scales each parameter's update (`optim.lr_multipliers`, `optim.layer_decay`).

A parameter's path is its keys joined by '/': 'image_encoder/block_0/self_attention/query/
kernel', or with `model.scan_layers` 'image_encoder/block/self_attention/query/kernel', one
leaf per stack whose axis 0 is the layer. A pattern is a Python regular expression matched
against the WHOLE path (`re.fullmatch`): 'image_encoder/.*' is the image tower, while
'block_1/.*' matches nothing (paths start at the top) and 'image_encoder/block_1/.*' does not
take block_10 with it. A pattern that matches no parameter is an error naming it, raised when
the optimizer first sees the parameters (`tx.init`, before anything compiles in
`vlrep.train`), so that a typo cannot silently train what it meant to freeze.
"""

from __future__ import annotations

import difflib
import math
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax

FROZEN, TRAINABLE = 'frozen', 'trainable'

# Layer-wise decay (`layer_decay`): each tower's stacks of blocks (the BlockStack names in
# vlrep/models), and per tower the stack that its embeddings feed, with the names of those
# pre-block parameters (the stem, patch and position embeddings, class token and ln_pre of
# the image encoder; the token and position embeddings and [CLS] of the text decoder).
# Everything else is after the blocks (final norms, ln_cls, the output head, poolers,
# projections, temperature) and keeps 1.
STACKS = {'image_encoder': ('block',), 'text_decoder': ('unimodal', 'multimodal')}
EMBEDDINGS = {'image_encoder': ('block', r'stem_conv_\d+|patch_embed|cls_embed|pos_embed|ln_pre'),
              'text_decoder': ('unimodal', r'token_embed|pos_embed|cls_embed|mask_embed')}


def path_name(path: Sequence[Any]) -> str:
  """'a/b/c' from a key path; the attribute keys of boxed (nn.Partitioned) leaves are not
  part of the name, so boxed and unboxed parameters name alike."""
  return '/'.join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def _names(tree: Any) -> list[str]:
  return [path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def compile_patterns(patterns: Sequence[str], field: str) -> tuple[re.Pattern, ...]:
  """The patterns compiled; a pattern that is not a string or not a regex raises ValueError."""
  if isinstance(patterns, str):
    raise ValueError(f'{field}={patterns!r} must be a tuple of patterns, e.g. ({patterns!r},)')
  compiled = []
  for pattern in patterns:
    try:
      compiled.append(re.compile(pattern))
    except (re.error, TypeError) as e:
      raise ValueError(f'{field}: {pattern!r} is not a regular expression ({e})') from e
  return tuple(compiled)


def _check_all_match(patterns: Sequence[re.Pattern], names: Sequence[str], field: str) -> None:
  for pattern in patterns:
    if not any(pattern.fullmatch(name) for name in names):
      closest = difflib.get_close_matches(pattern.pattern, names, n=1, cutoff=0.0)
      raise ValueError(f'{field}: {pattern.pattern!r} matches no parameter (patterns match '
                       f'the whole path; the closest path: {closest[0] if closest else None!r})')


def frozen_mask(params: Any, freeze: Sequence[str]) -> Any:
  """True for each leaf that `freeze` (patterns) matches; raises if a pattern matches none."""
  patterns = compile_patterns(freeze, 'optim.freeze')
  _check_all_match(patterns, _names(params), 'optim.freeze')
  return jax.tree_util.tree_map_with_path(
      lambda p, _: any(q.fullmatch(path_name(p)) for q in patterns), params)


def stop_frozen(params: Any, freeze: Sequence[str]) -> Any:
  """`params` with stop_gradient on the frozen leaves: differentiated through this, their
  gradients are zeros that JAX never computes (no weight-gradient products, and no backward
  pass at all through a frozen tower whose input is not differentiated)."""
  if not freeze:
    return params
  return jax.tree.map(lambda x, frozen: jax.lax.stop_gradient(x) if frozen else x,
                      params, frozen_mask(params, freeze))


def keep_frozen(new: Any, old: Any, freeze: Sequence[str]) -> Any:
  """`new` with the frozen leaves taken from `old` as they were: `old + 0` would turn -0.0
  into +0.0."""
  if not freeze:
    return new
  return jax.tree.map(lambda n, o, frozen: o if frozen else n, new, old,
                      frozen_mask(old, freeze))


def partition_frozen(tx: optax.GradientTransformation,
                     freeze: Sequence[str]) -> optax.GradientTransformation:
  """`tx` on the trainable leaves only; the frozen ones get zero updates and no state
  (optax.MaskedNode in place of their moments), weigh nothing in `tx`'s clipping norm and
  are not decayed."""
  compile_patterns(freeze, 'optim.freeze')  # a bad regex fails when the optimizer is built
  def labels(params):
    return jax.tree.map(lambda frozen: FROZEN if frozen else TRAINABLE,
                        frozen_mask(params, freeze))
  partitioned = optax.partition({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, labels)

  def init(params):
    # Boxed parameters (nn.Partitioned, as the train state is built) leave each frozen
    # leaf's MaskedNode in a box of its own; unboxed it is an empty node, like the
    # MaskedNode of unboxed parameters, which the shardings and checkpoints skip.
    return jax.tree.map(lambda x: x.value if _boxed_masked_node(x) else x,
                        partitioned.init(params), is_leaf=_boxed_masked_node)
  return optax.GradientTransformation(init, partitioned.update)


def _boxed_masked_node(x: Any) -> bool:
  return isinstance(x, nn.Partitioned) and isinstance(x.value, optax.MaskedNode)


def parse_lr_multipliers(entries: Sequence[str]) -> tuple[tuple[re.Pattern, float], ...]:
  """'REGEX=FACTOR' entries as (pattern, factor) pairs, split at the last '=' (a regex may
  hold one); a malformed entry raises ValueError naming it."""
  if isinstance(entries, str):
    raise ValueError(f'optim.lr_multipliers={entries!r} must be a tuple of REGEX=FACTOR '
                     f'strings, e.g. ({entries!r},)')
  parsed = []
  for entry in entries:
    pattern, sep, factor = str(entry).rpartition('=')
    try:
      value = float(factor)
    except ValueError:
      value = math.nan
    if not sep or not pattern or not math.isfinite(value) or value < 0:
      raise ValueError(f'optim.lr_multipliers: {entry!r} is not REGEX=FACTOR with a finite '
                       'FACTOR >= 0')
    (compiled,) = compile_patterns([pattern], f'optim.lr_multipliers entry {entry!r}')
    parsed.append((compiled, value))
  return tuple(parsed)


def check_layer_decay(layer_decay: float) -> float:
  layer_decay = float(layer_decay)
  if not (layer_decay == 0.0 or 0.0 < layer_decay <= 1.0):
    raise ValueError(f'optim.layer_decay={layer_decay}; expected 0 (off) or in (0, 1]')
  return layer_decay


def _stack_depths(leaves: Sequence[tuple[str, Any]]) -> dict[str, int]:
  """'tower/stack' -> its number of blocks: counted from `stack_<i>` children, or the length
  of axis 0 of a scanned stack's leaves."""
  depths: dict[str, int] = {}
  for name, leaf in leaves:
    tower, _, rest = name.partition('/')
    for stack in STACKS.get(tower, ()):
      child = rest.split('/', 1)[0]
      if child == stack:
        depths[f'{tower}/{stack}'] = int(np.shape(leaf)[0])
      elif re.fullmatch(rf'{stack}_(\d+)', child):
        depth = int(child[len(stack) + 1:]) + 1
        depths[f'{tower}/{stack}'] = max(depth, depths.get(f'{tower}/{stack}', 0))
  return depths


def _layer_decay_factor(name: str, leaf: Any, depths: dict[str, int],
                        layer_decay: float) -> float | np.ndarray:
  tower, _, rest = name.partition('/')
  child = rest.split('/', 1)[0]
  for stack in STACKS.get(tower, ()):
    depth = depths.get(f'{tower}/{stack}', 0)
    if child == stack:  # scanned: block i along axis 0
      exponents = depth - np.arange(depth, dtype=np.float64)
      return (layer_decay ** exponents).reshape((depth,) + (1,) * (np.ndim(leaf) - 1))
    if re.fullmatch(rf'{stack}_(\d+)', child):
      return layer_decay ** (depth - int(child[len(stack) + 1:]))
  if tower in EMBEDDINGS and re.fullmatch(EMBEDDINGS[tower][1], child):
    return layer_decay ** (depths.get(f'{tower}/{EMBEDDINGS[tower][0]}', 0) + 1)
  return 1.0


def lr_multipliers(params: Any, entries: Sequence[str], layer_decay: float) -> Any:
  """Each leaf's update factor: its first matching `entries` factor (else 1) times its layer
  decay (0 = off). Python floats, or for a scanned stack under layer decay a float64
  array [L, 1, ...] along the layer axis. Raises if an entry's pattern matches nothing."""
  parsed = parse_lr_multipliers(entries)
  layer_decay = check_layer_decay(layer_decay)
  leaves = [(path_name(p), x) for p, x in jax.tree_util.tree_leaves_with_path(params)]
  _check_all_match([q for q, _ in parsed], [n for n, _ in leaves], 'optim.lr_multipliers')
  depths = _stack_depths(leaves)

  def factor(path, leaf):
    name = path_name(path)
    value = next((f for q, f in parsed if q.fullmatch(name)), 1.0)
    if layer_decay not in (0.0, 1.0):
      value = value * _layer_decay_factor(name, leaf, depths, layer_decay)
    return value
  return jax.tree_util.tree_map_with_path(factor, params)


def scale_by_lr_multipliers(entries: Sequence[str],
                            layer_decay: float) -> optax.GradientTransformation:
  """Scales each leaf's update by its `lr_multipliers` factor; stateless. After
  scale_by_learning_rate it scales the whole step, the decoupled weight decay included."""
  parse_lr_multipliers(entries)  # malformed entries fail when the optimizer is built
  check_layer_decay(layer_decay)

  def init(params):
    lr_multipliers(params, entries, layer_decay)  # a pattern matching nothing fails here
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    factors = lr_multipliers(updates, entries, layer_decay)
    def scale(u, f):
      if isinstance(f, float) and f == 1.0:
        return u
      return u * np.asarray(f, dtype=u.dtype)
    return jax.tree.map(scale, updates, factors), state
  return optax.GradientTransformation(init, update)
