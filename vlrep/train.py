"""`python -m vlrep.train --config=configs/coca.py:tiny --workdir=DIR`: the one training loop.

Builds the mesh, the model, the optimizer and the train state (directly in its shardings),
resumes from the latest checkpoint in DIR if there is one, then runs the jitted
`train_step` over the grain stream, logging, checkpointing and evaluating on schedule. Every
model family runs through this loop; they differ by config only.
"""

from __future__ import annotations

import dataclasses
import json
import logging as std_logging
import sys
import time
from typing import Any, Callable, Sequence

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from vlrep import classification, ema, losses, step as step_lib
from vlrep.data import pipeline
from vlrep.data.tokenizer import get_tokenizer
from vlrep.evals.suite import Evaluator, check as check_evals
from vlrep.models.build import build_model
from vlrep.optim import make_optimizer
from vlrep.parallel import distributed, sharding
from vlrep.pretrained import Pretrained
from vlrep.runtime import checkpoint, nonfinite, paths
from vlrep.runtime.metrics import MetricWriter
from vlrep.runtime.preemption import PreemptionWatcher
from vlrep.tools import flops as flops_lib
from vlrep.weights import init_from


class ConfigError(ValueError):
  """A config that cannot run (`main` prints it as one line and exits 1)."""


def validate(config: ml_collections.ConfigDict) -> None:
  """Fails fast, before anything compiles, on values that cannot work together."""
  tokenizer = get_tokenizer(config.data.tokenizer)
  if config.model.text.vocab_size < tokenizer.vocab_size:
    raise ValueError(f'model.text.vocab_size={config.model.text.vocab_size} is smaller than the '
                     f'{config.data.tokenizer!r} tokenizer vocabulary ({tokenizer.vocab_size})')
  # The model's pad id is what the losses, the step and decoding skip; the tokenizer's is
  # what the data pads with.
  if config.model.text.pad_id != tokenizer.pad_id:
    raise ValueError(f'model.text.pad_id={config.model.text.pad_id}, but the '
                     f'{config.data.tokenizer!r} tokenizer pads with {tokenizer.pad_id}')
  for field in ('total_steps', 'log_every_steps', 'checkpoint_every_steps'):
    if config[field] <= 0:
      raise ValueError(f'{field} must be positive, got {config[field]}')
  if config.eval_every_steps < 0:
    raise ValueError('eval_every_steps must be >= 0 (0 turns evaluation off)')
  if config.microbatches < 1:
    raise ValueError(f'microbatches must be >= 1, got {config.microbatches}')
  for field, allowed in (('contrastive_type', losses.CONTRASTIVE_TYPES),
                         ('contrastive_impl', losses.CONTRASTIVE_IMPLS)):
    if config.loss[field] not in allowed:
      raise ValueError(f'loss.{field}={config.loss[field]!r}; expected one of {allowed}')
  if not config.model.contrastive and config.loss.contrastive_weight:
    raise ValueError(f'loss.contrastive_weight={config.loss.contrastive_weight} with '
                     'model.contrastive=False: a captioning-only model has no embeddings to '
                     'contrast; set the weight to 0')
  nonfinite.guard_from_config(config)  # raises on a bad nan_policy or nan_max_consecutive
  make_optimizer(config.optim, config.total_steps)  # raises on a field it would ignore
  profile_steps(config)
  init_from.check_config(config)
  classification.check_config(config, pipeline.source_from_config(config, config.data.train))
  if config.eval_every_steps:
    check_evals(config)


@dataclasses.dataclass
class StepSetup:
  """What runs the train step on a mesh: built by `setup_step` for `vlrep.train`,
  `vlrep.bench` and `vlrep.plan` alike, so that all three run the same jitted step."""
  mesh: jax.sharding.Mesh
  model: Any
  tx: Any
  learning_rate_fn: Callable[[jax.Array], jax.Array]
  abstract_state: Any  # shapes and dtypes (jax.ShapeDtypeStruct leaves)
  state_shardings: Any
  batch_sharding: jax.sharding.NamedSharding
  train_step: Any  # jitted (state, batch) -> (state, metrics), the state donated
  replicated: list[dict[str, Any]]  # arrays replicated because a dimension does not divide


def setup_step(config: ml_collections.ConfigDict,
               devices: Sequence[jax.Device] | None = None) -> StepSetup:
  """Validates `config` and builds the mesh over `devices` (default: all devices of all
  processes), the model, optimizer, state shardings and the jitted train step. Nothing is
  compiled or allocated; a config that cannot work raises ConfigError first."""
  try:
    validate(config)
    mesh = sharding.make_mesh(config.mesh, devices)
    # Fails before anything compiles if the batch cannot be split evenly.
    sharding.batch_size_per_process(config.batch_size, mesh, config.microbatches)
    model = build_model(config)
    tx, learning_rate_fn = make_optimizer(config.optim, config.total_steps)
    replicated: list[dict[str, Any]] = []
    abstract, state_shardings = step_lib.abstract_train_state(
        model, tx, learning_rate_fn, config, mesh, replicated)
  except (ValueError, TypeError, KeyError, FileNotFoundError) as e:
    raise ConfigError(str(e)) from e
  batch_sharding = sharding.batch_sharding(mesh)

  def step(state, batch):
    with sharding.axis_rules(mesh):  # the model's activation constraints apply
      return step_lib.train_step(state, batch)
  train_step = jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                       out_shardings=(state_shardings, None), donate_argnums=0)
  return StepSetup(mesh, model, tx, learning_rate_fn, abstract, state_shardings,
                   batch_sharding, train_step, replicated)


