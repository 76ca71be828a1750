"""Streamed evaluation: host memory stays within a few chunks of decoded images whatever the
evaluation set's size, and the results are those of evaluating the whole set at once."""

import tracemalloc

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from conftest import load_config, shrink
from vlrep.data import pipeline
from vlrep.evals import entries, zeroshot
from vlrep.evals.suite import Evaluator
from vlrep.models.build import build_model, init_params
from vlrep.pretrained import Pretrained

SIZE = 64
SHAPES = ('circle', 'square', 'triangle', 'cross')


class _LargeSet:
  """A labelled evaluation set whose examples cost next to nothing to make (the synthetic
  set draws each in milliseconds): uint8 images of one grey level, captions and labels."""
  zero_shot_tasks = {'shape': (SHAPES, ('a {}',))}

  def __init__(self, size):
    self._size = size

  def __len__(self):
    return self._size

  def __getitem__(self, i):
    label = np.zeros(len(SHAPES), np.int32)
    label[i % len(SHAPES)] = 1
    image = np.full((SIZE, SIZE, 3), (i * 37) % 256, np.uint8)
    image[: i % SIZE] = 255 - image[0, 0]
    return {'image': image, 'caption': f'a {SHAPES[i % 4]} {i}', 'labels/shape': label}


def _config(examples):
  config = shrink(load_config('coca'))
  config.data.image_size = SIZE
  config.data.eval_examples = examples
  config.eval_batch_size = 32
  config.evals = ml_collections.ConfigDict({
      'zeroshot_shape': entries.entry('zeroshot', label_key='labels/shape', templates=('a {}',)),
      'captioning': entries.entry('captioning', num_examples=20, methods=('greedy',))})
  return config


def _traced_peak(fn):
  tracemalloc.start()
  try:
    out = fn()
    return out, tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()


@pytest.fixture
def large_set(monkeypatch):
  monkeypatch.setattr(pipeline, 'eval_source', lambda config, spec='', label_key='': _LargeSet(
      config.data.eval_examples))


def test_streamed_evaluation_memory_is_bounded_and_results_unchanged(large_set):
  examples = 3_000  # 37 MB of decoded images, 94 chunks of 32
  config = _config(examples)
  coca = build_model(config)
  params = jax.jit(lambda rng: nn.unbox(init_params(coca, config, rng)))(jax.random.key(0))
  model = Pretrained(config, params, batch_size=config.eval_batch_size)
  Evaluator(_config(100))(model)  # compiles every function first: tracing allocates too

  evaluator, init_peak = _traced_peak(lambda: Evaluator(config))
  results, eval_peak = _traced_peak(lambda: evaluator(model))
  # The bound: 4 chunks of decoded images, 300 bytes for what is kept of each example (its
  # caption, label and 16-float embedding) and 2 MiB; 4.4 MiB here, an eighth of the set.
  image_bytes, chunk_bytes = examples * SIZE * SIZE * 3, model.batch_size * SIZE * SIZE * 3
  bound = 4 * chunk_bytes + 300 * examples + (2 << 20)
  assert bound < image_bytes / 8
  assert init_peak < bound and eval_peak < bound, (init_peak, eval_peak, bound)

  # The same numbers as the whole set decoded into one array and evaluated at once.
  whole = pipeline.eval_examples(config, label_key='labels/shape')
  assert isinstance(whole['images'], np.ndarray) and whole['images'].nbytes == image_bytes
  classifier = model.zero_shot_classifier(whole['class_names'], ('a {}',))
  scores = model.encode_image(whole['images']) @ classifier.T
  assert results['zeroshot_shape/top1'] == zeroshot.topk_hits(scores, whole['label'], 1)
  assert results.keys() == {'zeroshot_shape/top1', 'captioning/cider_greedy',
                            'captioning/bleu4_greedy', 'captioning/exact_match_greedy',
                            'captioning/distinct_captions_greedy'}
  streamed = pipeline.eval_examples(config, num_examples=20, stream=True)
  np.testing.assert_array_equal(streamed['images'].read(), whole['images'][:20])
  assert model.caption(whole['images'][:20]) == [
      c for chunk in streamed['images'].chunks(8) for c in model.caption(chunk)]
