"""`Pretrained.encode_video` and the video evaluations: against the model's own functions and
numpy, and the same on 1 device as on 8."""

import json

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from conftest import load_config, pretrained_on_mesh, shrink
from vlrep.data import video
from vlrep.evals import entries, retrieval, zeroshot
from vlrep.evals.suite import Evaluator
from vlrep.models.build import build_model, init_params


@pytest.fixture(scope='module')
def models():
  """A shrunk tiny CoCa at initialisation, on 1 device and on 8 (data 2 x fsdp 4), with
  video evaluations on the moving-shapes test split."""
  config = shrink(load_config('coca'))
  config.data.eval = 'synthetic_video:test'
  config.evals = ml_collections.ConfigDict({
      'motion': entries.entry('zeroshot_video', label_key='labels/motion', frames=3,
                              templates=('a shape {}', '{}'), ks=(1, 2), num_examples=13),
      'moving_mean': entries.entry('zeroshot_video', label_key='labels/moving', frames=3,
                                   templates=('a shape {}',), ks=(1,), pool='mean'),
      'clips': entries.entry('video_retrieval', frames=3, ks=(1, 5), num_examples=13,
                             identical_text_is_hit=True)})
  config.data.eval_examples = 11
  coca = build_model(config)
  init = lambda rng: init_params(coca, config, rng)
  params = jax.jit(lambda rng: nn.unbox(init(rng)))(jax.random.key(0))
  abstract = jax.eval_shape(init, jax.random.key(0))
  return (config, params, pretrained_on_mesh(config, params, abstract, {}, jax.devices()[:1]),
          pretrained_on_mesh(config, params, abstract, {'data': 2, 'fsdp': 4}))


def _videos(n=5, frames=3):
  return np.random.default_rng(0).integers(0, 255, (n, frames, 16, 16, 3)).astype(np.uint8)


def test_one_frame_is_an_image_and_mean_is_the_mean_of_frame_embeddings(models):
  _, _, _, model = models
  clips = _videos()
  for pool in ('attn', 'mean'):
    np.testing.assert_allclose(model.encode_video(clips[:, :1], pool),
                               model.encode_image(clips[:, 0]), atol=1e-5)
  frames = model.encode_image(clips.reshape(-1, 16, 16, 3)).reshape(5, 3, -1)
  mean = frames.mean(1)
  np.testing.assert_allclose(model.encode_video(clips, 'mean'),
                             mean / np.linalg.norm(mean, axis=-1, keepdims=True), atol=1e-5)


def test_attn_pools_the_concatenated_tokens_of_all_frames(models):
  config, params, one, eight = models
  clips = _videos()
  coca = build_model(config)
  tokens = np.asarray(coca.apply({'params': params}, clips.reshape(-1, 16, 16, 3),
                                 method=lambda m, x: m.image_encoder(x)))
  joined = tokens.reshape(5, 3 * tokens.shape[1], tokens.shape[2])  # frame 0's, then 1's ...
  np.testing.assert_array_equal(joined[1, tokens.shape[1]:2 * tokens.shape[1]], tokens[4])
  want = np.asarray(coca.apply({'params': params}, joined, method=lambda m, t: m._pool(t)[0]))
  got = eight.encode_video(clips)
  np.testing.assert_allclose(got, want, atol=1e-5)
  np.testing.assert_allclose(one.encode_video(clips), got, atol=1e-5)
  # Not the mean of the frames' embeddings, nor any one frame's.
  assert np.abs(got - eight.encode_video(clips, 'mean')).max() > 1e-2
  assert np.abs(got - eight.encode_image(clips[:, 0])).max() > 1e-2


def test_encode_video_refuses_bad_input(models):
  _, _, _, model = models
  with pytest.raises(ValueError, match=r'\[B, T, H, W, 3\]'):
    model.encode_video(_videos()[0])
  with pytest.raises(ValueError, match="pool='max'"):
    model.encode_video(_videos(), 'max')


