"""Checkpoint save time: vlrep's jax.Array handler against Orbax's default.

Saves a config's freshly initialised train state (and the data iterator) twice, waiting for
each save, with vlrep's handler (`vlrep/runtime/checkpoint.py`: replica-parallel writes only
from 1 MiB per replica) or with Orbax's default handler re-registered. Run one process per
handler, from the repository root:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
      python benchmarks/checkpoint_save.py --handler=vlrep|default [--variant=tiny]
"""

import argparse
import json
import tempfile
import time

import jax
import orbax.checkpoint as ocp

from config_spec import load_config
from vlrep import step as step_lib
from vlrep import train
from vlrep.data import pipeline
from vlrep.runtime import checkpoint


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--handler', choices=('vlrep', 'default'), required=True)
  parser.add_argument('--variant', default='tiny')
  args = parser.parse_args()
  if args.handler == 'default':
    from orbax.checkpoint._src.metadata import array_metadata_store  # as Orbax's registry
    ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
        array_metadata_store=array_metadata_store.Store()), override=True)
  config = load_config(f'configs/coca.py:{args.variant}')
  setup = train.setup_step(config, None)
  state, _ = step_lib.create_train_state(setup.model, setup.tx, setup.learning_rate_fn, config,
                                         setup.mesh, jax.random.key(0), setup.state_shardings)
  data = iter(pipeline.train_dataset(config, 0, 1))
  next(data)
  checkpointer = checkpoint.Checkpointer(tempfile.mkdtemp(), keep=3)
  seconds = []
  for step in (1, 2):
    start = time.time()
    checkpointer.save(step, state, data)
    checkpointer.wait()
    seconds.append(round(time.time() - start, 2))
  print(json.dumps({'handler': args.handler, 'variant': args.variant,
                    'devices': jax.device_count(), 'save_s': seconds}))


if __name__ == '__main__':
  main()
