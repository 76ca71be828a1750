"""Device mesh from config, the logical-axis rules, and the shardings of state and batches.

The only module that knows mesh axis names. Parameters carry logical names (`embed`,
`mlp`, `heads`, `vocab`, ...); `LOGICAL_RULES` maps them to the mesh axes `data`, `fsdp` and
`tensor`: parameters are sharded FSDP-style over `fsdp` and Megatron-style over `tensor`,
batches over (`data`, `fsdp`). Activations carry logical names too; `axis_rules(mesh)` puts
the rules in effect while a model is traced, so their constraints apply. The mesh follows the
devices' topology (`jax.experimental.mesh_utils`): `tensor` and `fsdp` on the fast
interconnect, and only the axes named by `mesh.dcn_*` across slices or hosts.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

from absl import logging
import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')
# Every device on the data axis: the mesh for inference and for loading weights.
DATA_PARALLEL = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1})
# The `config.mesh` fields beyond the axis sizes, with their defaults (vlrep/config.py takes
# them from here; `mesh_option` gives them to hand-built mesh configs such as DATA_PARALLEL).
MESH_DEFAULTS = {
    # How many ways the data / fsdp axis crosses the slow links (DCN between TPU slices, the
    # network between GPU hosts): the product must be the number of slices, or of processes
    # when the devices are one slice. 1 and 1: everything on one slice's interconnect.
    'dcn_data': 1,
    'dcn_fsdp': 1,
    # A parameter or optimizer-state array with a dimension that does not divide over its mesh
    # axes is replicated along them; above this many bytes (the whole array) that is an error
    # naming the array instead, since it would be stored whole on every device. -1: no limit.
    'replicate_max_bytes': 4 << 20,
}
DCN_AXES = ('data', 'fsdp')

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


def mesh_option(mesh_config: ml_collections.ConfigDict, name: str) -> Any:
  """`config.mesh.<name>`, or its default for a mesh config of axis sizes only (DATA_PARALLEL,
  the tests' and benchmarks' meshes; a saved config has every field after `config.migrate`)."""
  return mesh_config.get(name, MESH_DEFAULTS[name])


def _slice_count(devices: Sequence[jax.Device]) -> int:
  return len({getattr(d, 'slice_index', None) or 0 for d in devices})


def make_mesh(mesh_config: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The `config.mesh` mesh over `devices` (default: every device of every process).

  Axes are ordered (data, fsdp, tensor) by increasing traffic, which is the order
  `mesh_utils` lays out on the physical topology: on a TPU torus `tensor` takes the nearest
  chips. With `mesh.dcn_data` / `mesh.dcn_fsdp` the mesh is a hybrid one: those ways of the
  axis go across slices (TPU multislice) or processes (GPU hosts), the rest within each.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  dcn = tuple(int(mesh_option(mesh_config, f'dcn_{axis}')) if axis in DCN_AXES else 1
              for axis in MESH_AXES)
  for axis, size, ways in zip(MESH_AXES, shape, dcn):
    if ways < 1 or size % ways:
      raise ValueError(f'mesh.dcn_{axis}={ways} does not divide mesh.{axis}={size}')
  slices = _slice_count(devices)
  granules = int(np.prod(dcn))
  if granules == 1:
    if slices > 1:
      raise ValueError(f'the devices span {slices} slices: set mesh.dcn_data (and/or '
                       f'mesh.dcn_fsdp) so that their product is {slices}')
    array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  else:
    by_process = slices == 1
    count = len({d.process_index for d in devices}) if by_process else slices
    if granules != count:
      raise ValueError(f'mesh.dcn_data x mesh.dcn_fsdp = {granules}, but the devices are '
                       f'{count} {"processes" if by_process else "slices"}')
    inner = tuple(size // ways for size, ways in zip(shape, dcn))
    array = mesh_utils.create_hybrid_device_mesh(inner, dcn, devices,
                                                 process_is_granule=by_process,
                                                 allow_split_physical_axes=True)
  return Mesh(array, MESH_AXES)


@contextlib.contextmanager
def axis_rules(mesh: Mesh) -> Iterator[None]:
  """`LOGICAL_RULES` in effect over `mesh` while a model is traced (inside or outside jit),
  so that its activations' `nn.with_logical_constraint`s apply (without rules Flax drops them)."""
  with nn.logical_axis_rules(LOGICAL_RULES), jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    yield


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension over the batch axes, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def _fit(sharding: NamedSharding, x: Any, path: str, max_bytes: int,
         replicated: list[dict[str, Any]]) -> NamedSharding:
  """`sharding`, with each dimension that does not divide over its mesh axes replicated.

  So a small model runs on any mesh (e.g. the tiny model's 259-token vocabulary on
  tensor=2): such a dimension is only stored redundantly; the log says which, and each is
  appended to `replicated`. An array over `max_bytes` (>= 0) fails instead.
  """
  shape = tuple(x.shape)
  spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
  for dim, axes in enumerate(spec):
    if axes is None:
      continue
    ways = int(np.prod([sharding.mesh.shape[a] for a in np.atleast_1d(axes)]))
    if shape[dim] % ways:
      nbytes = int(np.prod(shape)) * np.dtype(x.dtype).itemsize
      what = (f'{path} {shape}: dimension {dim} ({shape[dim]}) does not divide over mesh '
              f'axes {axes} ({ways} ways)')
      if 0 <= max_bytes < nbytes:
        raise ValueError(f'{what}; replicated, all {nbytes:,} bytes of it would be '
                         f'on every device. Choose mesh sizes that divide it, or raise '
                         f'mesh.replicate_max_bytes (now {max_bytes})')
      logging.warning('%s; replicated along them instead', what)
      replicated.append({'array': path, 'shape': list(shape), 'dim': dim,
                         'axes': list(np.atleast_1d(axes)), 'bytes': nbytes})
      spec[dim] = None
  return NamedSharding(sharding.mesh, PartitionSpec(*spec))


