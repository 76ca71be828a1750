"""`python -m vlrep.evaluate --workdir=DIR [--step=N] [--raw_params] [--config.evals.N.F=V]`.

Evaluates a run's latest checkpoint (or `--step`) without training: the model and the
evaluations come from the run's own `DIR/config.json` (a run saved before `config.evals`
existed gets its old evaluation, `vlrep.evals.entries.legacy_evals`), overridden by
`--config.` flags for the fields that do not change the model (`evals.*`, `eval_batch_size`,
`data.eval*`, `data.tfds_*`); a misspelt field fails naming it. A run that kept an EMA of
its parameters is evaluated on the EMA, as during training; `--raw_params` takes the trained
parameters instead. Writes the flat `{'eval_name/metric': number}` to `DIR/results.json`
(replacing the training run's) and prints it as JSON. Like training, it runs on every device
of every process of a multi-process launch, with the same numbers for any device or process
count.
"""

from __future__ import annotations

import json
import sys

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from vlrep import config as vlrep_config
from vlrep.evals.suite import Evaluator
from vlrep.parallel import distributed
from vlrep.pretrained import Pretrained
from vlrep.runtime import checkpoint, paths

# Fields that may be overridden: everything else would describe another model than the
# checkpoint's.
OVERRIDABLE = ('evals.', 'eval_batch_size', 'data.eval', 'data.tfds_')


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's config, migrated (`vlrep.config.migrate`: a run saved before `evals` existed
  gets `entries.legacy_evals`), locked."""
  path = paths.join(workdir, 'config.json')
  if not paths.exists(path):
    raise FileNotFoundError(f'no {path}: --workdir must be a training run directory')
  return vlrep_config.migrate(json.loads(paths.read_text(path)))


def evaluate(workdir: str, step: int | None = None,
             config: ml_collections.ConfigDict | None = None,
             raw_params: bool = False) -> dict[str, float]:
  """Results of `config.evals` (default: the run's) on checkpoint `step` (default: latest),
  of its EMA of the parameters when it has one unless `raw_params`; process 0 writes them
  to `workdir/results.json`."""
  config = run_config(workdir) if config is None else config
  evaluator = Evaluator(config)  # validates the entries before the restore
  params = checkpoint.restore_params(workdir, config, step, raw_params=raw_params)
  model = Pretrained(config, params, batch_size=config.eval_batch_size)
  results = evaluator(model)
  if jax.process_index() == 0:
    paths.write_text(paths.join(workdir, 'results.json'),
                     json.dumps(results, indent=2, sort_keys=True))
  return results


def _check_overrides(argv: list[str], config: ml_collections.ConfigDict) -> None:
  """Exits naming the first `--config.` flag that is not overridable or not a field."""
  for arg in argv:
    if not arg.startswith('--config.'):
      continue
    field = arg[len('--config.'):].split('=')[0]
    if not field.startswith(OVERRIDABLE):
      sys.exit(f'--config.{field}: only fields that leave the model as trained can be '
               f'overridden here ({", ".join(OVERRIDABLE)}...)')
    node, path = config, 'config'
    for part in field.split('.'):
      fields = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      if part not in fields:
        sys.exit(f'--config.{field}: {path} has no field {part!r} (it has: {fields})')
      node, path = node[part], f'{path}.{part}'


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  distributed.initialize()
  results = evaluate(FLAGS.workdir, FLAGS.step, FLAGS.config, FLAGS.raw_params)
  logging.info('evaluated %s', FLAGS.workdir)
  if jax.process_index() == 0:
    print(json.dumps(results, sort_keys=True), flush=True)


FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the command line's flags; `python -m vlrep.evaluate` calls it before `main`.

  `--config` is the run's own config, so `--workdir` is read from `sys.argv` here first;
  exits with one line when it is missing or its run cannot be read."""
  flags.DEFINE_string('workdir', None, 'Training run directory (config.json, checkpoints/).')
  flags.DEFINE_integer('step', None, 'Checkpoint step to evaluate (default: the latest).')
  flags.DEFINE_boolean('raw_params', False, 'Evaluate the trained parameters rather than '
                       'their EMA (optim.ema_decay), for a run that kept one.')
  flags.mark_flag_as_required('workdir')
  # The --config.* overrides apply to the run's own config, which --workdir names: parse
  # that first, then define the config flag over the loaded config.
  FLAGS(sys.argv, known_only=True)
  if FLAGS.workdir is None:
    sys.exit('--workdir is required')
  try:
    run = run_config(FLAGS.workdir)
  except (FileNotFoundError, paths.UnsupportedPathError) as error:
    sys.exit(str(error))
  _check_overrides(sys.argv[1:], run)
  config_flags.DEFINE_config_dict('config', run, lock_config=True)
