"""How a paper recipe moves the learned scalars: the temperature (`logit_scale`) and SigLIP's
bias (`logit_bias`), step by step, with the gradient each step saw.

  python benchmarks/recipe_scalars.py --config=configs/siglip.py:base@tiny [--steps=8 --batch_size=32]

Runs the config's own train step (one device, warmup off so that every step applies a
non-zero rate) on the synthetic training stream and prints one JSON line per step: each
scalar after the update, its gradient at the step's parameters, and the rate applied. It
shows whether a scalar stalls because its gradient is small, because its sign changes, or
because the optimizer's update is (the rate bounds an Adafactor update per step).
"""

import argparse
import json

import jax

from config_spec import load_config
from vlrep import step, train
from vlrep.data import pipeline


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/siglip.py:base@tiny')
  parser.add_argument('--steps', type=int, default=8)
  parser.add_argument('--batch_size', type=int, default=32)
  args = parser.parse_args()
  config = load_config(args.config)
  config.update(batch_size=args.batch_size, eval_every_steps=0)
  config.optim.warmup_steps = 0
  config.mesh.update(data=1, fsdp=1, tensor=1)
  setup = train.setup_step(config, jax.devices()[:1])
  state, _ = step.create_train_state(setup.model, setup.tx, setup.learning_rate_fn, config,
                                     setup.mesh, jax.random.key(config.seed), setup.state_shardings)
  scalars = [k for k in ('logit_scale', 'logit_bias') if k in state.params]
  grad = jax.jit(jax.grad(lambda p, batch: step.compute_losses(
      state.model, p, batch, state.loss_config)[0]))
  batches = iter(pipeline.train_dataset(config, 0, 1))
  print(json.dumps({'step': 0, **{k: float(state.params[k]) for k in scalars}}))
  for i in range(1, args.steps + 1):
    batch = {k: jax.device_put(v, setup.batch_sharding) for k, v in next(batches).items()}
    grads = grad(state.params, batch)
    state, metrics = setup.train_step(state, batch)
    print(json.dumps({'step': i, 'learning_rate': float(metrics['train/learning_rate']),
                      **{k: float(state.params[k]) for k in scalars},
                      **{f'{k}_grad': float(grads[k]) for k in scalars}}), flush=True)


if __name__ == '__main__':
  main()
