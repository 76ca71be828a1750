"""Orbax checkpoints of a run: parameters, optimizer state and the data iterator's position.

Layout: `workdir/checkpoints/<step>/{params,state,data}`. `params` is kept apart from the
optimizer state so `vlrep.load` can read the weights alone; `data` is the grain iterator's
state (a JSON position in the global stream), captured when `save` is called, so a resumed
run sees exactly the batches it would have seen. Saves are asynchronous; orbax writes into a
temporary directory and renames it when complete, so a half-written checkpoint is never
picked up.
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import orbax.checkpoint as ocp

from vlrep import sharding, step as step_lib
from vlrep.models.coca import CoCa


def _abstract_arrays(tree: Any, shardings: Any) -> Any:
  """Restore targets: each array's shape and dtype, placed in the given sharding."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


class Checkpointer:
  """Saves and restores (train state, data iterator) pairs under `workdir/checkpoints`."""

  def __init__(self, workdir: str, keep: int):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=True)
    self._manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                          item_names=('params', 'state', 'data'))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: step_lib.TrainState, data_iterator: Any) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        state=ocp.args.StandardSave({'step': state.step, 'opt_state': state.opt_state}),
        data=ocp.args.JsonSave(data_iterator.get_state())))

  def restore(self, step: int, state: step_lib.TrainState, state_shardings: Any,
              data_iterator: Any) -> step_lib.TrainState:
    """`state` (same structure, any values) gives shapes; arrays land in `state_shardings`."""
    abstract = _abstract_arrays(state, state_shardings)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract.params),
        state=ocp.args.StandardRestore({'step': abstract.step, 'opt_state': abstract.opt_state}),
        data=ocp.args.JsonRestore()))
    data_iterator.set_state(restored.data)
    return state.replace(step=restored.state['step'], params=restored.params,
                         opt_state=restored.state['opt_state'])

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def restore_params(workdir: str, model: CoCa, config: ml_collections.ConfigDict,
                   step: int | None = None) -> Any:
  """Parameters of `step` (default: latest) sharded over this process's devices."""
  manager = ocp.CheckpointManager(checkpoint_dir(workdir), item_names=('params',))
  step = manager.latest_step() if step is None else step
  if step is None or step not in manager.all_steps():
    raise FileNotFoundError(f'no checkpoint {"" if step is None else step} in '
                            f'{checkpoint_dir(workdir)} (have: {manager.all_steps()})')
  mesh = sharding.make_mesh(sharding.DATA_PARALLEL)
  boxed = jax.eval_shape(lambda: step_lib.init_params(model, config, jax.random.key(0)))
  shardings = sharding.logical_shardings(boxed, mesh)
  abstract = _abstract_arrays(nn.unbox(boxed), shardings)
  restored = manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract)))
  manager.close()
  return restored.params
