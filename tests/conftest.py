"""Shared fixtures: 8 simulated CPU devices, and a config small enough to train in seconds.

Every test sees 8 CPU devices (XLA's host-platform device count, set before JAX is
imported), so sharded code paths run in the ordinary suite; tests that need one device
build their mesh from `jax.devices()[:1]`. Subprocesses started by tests inherit the flags.
"""

import atexit
import importlib.util
import itertools
import os
import shutil
import sys
import tempfile

DEVICE_COUNT = 8
# Tests compile far more than they run: skipping LLVM's optimisations, and emitting fusions
# with XLA:CPU's older elemental emitters rather than its MLIR fusion emitters (which halves a
# train step's compile; benchmarks/RESULTS.md, "Test suite"), change no result beyond float
# rounding. Subprocesses that set XLA_FLAGS of their own start from these.
COMPILE_FLAGS = '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false'
if 'jax' not in sys.modules:
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count={DEVICE_COUNT} ' +
                             COMPILE_FLAGS).strip()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  # Many tests compile the same small programs again (each training run, every `python -m
  # vlrep.train` subprocess): one on-disk cache for the session, shared through the
  # environment with subprocesses and pytest-xdist workers, compiles each of them once.
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='vlrep-tests-jax-cache-')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)

import jax
import ml_collections
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, variant: str = 'tiny') -> ml_collections.ConfigDict:
  """`configs/<name>.py:<variant>`, loaded by path as absl's config flag does."""
  spec = importlib.util.spec_from_file_location(f'configs_{name}',
                                                os.path.join(REPO, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def shrink(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The tiny config cut down further: same code paths, seconds to compile and run."""
  config.batch_size = 8
  config.total_steps = 4
  config.log_every_steps = 2
  config.checkpoint_every_steps = 2
  config.eval_every_steps = 4
  config.eval_batch_size = 8
  config.data.eval_examples = 12
  for entry in config.evals.values():  # every evaluation on a dozen or two examples
    if entry.num_examples:
      entry.num_examples = 12
    if 'train_examples' in entry:
      entry.train_examples = 24
  config.data.image_size = 16
  config.data.max_text_len = 24
  config.data.worker_threads = 1
  config.optim.warmup_steps = 1
  config.model.vision.update(patch_size=8, width=32, heads=2, layers=1, mlp_dim=64)
  config.model.text.update(width=32, heads=2, unimodal_layers=1,
                           multimodal_layers=min(1, config.model.text.multimodal_layers),
                           mlp_dim=64)
  config.model.embed_dim = 16
  config.model.captioning_queries = 3
  return config


def mesh_of(devices=None, **axes):
  """A mesh over `devices` (default: all) with the given axis sizes, the others 1."""
  from vlrep.parallel import sharding  # pylint: disable=g-import-not-at-top
  return sharding.make_mesh(ml_collections.ConfigDict(
      {'data': 1, 'fsdp': 1, 'tensor': 1, **axes}), devices)


def pretrained_on_mesh(config, params, abstract, mesh_axes, devices=None, batch_size=8):
  """`params` placed on a mesh (`mesh_axes` over data=fsdp=tensor=1) as training places them
  (`abstract`: their boxed shapes), in a `Pretrained` with chunks of `batch_size`."""
  from vlrep.parallel import sharding  # pylint: disable=g-import-not-at-top
  from vlrep.pretrained import Pretrained  # pylint: disable=g-import-not-at-top
  mesh = mesh_of(devices, **mesh_axes)
  placed = jax.device_put(params, sharding.logical_shardings(abstract, mesh))
  return Pretrained(config, placed, batch_size=batch_size, mesh=mesh)


def override_flags(config: ml_collections.ConfigDict, **changes) -> list[str]:
  """`--config.FIELD=VALUE` for each field where `config` (plus changes) differs from tiny,
  so that a subprocess given `--config=configs/coca.py:tiny` and these flags runs `config`."""
  def flat(node, prefix=''):
    for key, value in node.items():
      if isinstance(value, dict):
        yield from flat(value, f'{prefix}{key}.')
      else:
        yield f'{prefix}{key}', value
  tiny = dict(flat(load_config('coca').to_dict()))
  wanted = dict(flat(config.to_dict()), **changes)
  return [f'--config.{k}={v}' for k, v in wanted.items() if v != tiny[k]]


def assert_same_params(got, want, atol: float):
  """Parameter trees equal leaf by leaf, to float rounding of the summation order. `atol`
  is a small fraction of one update (an Adam step moves each element by about the learning
  rate; rounding in the gradient of an element whose gradient is near zero moves it by part
  of that), so that a wrong or missing gradient reduction shows in thousands of elements."""
  flat_got = dict(jax.tree_util.tree_leaves_with_path(got))
  for path, value in jax.tree_util.tree_leaves_with_path(want):
    np.testing.assert_allclose(np.asarray(flat_got[path]), np.asarray(value), rtol=1e-4,
                               atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.fixture
def config() -> ml_collections.ConfigDict:
  return shrink(load_config('coca'))


@pytest.fixture(scope='session')
def gcs_server():
  """One loopback GCS server per test process (tests/gcs_server.py), environment set."""
  from gcs_server import Server  # pylint: disable=g-import-not-at-top
  server = Server()
  yield server
  server.stop()


@pytest.fixture
def bucket(gcs_server, request) -> str:
  """'gs://NAME': an empty bucket of its own for each test."""
  name = ''.join(c if c.isalnum() else '-' for c in request.node.name.lower())[:50]
  return gcs_server.bucket(f'b{next(_BUCKETS)}-{name}'.rstrip('-'))


_BUCKETS = itertools.count()


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items):
  """Tests that share a module-scoped fixture (a trained run, say) form one pytest-xdist
  group (`--dist loadgroup`, pytest.ini), so that the fixture is built once rather than
  once on each worker that draws one of them; every other test goes to whichever worker is
  free."""
  for item in items:
    infos = getattr(item, '_fixtureinfo', None)
    shared = sorted(name for name, defs in (infos.name2fixturedefs.items() if infos else ())
                    if defs[-1].scope == 'module')
    if shared:
      item.add_marker(pytest.mark.xdist_group(f'{item.module.__name__}:{shared[0]}'))
