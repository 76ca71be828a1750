"""Orbax checkpoints of a run: parameters, optimizer state and the data iterator's position.

Layout: `workdir/checkpoints/<step>/{params,state,data}`, plus `ema_params` when the run keeps
an EMA of its parameters (`optim.ema_decay`). `params` and `ema_params` are kept apart from
the optimizer state so `vlrep.load` can read the weights alone (the EMA when there is one);
`data` is the grain iterator's state (a JSON position in the global stream), captured when
`save` is called, so a resumed run sees exactly the batches it would have seen. Saves are
asynchronous; orbax writes into a temporary directory (`<step>.orbax-checkpoint-tmp-*`) and
renames it when complete, so a process killed mid-save leaves at most a temporary directory,
which is never picked up (and is deleted by the next run). On gs:// (TensorStore writes the
arrays; buckets cannot rename) a step folder is complete once it holds `commit_success.txt`;
one without it (a killed save) is ignored the same way and deleted by the next run's manager
(`cleanup_tmp_directories`; tests/test_gcs_end_to_end.py), so the step can be saved again.
Before restoring, `export.check_shapes` compares the checkpoint's metadata with the arrays the
config builds, so a mismatch names the array and both shapes.
"""

from __future__ import annotations

import logging as std_logging
from typing import Any, Mapping

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from vlrep import step as step_lib
from vlrep.ema import ema_init
from vlrep.parallel import sharding
from vlrep.runtime import paths
from vlrep.weights import export

# Orbax splits each replicated array among its replicas ("replica-parallel" writes) by slicing
# it on device: one small XLA compile per distinct shape and device, which for many small
# arrays costs far more than the writing it shares (benchmarks/RESULTS.md "Checkpoints").
# Below 1 MiB per replica it is off; big arrays (where sharing the write pays) still use it.
# Registered through Orbax's private metadata module: the default jax.Array handler is built
# with its array-metadata store, and no public API sets this option on that handler.
_MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL = 1 << 20


def _register_array_handler() -> None:
  # pylint: disable-next=g-import-not-at-top
  from orbax.checkpoint._src.metadata import array_metadata_store
  absl_logger = std_logging.getLogger('absl')
  level = absl_logger.level
  absl_logger.setLevel(std_logging.ERROR)  # the registry warns that it overrides a default
  try:
    ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
        array_metadata_store=array_metadata_store.Store(),  # as orbax's default handler
        min_slice_bytes_for_replica_parallel=_MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL),
                                            override=True)
  finally:
    absl_logger.setLevel(level)


_register_array_handler()


def _abstract_arrays(tree: Any, shardings: Any) -> Any:
  """Restore targets: each array's shape and dtype, placed in the given sharding."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def checkpoint_dir(workdir: str) -> str:
  return paths.join(paths.absolute(workdir), 'checkpoints')


def _check_items(manager: ocp.CheckpointManager, step: int, expected: Mapping[str, Any]) -> None:
  """`check_shapes` for each item of `expected` against checkpoint `step`'s metadata."""
  metadata = manager.item_metadata(step)
  try:
    export.check_shapes(dict(expected), {name: metadata[name] for name in expected},
                        'the checkpoint')
  except ValueError as e:
    raise ValueError(f'{paths.join(str(manager.directory), str(step))}: {e}') from None


# The checkpoint item of the EMA of the parameters; absent from checkpoints of runs without one.
EMA_ITEM = 'ema_params'


def _item_handlers() -> dict[str, ocp.CheckpointHandler]:
  # Given up front (rather than inferred at the first save) so that a manager that has not
  # saved yet can read a checkpoint's metadata.
  return {'params': ocp.StandardCheckpointHandler(), 'state': ocp.StandardCheckpointHandler(),
          EMA_ITEM: ocp.StandardCheckpointHandler(), 'data': ocp.JsonCheckpointHandler()}


def _has_ema(manager: ocp.CheckpointManager, step: int) -> bool:
  return manager.item_metadata(step).get(EMA_ITEM) is not None


class Checkpointer:
  """Saves and restores (train state, data iterator) pairs under `workdir/checkpoints`."""

  def __init__(self, workdir: str, keep: int):
    # cleanup_tmp_directories: deletes what a process killed mid-save left behind.
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=True,
                                           cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                          item_handlers=_item_handlers())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: step_lib.TrainState, data_iterator: Any) -> None:
    ema = {} if state.ema_params is None else {
        EMA_ITEM: ocp.args.StandardSave(state.ema_params)}
    self._manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        state=ocp.args.StandardSave({'step': state.step, 'opt_state': state.opt_state}),
        data=ocp.args.JsonSave(data_iterator.get_state()), **ema))

  def restore(self, step: int, state: step_lib.TrainState, state_shardings: Any,
              data_iterator: Any) -> step_lib.TrainState:
    """`state` (same structure, any values) gives shapes; arrays land in `state_shardings`.

    A state with an EMA resumed from a checkpoint without one (optim.ema_decay turned on
    mid-run) starts its EMA at the restored parameters; a checkpoint's EMA that the state
    has no room for (turned off) is left unread."""
    abstract = _abstract_arrays(state, state_shardings)
    items = {'params': abstract.params,
             'state': {'step': abstract.step, 'opt_state': abstract.opt_state}}
    if state.ema_params is not None and _has_ema(self._manager, step):
      items[EMA_ITEM] = abstract.ema_params
    _check_items(self._manager, step, items)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        data=ocp.args.JsonRestore(),
        **{name: ocp.args.StandardRestore(item) for name, item in items.items()}))
    data_iterator.set_state(restored.data)
    ema = state.ema_params
    if ema is not None:
      if EMA_ITEM in items:
        ema = restored[EMA_ITEM]
      else:
        logging.warning('checkpoint %d has no EMA of the parameters: it starts at them', step)
        ema = ema_init(restored.params)
    return state.replace(step=restored.state['step'], params=restored.params,
                         opt_state=restored.state['opt_state'], ema_params=ema)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def restore_params(workdir: str, config: ml_collections.ConfigDict, step: int | None = None,
                   mesh: jax.sharding.Mesh | None = None, *, raw_params: bool = False) -> Any:
  """Parameters of `step` (default: latest), restored straight into their shardings on `mesh`
  (default: this process's devices on the batch axes), whatever mesh wrote them, in the
  model's parameter dtype: the EMA of the parameters when the checkpoint has one, unless
  `raw_params` (then, and without an EMA, the trained parameters themselves)."""
  manager = ocp.CheckpointManager(checkpoint_dir(workdir), item_handlers=_item_handlers())
  try:
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
      raise FileNotFoundError(f'no checkpoint {"" if step is None else step} in '
                              f'{checkpoint_dir(workdir)} (have: {manager.all_steps()})')
    mesh = sharding.make_mesh(sharding.DATA_PARALLEL) if mesh is None else mesh
    abstract = export.abstract_params(config, mesh)
    item = 'params' if raw_params or not _has_ema(manager, step) else EMA_ITEM
    _check_items(manager, step, {item: abstract})
    return manager.restore(step, args=ocp.args.Composite(
        **{item: ocp.args.StandardRestore(abstract)}))[item]
  finally:
    manager.close()
