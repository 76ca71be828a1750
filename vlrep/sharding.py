"""Device mesh from config, the logical-axis rules, and the shardings of state and batches.

The only module that knows mesh axis names. Parameters carry logical names (`embed`,
`mlp`, `heads`, `vocab`, ...); `LOGICAL_RULES` maps them to the mesh axes `data`, `fsdp` and
`tensor`: parameters are sharded FSDP-style over `fsdp` and Megatron-style over `tensor`,
batches over (`data`, `fsdp`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')

LOGICAL_RULES = (
    ('batch', BATCH_AXES),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('vocab', 'tensor'),
    ('kv', None),
    ('length', None),
    ('act_embed', None),
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
              devices: list[jax.Device] | None = None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension over the batch axes, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def logical_shardings(abstract_tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for a tree whose leaves may be `nn.LogicallyPartitioned` boxes."""
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_RULES)


def batch_size_per_process(global_batch: int, mesh: Mesh) -> int:
  """This process's share of a global batch, which must divide over the batch axes."""
  batch_devices = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
  if global_batch % batch_devices:
    raise ValueError(f'batch_size {global_batch} does not divide over the {batch_devices} '
                     f'devices of the batch axes {BATCH_AXES}')
  return global_batch // jax.process_count()