def test_video_evaluations_match_numpy_and_one_device_equals_eight(models):
  config, _, one, eight = models
  evaluator = Evaluator(config)
  got_one, got_eight = evaluator(one), evaluator(eight)
  assert got_one == got_eight
  assert sorted(got_one) == ['clips/t2v_r@1', 'clips/t2v_r@5', 'clips/v2t_r@1', 'clips/v2t_r@5',
                             'motion/top1', 'motion/top2', 'moving_mean/top1']
  examples = video.video_examples(config, '', 13, 0, frames=3)
  emb = eight.encode_video(examples['videos'])
  for name, label, templates, pool, count in (
      ('motion', 'motion', ('a shape {}', '{}'), 'attn', 13),
      ('moving_mean', 'moving', ('a shape {}',), 'mean', 11)):
    names = examples['zero_shot_tasks'][label][0]
    classes = zeroshot.class_embeddings(eight.encode_text, names, templates)
    vectors = eight.encode_video(examples['videos'][:count], pool)
    top = np.argmax(vectors @ classes.T, axis=1)
    assert got_one[f'{name}/top1'] == pytest.approx(
        np.mean(top == examples[f'labels/{label}'][:count]), abs=1e-9)
  correct = retrieval.correct_pairs(np.arange(13), 13, examples['captions'], True)
  text_emb = eight.encode_text(examples['captions'])
  by_text = np.argsort(-(text_emb @ emb.T), axis=1, kind='stable')[:, :1]
  assert got_one['clips/t2v_r@1'] == pytest.approx(
      np.take_along_axis(correct, by_text, axis=1).any(1).mean(), abs=1e-9)
  by_video = np.argsort(-(emb @ text_emb.T), axis=1, kind='stable')[:, :5]
  assert got_one['clips/v2t_r@5'] == pytest.approx(
      np.take_along_axis(correct.T, by_video, axis=1).any(1).mean(), abs=1e-9)


def test_bad_video_entries_fail_naming_the_field(models):
  config = models[0].copy_and_resolve_references()
  config.evals.motion.pool = 'max'
  with pytest.raises(ValueError, match=r'evals\.motion\.pool'):
    Evaluator(config)
  config.evals.motion.pool, config.evals.motion.frames = 'attn', 0
  with pytest.raises(ValueError, match=r'evals\.motion\.frames'):
    Evaluator(config)


def test_a_clip_batch_is_pooled_in_training_as_encode_video_pools_it(models):
  config, params, _, eight = models
  clips = _videos(n=8)
  tokens = np.ones((8, config.data.max_text_len), np.int32)
  out = build_model(config).apply({'params': params}, clips, tokens)
  np.testing.assert_allclose(np.asarray(out['image_emb']), eight.encode_video(clips), atol=1e-5)


def test_video_config_trains_through_the_one_loop_and_evaluates(tmp_path):
  from vlrep import train
  from vlrep.data import pipeline
  config = shrink(load_config('video'))
  config.total_steps = config.eval_every_steps = 2
  batch = next(iter(pipeline.train_dataset(config, 0, 1)))
  assert batch['images'].shape == (8, config.data.frames, 16, 16, 3)
  results = train.train_and_evaluate(config, str(tmp_path))
  assert sorted(results) == sorted(
      ['retrieval/v2t_r@1', 'retrieval/v2t_r@5', 'retrieval/t2v_r@1', 'retrieval/t2v_r@5'] +
      [f'zeroshot_{task}/top1' for task in ('motion', 'colour', 'shape', 'motion_one_frame',
                                            'motion_mean')])
  assert all(0 <= value <= 1 for value in results.values())
  saved = json.loads((tmp_path / 'config.json').read_text())
  assert saved['data']['frames'] == config.data.frames
  config.data.augment = 'random_resized_crop'
  with pytest.raises(ValueError, match='data.frames'):
    pipeline.train_dataset(config, 0, 1)