def profile_steps(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """`config.profile_steps` 'START:COUNT' as (START, COUNT); '' (the default) is (0, 0)."""
  spec = config.profile_steps
  if not spec:
    return 0, 0
  try:
    start, count = (int(x) for x in str(spec).split(':'))
  except ValueError:
    start = count = 0
  if start < 1 or count < 1:
    raise ValueError(f"profile_steps={spec!r}: expected 'START:COUNT' with START, COUNT >= 1 "
                     "(e.g. '10:5'), or '' for none")
  return start, count


def _format_duration(seconds: float) -> str:
  minutes, seconds = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f'{hours}h{minutes:02d}m' if hours else f'{minutes}m{seconds:02d}s'


def _log_progress(step: int, total: int, metrics: dict[str, float], eta_s: float) -> None:
  # A captioning-only model has no temperature, a classification fine-tune no contrastive or
  # caption loss: nan rather than made-up numbers.
  part = lambda name: metrics.get(f'train/{name}', float('nan'))
  logging.info('step %d/%d | loss %.4f (contrastive %.4f, caption %.4f) | lr %.2e | '
               'scale %.1f | %.0f ex/s | ETA %s', step, total, metrics['train/loss'],
               part('contrastive_loss'), part('caption_loss'),
               metrics['train/learning_rate'], metrics.get('train/logit_scale', float('nan')),
               metrics['train/examples_per_s'], _format_duration(eta_s))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       devices: Sequence[jax.Device] | None = None) -> dict[str, float]:
  """Trains (or resumes) to `config.total_steps`; returns the final evaluation results.

  The mesh spans `devices` (default: all devices of all processes).
  """
  try:
    paths.check(workdir)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  setup = setup_step(config, devices)
  mesh = setup.mesh
  paths.makedirs(workdir)
  if jax.process_index() == 0:
    paths.write_text(paths.join(workdir, 'config.json'), config.to_json(indent=2))

  state, state_shardings = step_lib.create_train_state(
      setup.model, setup.tx, setup.learning_rate_fn, config, mesh, jax.random.key(config.seed),
      setup.state_shardings)
  logging.info('model: %s parameters', f'{sum(x.size for x in jax.tree.leaves(state.params)):,}')

  rows = sharding.process_rows(setup.batch_sharding, config.batch_size)
  data_iterator = iter(pipeline.train_dataset(config, jax.process_index(), jax.process_count(),
                                              rows))
  checkpointer = checkpoint.Checkpointer(workdir, config.keep_checkpoints)
  start = checkpointer.latest_step()
  if start is not None:
    state = checkpointer.restore(start, state, state_shardings, data_iterator)
    logging.info('resumed from %s at step %d', checkpoint.checkpoint_dir(workdir), start)
  elif config.init_from:  # only a fresh run: a resumed one continues from its own
    params = init_from.load_params(config.init_from, state.params, config)
    state = state.replace(params=params, ema_params=None if state.ema_params is None
                          else ema.ema_init(params))
    logging.info('parameters initialised from %s', config.init_from)
  start = int(state.step)

  batch_sharding, train_step = setup.batch_sharding, setup.train_step
  evaluator = Evaluator(config) if config.eval_every_steps else None
  pretrained = Pretrained(config, state.params, batch_size=config.eval_batch_size, mesh=mesh)
  writer = MetricWriter(workdir)

  def evaluate(step: int) -> dict[str, float]:
    # The EMA when the run keeps one: what `vlrep.load` and `vlrep.evaluate` give by default.
    pretrained.params = state.params if state.ema_params is None else state.ema_params
    t0 = time.time()
    results = evaluator(pretrained)
    logging.info('eval at step %d (%.0fs): %s', step, time.time() - t0,
                 ', '.join(f'{k} {v:.3f}' for k, v in results.items()))
    writer.write(step, results)
    return results

  results: dict[str, float] = {}
  last_log_time, last_log_step = time.time(), start
  data_wait = 0.0  # seconds spent waiting for input since the last log
  profile_start, profile_count = profile_steps(config)
  peak = flops_lib.table_peak_tflops(jax.devices()[0].device_kind)
  model_flops = flops_lib.train_flops_per_step(config)['total']
  preempted = False
  # On a stop, it first lets the checkpoints written before the bad step finish.
  guard = nonfinite.guard_from_config(config, before_stop=checkpointer.wait)
  with PreemptionWatcher() as watcher:
    for step in range(start + 1, config.total_steps + 1):
      if step == profile_start:
        # Traced into a local folder that is uploaded when the trace ends (gs:// workdirs).
        profile_dir = paths.Mirror(paths.join(workdir, 'profile'))
        jax.profiler.start_trace(profile_dir.folder)
      waited = time.time()
      local = next(data_iterator)
      batch = {k: jax.make_array_from_process_local_data(batch_sharding, v,
                                                         (config.batch_size, *v.shape[1:]))
               for k, v in local.items()}
      data_wait += time.time() - waited
      state, metrics = train_step(state, batch)
      metrics = guard.push(step, metrics)
      if step == profile_start + profile_count - 1 or (
          profile_count and step == config.total_steps and step >= profile_start):
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        profile_dir.close()
        profile_count = 0
        logging.info('profile of steps %d-%d written to %s', profile_start, step,
                     profile_dir.path)

      if step % config.log_every_steps == 0 or step == config.total_steps:
        guard.check(step)  # waits for this step, as fetching its metrics does
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        metrics['train/nonfinite_skipped'] = guard.skipped
        now = time.time()
        seconds_per_step = (now - last_log_time) / (step - last_log_step)
        metrics['train/examples_per_s'] = config.batch_size / seconds_per_step
        # Of the wall time since the last log: waiting for the next batch (input-bound near 1).
        metrics['train/data_wait_fraction'] = data_wait / max(now - last_log_time, 1e-9)
        if peak:  # the chip's bf16 dense peak is known (vlrep.tools.flops.PEAK_TFLOPS)
          metrics['train/mfu'] = model_flops / seconds_per_step / (peak * 1e12 * mesh.size)
        data_wait = 0.0
        # Undecodable records replaced since this process started (pipeline._SkipFailed).
        metrics['data/skipped'] = pipeline.skipped_count()
        writer.write(step, metrics)
        _log_progress(step, config.total_steps, metrics,
                      seconds_per_step * (config.total_steps - step))
        last_log_time, last_log_step = now, step
      if step % config.checkpoint_every_steps == 0 or step == config.total_steps:
        guard.check(step)  # never checkpoint past an unchecked step
        checkpointer.save(step, state, data_iterator)
      if evaluator and step % config.eval_every_steps == 0 and step != config.total_steps:
        evaluate(step)
        last_log_time, data_wait = time.time(), 0.0  # evaluation time is not training speed
      if watcher.should_stop(step):
        if step % config.checkpoint_every_steps and step != config.total_steps:
          guard.check(step)
          checkpointer.save(step, state, data_iterator)
        logging.warning('stopped at step %d on a preemption notice; checkpoint written. Run '
                        'the same command to resume.', step)
        preempted = True
        break

  if evaluator and not preempted:
    results = evaluate(config.total_steps)
    if jax.process_index() == 0:
      paths.write_text(paths.join(workdir, 'results.json'),
                       json.dumps(results, indent=2, sort_keys=True))
      print(json.dumps(results, sort_keys=True), flush=True)
  checkpointer.wait()
  checkpointer.close()
  writer.close()
  return results


