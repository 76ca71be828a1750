"""How long the test suite's typical program takes to compile: the shrunk tiny CoCa's train
step (tests/conftest.py `shrink`) on 8 simulated CPU devices, under the XLA flags the tests
set, with and without each of their compile-time flags. Each setting runs in a fresh
process, side by side, so the figures compare on the same (noisy) machine.

  python benchmarks/suite_compile_time.py [--repeats=2]

Prints one JSON line per setting: seconds to trace and lower, and to compile.
"""

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = '--xla_force_host_platform_device_count=8'
SETTINGS = {
    'default': '',
    'opt0': '--xla_backend_optimization_level=0',
    # What tests/conftest.py sets.
    'opt0+elemental': '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false',
}

_CHILD = r'''
import json, sys, time
sys.path.insert(0, 'tests')
import jax
from conftest import load_config, shrink
from vlrep import step
from vlrep.data import pipeline
from vlrep.models.build import build_model
from vlrep.optim import make_optimizer
from vlrep.parallel import sharding
config = shrink(load_config('coca'))
model = build_model(config)
tx, schedule = make_optimizer(config.optim, config.total_steps)
mesh = sharding.make_mesh(config.mesh)
state, _ = step.create_train_state(model, tx, schedule, config, mesh, jax.random.key(0))
batch = next(iter(pipeline.train_dataset(config, 0, 1)))
start = time.perf_counter()
lowered = jax.jit(step.train_step).lower(state, batch)
lowered_at = time.perf_counter()
lowered.compile()
print(json.dumps({'lower_s': round(lowered_at - start, 2),
                  'compile_s': round(time.perf_counter() - lowered_at, 2)}))
'''


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--repeats', type=int, default=2)
  args = parser.parse_args()
  for repeat in range(args.repeats):
    for name, flags in SETTINGS.items():
      # No compilation cache: every compile is a real one.
      env = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'}
      env.update(XLA_FLAGS=f'{BASE} {flags}'.strip(), JAX_PLATFORMS='cpu')
      out = subprocess.run([sys.executable, '-c', _CHILD], cwd=REPO, env=env, check=True,
                           capture_output=True, text=True).stdout
      print(json.dumps({'setting': name, 'repeat': repeat, 'xla_flags': env['XLA_FLAGS'],
                        **json.loads(out.strip().splitlines()[-1])}), flush=True)


if __name__ == '__main__':
  main()
