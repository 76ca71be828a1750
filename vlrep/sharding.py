"""Device mesh from config, the logical-axis rules, and the shardings of state and batches.

The only module that knows mesh axis names. Parameters carry logical names (`embed`,
`mlp`, `heads`, `vocab`, ...); `LOGICAL_RULES` maps them to the mesh axes `data`, `fsdp` and
`tensor`: parameters are sharded FSDP-style over `fsdp` and Megatron-style over `tensor`,
batches over (`data`, `fsdp`).
"""

from __future__ import annotations

from typing import Any, Sequence

from absl import logging
import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')
# Every device on the data axis: the mesh for inference and for loading weights.
DATA_PARALLEL = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1})

LOGICAL_RULES = (
    ('batch', BATCH_AXES),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('vocab', 'tensor'),
    ('kv', None),
    ('length', None),
    ('act_embed', None),
    ('layers', None),
)


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """Axis sizes for `config.mesh` (one may be -1: the rest), checked against the devices."""
  sizes = [int(mesh_config[axis]) for axis in MESH_AXES]
  unknown = [axis for axis, size in zip(MESH_AXES, sizes) if size == -1]
  if len(unknown) > 1 or any(size == 0 or size < -1 for size in sizes):
    raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))}: give positive sizes, at most one -1')
  known = int(np.prod([s for s in sizes if s != -1]))
  if unknown:
    if num_devices % known:
      raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))} does not divide {num_devices} devices')
    sizes[MESH_AXES.index(unknown[0])] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))} has {int(np.prod(sizes))} devices, '
                     f'but {num_devices} are available')
  return tuple(sizes)


def make_mesh(mesh_config: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The `config.mesh` mesh over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension over the batch axes, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def _fit(sharding: NamedSharding, shape: tuple[int, ...], path: str) -> NamedSharding:
  """`sharding`, with each dimension that does not divide over its mesh axes replicated.

  So any model runs on any mesh (e.g. the tiny model's 259-token vocabulary on tensor=2);
  such a dimension is only stored redundantly, and the log says which.
  """
  spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
  for dim, axes in enumerate(spec):
    if axes is None:
      continue
    ways = int(np.prod([sharding.mesh.shape[a] for a in np.atleast_1d(axes)]))
    if shape[dim] % ways:
      logging.warning('%s: dimension %d (%d) does not divide over mesh axes %s (%d ways); '
                      'replicated along them instead', path, dim, shape[dim], axes, ways)
      spec[dim] = None
  return NamedSharding(sharding.mesh, PartitionSpec(*spec))


def logical_shardings(abstract_tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for a tree whose leaves may be `nn.LogicallyPartitioned` boxes."""
  specs = nn.get_partition_spec(abstract_tree)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_RULES)
  return jax.tree_util.tree_map_with_path(
      lambda path, s, x: _fit(s, x.shape, jax.tree_util.keystr(path)), shardings,
      nn.unbox(abstract_tree))


def constrain_microbatches(x: jax.Array, mesh: Mesh) -> jax.Array:
  """Microbatches [K, B/K, ...]: each one spread over the batch axes like a whole batch."""
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(None, BATCH_AXES)))


def batch_devices(mesh: Mesh) -> int:
  """How many ways a batch is split: the product of the batch axes' sizes."""
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def batch_size_per_process(global_batch: int, mesh: Mesh, microbatches: int = 1) -> int:
  """This process's share of a global batch; each microbatch must divide over the batch axes."""
  devices = batch_devices(mesh)
  if global_batch % (microbatches * devices):
    what = f'{microbatches} microbatches of ' if microbatches > 1 else ''
    raise ValueError(f'batch_size {global_batch} does not divide into {what}{devices} equal '
                     f'parts, one per device of the batch axes {BATCH_AXES} '
                     f'(mesh {dict(mesh.shape)})')
  return global_batch // jax.process_count()
