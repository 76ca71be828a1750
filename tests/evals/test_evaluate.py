"""`python -m vlrep.evaluate`: a checkpoint evaluated without training, with overrides."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import ml_collections
import orbax.checkpoint as ocp
import pytest

from conftest import REPO, load_config, shrink
from vlrep.evals import entries
from vlrep.evals import evaluate
from vlrep.evals.suite import Evaluator
from vlrep.models.build import build_model, init_params
from vlrep.pretrained import Pretrained
from vlrep.runtime import checkpoint


def _write_run(workdir: str, config: ml_collections.ConfigDict, steps: dict) -> None:
  """A run directory as training leaves it: config.json and params checkpoints."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json(indent=2))
  manager = ocp.CheckpointManager(checkpoint.checkpoint_dir(workdir), item_names=('params',))
  for step, params in steps.items():
    manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
  manager.wait_until_finished()
  manager.close()


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A shrunk run with params at steps 3 and 5, evaluated by one zero-shot and retrieval."""
  config = shrink(load_config('coca'))
  config.evals = ml_collections.ConfigDict({
      'zeroshot_colour': config.evals.zeroshot_colour, 'retrieval': config.evals.retrieval})
  model = build_model(config)
  init = jax.jit(lambda rng: nn.unbox(init_params(model, config, rng)))
  steps = {3: init(jax.random.key(3)), 5: init(jax.random.key(5))}
  workdir = str(tmp_path_factory.mktemp('run'))
  _write_run(workdir, config, steps)
  return config, workdir, steps


def _cli(workdir, *flags):
  return subprocess.run([sys.executable, '-m', 'vlrep.evaluate', f'--workdir={workdir}', *flags],
                        cwd=REPO, capture_output=True, text=True, timeout=300)


def test_cli_evaluates_a_step_with_overrides(run):
  config, workdir, steps = run
  # --raw_params: a checkpoint without an EMA has only the raw parameters to give.
  result = _cli(workdir, '--step=3', '--raw_params', '--config.evals.retrieval.ks=(1,2)',
                '--config.evals.zeroshot_colour.templates=("a {} thing",)')
  assert result.returncode == 0, result.stderr[-3000:]
  printed = json.loads(result.stdout.strip().splitlines()[-1])
  assert json.load(open(os.path.join(workdir, 'results.json'))) == printed
  assert sorted(printed) == ['retrieval/i2t_r@1', 'retrieval/i2t_r@2', 'retrieval/t2i_r@1',
                             'retrieval/t2i_r@2', 'zeroshot_colour/top1',
                             'zeroshot_colour/top5']
  # The same numbers as the evaluator run here on step 3's parameters with those fields.
  config = config.copy_and_resolve_references()
  config.evals.retrieval.ks = (1, 2)
  config.evals.zeroshot_colour.templates = ('a {} thing',)
  expected = Evaluator(config)(Pretrained(config, steps[3], batch_size=config.eval_batch_size))
  assert printed == pytest.approx(expected, abs=1e-6)
  assert expected != pytest.approx(
      Evaluator(config)(Pretrained(config, steps[5], batch_size=config.eval_batch_size)))

  result = _cli(workdir, '--config.evals.retrieval.kz=1')
  assert result.returncode != 0, result.stderr[-2000:]
  assert "config.evals.retrieval has no field 'kz'" in result.stderr, result.stderr[-2000:]
  with pytest.raises(SystemExit, match='model.embed_dim'):  # would not fit the checkpoint
    evaluate._check_overrides(['--config.evals.retrieval.ks=(1,)', '--config.model.embed_dim=8'],
                              config)
  with pytest.raises(SystemExit, match="config.evals has no field 'captioning'"):
    evaluate._check_overrides(['--config.evals.captioning.beam_size=2'], config)


def test_old_run_without_evals_gets_its_old_evaluation(run, tmp_path):
  config, _, steps = run
  old = json.loads(config.to_json())
  del old['evals']
  workdir = str(tmp_path)
  _write_run(workdir, ml_collections.ConfigDict(old), {5: steps[5]})
  results = evaluate.evaluate(workdir)  # latest step
  assert sorted(results) == sorted(
      [f'zeroshot_{t}/top1' for t in ('colour', 'shape', 'count')] +
      [f'retrieval/{d}_r@{k}' for d in ('i2t', 't2i') for k in (1, 5)] +
      [f'captioning/{m}_greedy' for m in ('cider', 'bleu4', 'exact_match', 'distinct_captions')])
  assert json.load(open(os.path.join(workdir, 'results.json'))) == results
  assert evaluate.run_config(workdir).evals.to_dict() == entries.legacy_evals(config).to_dict()
