"""The attentive probe against the linear probe on the synthetic shape label, one evaluation.

  python benchmarks/attentive_probe.py --workdir=runs/tiny [--steps=300 --learning_rate=3e-3
      --batch_size=256 --queries=1 --heads=0]

Evaluates the run's latest checkpoint with two entries only: the demo's `linear_probe_shape`
and an `attentive_probe_shape` on the same data (trained on held-out examples 5,000..5,999,
scored on the first 1,000), in one `Evaluator` call; flags override the attentive probe's
fields. Prints one JSON line: both accuracies and the seconds each took. Writes nothing into
the run (`vlrep.evaluate` would replace its results.json).
"""

import argparse
import json
import time

import ml_collections

from vlrep.evals import entries, evaluate, suite
from vlrep.pretrained import Pretrained
from vlrep.runtime import checkpoint


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True)
  defaults = entries.FIELDS['attentive_probe']
  for field in ('steps', 'learning_rate', 'batch_size', 'queries', 'heads', 'weight_decay'):
    parser.add_argument(f'--{field}', type=type(defaults[field]), default=defaults[field])
  args = parser.parse_args()
  config = evaluate.run_config(args.workdir)
  linear = entries.synthetic_evals().linear_probe_shape
  fields = {k: getattr(args, k) for k in
            ('steps', 'learning_rate', 'batch_size', 'queries', 'heads', 'weight_decay')}
  with config.unlocked():
    config.evals = ml_collections.ConfigDict({
        'linear_probe_shape': linear,
        'attentive_probe_shape': entries.entry(
            'attentive_probe', label_key=linear.label_key, train_data=linear.train_data,
            train_start=linear.train_start, train_examples=linear.train_examples, **fields)})
  evaluator = suite.Evaluator(config)
  params = checkpoint.restore_params(args.workdir, config, None)
  model = Pretrained(config, params, batch_size=config.eval_batch_size)
  results = {}
  for name in config.evals:  # one at a time, to time each
    one = ml_collections.ConfigDict({name: config.evals[name]})
    evaluator.entries = one
    start = time.time()
    results.update(evaluator(model))
    results[f'{name}/seconds'] = round(time.time() - start, 1)
  print(json.dumps({**results, 'attentive_fields': fields}, sort_keys=True))


if __name__ == '__main__':
  main()
