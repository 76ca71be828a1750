"""The paper recipes learn: each family's base recipe (Adafactor, its schedule shape, weight
decay, loss weights, bfloat16) on the tiny demo's model and data (`configs/*.py:base@tiny`),
cut to a few dozen steps. The README's recipe table has the full-length runs."""

import json
import os

import pytest

from conftest import load_config
from vlrep import train
from vlrep.evals import entries

RECIPE_FIELDS = ('optim', 'loss', 'model.dtype', 'model.param_dtype')


def _field(config, name):
  for part in name.split('.'):
    config = config[part]
  return config.to_dict() if hasattr(config, 'to_dict') else config


@pytest.mark.parametrize('family', ['coca', 'clip', 'siglip'])
def test_paper_recipe_learns_the_synthetic_set(family, tmp_path):
  base = load_config(family, 'base')
  for size in ('large', 'giant'):  # one recipe for the three sizes: base@tiny tests all
    other = load_config(family, size)
    for name in RECIPE_FIELDS:
      assert _field(other, name) == _field(base, name), (size, name)
  config = load_config(family, 'base@tiny')
  assert config.optim.name == 'adafactor' and config.model.dtype == 'bfloat16'
  assert config.optim.warmup_steps == round(0.02 * config.total_steps)
  config.update(batch_size=32, total_steps=60, log_every_steps=10, checkpoint_every_steps=60,
                eval_every_steps=60, eval_batch_size=100)
  config.optim.warmup_steps = round(0.02 * config.total_steps)
  config.evals = {'zeroshot_colour': entries.synthetic_evals().zeroshot_colour}
  config.evals.zeroshot_colour.num_examples = 200
  results = train.train_and_evaluate(config, str(tmp_path))
  records = [json.loads(line) for line in open(os.path.join(tmp_path, 'metrics.jsonl'))]
  losses = [r['train/loss'] for r in records if 'train/loss' in r]
  print(family, losses, results)
  assert losses[-1] < 0.8 * losses[0], losses
  assert results['zeroshot_colour/top1'] > 0.5, results  # 6 colours: chance is 1/6
