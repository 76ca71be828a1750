"""Shared fixtures: a config small enough to train in seconds on a 2-core CPU."""

import importlib.util
import os

import ml_collections
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


@pytest.fixture
def config() -> ml_collections.ConfigDict:
  return shrink(load_config('coca'))