def _quiet_library_logs(record) -> bool:
  """Keeps orbax's per-save INFO chatter out of the progress log (warnings still show)."""
  return record.levelno >= std_logging.WARNING or 'orbax' not in record.pathname


def _fail(message: str, program: str = 'vlrep.train') -> None:
  """Ends the program with one line on stderr and status 1 (no traceback)."""
  print(f'{program}: error: {" ".join(message.split())}', file=sys.stderr, flush=True)
  sys.exit(1)


def parse_flags(argv: list[str], program: str = 'vlrep.train') -> list[str]:
  """absl's flag parsing, with a bad flag or `--config.KEY` reported in one line."""
  try:
    argv = flags.FLAGS(argv)
    flags.FLAGS.config.keys()  # config_flags defers a config file's load error to first use
    return argv
  except flags.Error as e:  # an unknown flag, a value of the wrong type, a missing flag
    message = str(e)
    if 'Traceback (most recent call last)' in message:  # get_config raised: keep its error
      lines = [line for line in message.splitlines() if line.strip()]
      message = f'{message.split(": ")[0]}: {lines[-1].strip()}'
    _fail(message, program)
  except OSError as e:  # a config file that does not exist
    _fail(str(e), program)
  except (AttributeError, KeyError) as e:  # config_flags: a key the config does not have
    while e.args and isinstance(e.args[0], BaseException):
      e = e.args[0]
    message = str(e.args[0]) if e.args else str(e)
    key = message.splitlines()[0].strip('\'"') if message else ''
    named = [arg.split('=')[0] for arg in argv[1:]
             if arg.startswith('--config.') and arg.split('=')[0].endswith(f'.{key}')]
    _fail(f'{", ".join(named) or key}: unknown config key {message}', program)
  return []  # not reached


def main(argv: list[str]) -> None:
  logging.get_absl_handler().addFilter(_quiet_library_logs)
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  distributed.initialize()
  try:
    train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
  except (ConfigError, nonfinite.NonFiniteError) as e:
    logging.flush()
    _fail(str(e))


if __name__ == '__main__':
  # Flags are defined only when run as a program, so tests can import this module.
  config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/coca.py:tiny.',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and results.')
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main, flags_parser=parse_flags)