def logical_shardings(abstract_tree: Any, mesh: Mesh,
                      replicate_max_bytes: int = MESH_DEFAULTS['replicate_max_bytes'],
                      replicated: list[dict[str, Any]] | None = None) -> Any:
  """NamedShardings for a tree whose leaves may be `nn.LogicallyPartitioned` boxes.

  Arrays replicated because a dimension does not divide are appended to `replicated`.
  """
  replicated = [] if replicated is None else replicated
  specs = nn.get_partition_spec(abstract_tree)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_RULES)
  return jax.tree_util.tree_map_with_path(
      lambda path, s, x: _fit(s, x, jax.tree_util.keystr(path), int(replicate_max_bytes),
                              replicated),
      shardings, nn.unbox(abstract_tree))


def constrain_microbatches(x: jax.Array, mesh: Mesh) -> jax.Array:
  """Microbatches [K, B/K, ...]: each one spread over the batch axes like a whole batch."""
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(None, BATCH_AXES)))


def batch_shard_count(mesh: Mesh | None, axes: tuple[str, ...]) -> int:
  """How many shards `per_batch_shard(..., axes)` runs: the product of `axes`' sizes, or 1
  where it runs its function whole."""
  if mesh is None:
    return 1
  # XLA's SPMD partitioner fails a check (spmd_partitioner_util.cc, jax 0.10.2) on a
  # shard_map manual over some axes that leaves two or more others of size > 1 to it: the
  # function then runs whole, with the same result, reduced in each iteration as before.
  if sum(mesh.shape[a] > 1 for a in MESH_AXES if a not in axes) > 1:
    return 1
  return int(np.prod([mesh.shape[a] for a in axes]))


def per_batch_shard(fn: Callable[..., Any], mesh: Mesh | None, in_axes: tuple[int | None, ...],
                    axes: tuple[str, ...] = ('data',)) -> Callable[..., Any]:
  """`fn` run on each shard of the batch over mesh `axes` (some of `BATCH_AXES`) on its own,
  its outputs stacked on a new leading axis of that many shards.

  Arguments with `in_axes` 0 are batches [B, ...] sharded over the batch axes: each shard of
  `axes` gets the rows its devices hold, so nothing moves; arguments with `in_axes` None are
  passed whole. `fn` runs under `shard_map` manual over `axes` only (the other axes stay
  XLA's to partition); inside it `batch` activations map to the batch axes not in `axes`.
  Why: a gradient taken per shard is a local sum, so one accumulated over a loop
  (microbatches, caption slices) needs no reduction over `axes` until the caller sums the [S]
  axis once, where XLA reduces it in every iteration.
  """
  if batch_shard_count(mesh, axes) == 1:
    return lambda *args: jax.tree.map(lambda x: x[None], fn(*args))
  rest = tuple(a for a in BATCH_AXES if a not in axes) or None
  inner_rules = tuple((name, rest) if name == 'batch' else (name, mesh_axes)
                      for name, mesh_axes in LOGICAL_RULES)

  def local(*args):
    with nn.logical_axis_rules(inner_rules):
      out = fn(*args)
    return jax.tree.map(lambda x: x[None], out)
  in_specs = tuple(PartitionSpec(axes) if axis == 0 else PartitionSpec() for axis in in_axes)
  return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=PartitionSpec(axes),
                       axis_names=frozenset(axes), check_vma=False)


def constrain_batch_shards(tree: Any, mesh: Mesh | None, axes: tuple[str, ...] = ('data',)
                           ) -> Any:
  """Arrays [S, ...] from `per_batch_shard`: the leading axis on `axes`, the rest as XLA
  propagates (a parameter's own sharding), so an accumulator of them stays per shard."""
  if batch_shard_count(mesh, axes) == 1:
    return tree
  return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
      x, NamedSharding(mesh, PartitionSpec(axes, *[PartitionSpec.UNCONSTRAINED] *
                                           (x.ndim - 1)))), tree)


def batch_devices(mesh: Mesh) -> int:
  """How many ways a batch is split: the product of the batch axes' sizes."""
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def process_rows(batch: NamedSharding, global_batch: int) -> np.ndarray:
  """The rows of a global batch this process's devices hold under `batch`, sorted: what it
  must read for `jax.make_array_from_process_local_data`. A contiguous share of B/P rows
  when only the batch axes span processes; with `tensor` (or part of `fsdp`) spanning them,
  processes hold the same rows, or rows from several places of the batch."""
  indices = batch.addressable_devices_indices_map((global_batch,)).values()
  rows = set()
  for (index,) in indices:
    rows.update(range(*index.indices(global_batch)))
  return np.asarray(sorted(rows), np.int64)


def batch_size_per_process(global_batch: int, mesh: Mesh, microbatches: int = 1) -> int:
  """This process's share of a global batch; each microbatch must divide over the batch axes."""
  devices = batch_devices(mesh)
  if global_batch % (microbatches * devices):
    what = f'{microbatches} microbatches of ' if microbatches > 1 else ''
    raise ValueError(f'batch_size {global_batch} does not divide into {what}{devices} equal '
                     f'parts, one per device of the batch axes {BATCH_AXES} '
                     f'(mesh {dict(mesh.shape)})')
  return global_batch // jax.process_count()
