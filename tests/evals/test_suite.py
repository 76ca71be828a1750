"""The evaluation suite: any mesh gives the same numbers; the TFDS benchmark configs run.

TFDS sets are mocked offline: cifar10, cifar100 and imagenet2012 with `tfds.testing.mock_data`
(random examples of the real feature structure; label names as the builder code defines them
before preparation, i.e. ImageNet's WordNet ids but CIFAR's '0', '1', ... since CIFAR's real
names come with its prepared files). coco_captions' mock needs
TensorFlow, which is not installed, so its `tfds.data_source` is replaced by a fake with the
feature structure of the TFDS builder (`captions` a Sequence of {'text', 'id'}) returning
examples as `data_source` decodes them; what that leaves untested is TFDS's own decoding of
real coco_captions files.
"""

import flax.linen as nn
import jax
import numpy as np
import pytest

from conftest import load_config, pretrained_on_mesh, shrink
from vlrep.data import pipeline
from vlrep.data.synthetic import SyntheticShapes
from vlrep.evals.suite import Evaluator
from vlrep.models.build import build_model, init_params


@pytest.fixture(scope='module')
def model():
  """A shrunk tiny CoCa at its initialisation on 8 devices (data 2 x fsdp 4)."""
  config = shrink(load_config('coca'))
  coca = build_model(config)
  init = lambda rng: init_params(coca, config, rng)
  params = jax.jit(lambda rng: nn.unbox(init(rng)))(jax.random.key(0))
  abstract = jax.eval_shape(init, jax.random.key(0))
  return config, params, abstract, pretrained_on_mesh(config, params, abstract,
                                                      {'data': 2, 'fsdp': 4})


def test_one_device_and_eight_give_identical_results_with_a_partial_chunk(model):
  config, params, abstract, on_eight = model
  config = config.copy_and_resolve_references()
  config.data.eval_examples = 13  # chunks of 8: 8 + 5 padded
  config.evals.captioning.num_examples = 13
  evaluator = Evaluator(config)
  on_one = pretrained_on_mesh(config, params, abstract, {}, jax.devices()[:1])
  one, eight = evaluator(on_one), evaluator(on_eight)
  assert one == eight
  names = ' '.join(one)
  for part in ('top1', 'top5', 'r@1', 'r@5', 'r@10', 'cider', 'bleu', 'greedy', 'beam',
               'linear_probe_shape/accuracy'):
    assert part in names, part
  # Every one of the 13 examples counted once: no dropped or repeated padding rows.
  for key, value in one.items():
    if key.startswith(('retrieval/', 'zeroshot_')) or 'exact_match' in key:
      assert value * 13 == pytest.approx(round(value * 13), abs=1e-9), key
  assert one['linear_probe_shape/accuracy'] * 13 == pytest.approx(
      round(one['linear_probe_shape/accuracy'] * 13), abs=1e-9)




def _fake_coco_source(num_examples: int):
  """A stand-in for `tfds.data_source('coco_captions', ...)` (see the module docstring)."""
  import tensorflow_datasets as tfds
  features = tfds.features.FeaturesDict({
      'image': tfds.features.Image(encoding_format='jpeg'),
      'image/filename': tfds.features.Text(),
      'image/id': np.int64,
      'objects': tfds.features.Sequence({
          'id': np.int64, 'area': np.int64, 'bbox': tfds.features.BBoxFeature(),
          'label': tfds.features.ClassLabel(num_classes=80), 'is_crowd': np.bool_}),
      'captions': tfds.features.Sequence({'text': np.str_, 'id': np.int64}),
  })
  rng = np.random.default_rng(0)
  shapes = SyntheticShapes('test', 24)

  def example(i):
    # Varying caption counts (COCO has 5-7) and image sizes, as real records have.
    texts = [shapes[(i * 7 + j) % 50]['caption'].encode() for j in range(4 + i % 3)]
    return {'image': rng.integers(0, 255, (20 + i, 30, 3), np.uint8),
            'image/filename': f'{i:012d}.jpg'.encode(), 'image/id': np.int64(i),
            'objects': {'id': np.zeros(0, np.int64), 'area': np.zeros(0, np.int64),
                        'bbox': np.zeros((0, 4), np.float32), 'label': np.zeros(0, np.int64),
                        'is_crowd': np.zeros(0, bool)},
            'captions': {'text': np.array(texts, object),
                         'id': np.arange(len(texts), dtype=np.int64)}}
  examples = [example(i) for i in range(num_examples)]

  class Source:
    dataset_info = type('Info', (), {'features': features})()
    __len__ = lambda self: len(examples)
    __getitem__ = lambda self, i: examples[i]
  return Source()


def test_benchmark_configs_run_on_mocked_tfds(model, monkeypatch, tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  config, _, _, pretrained = model
  config = config.copy_and_resolve_references()
  config.evals = load_config('coca', 'base').evals  # the TFDS benchmark entries
  for entry in config.evals.values():
    entry.num_examples = 6
    if entry.type == 'linear_probe':
      entry.train_examples = 10
    if entry.type == 'zeroshot':
      entry.templates = entry.templates[:1]  # 1,110 prompts rather than 8 times as many
  # Readable ImageNet names come from a file, one per line in label order.
  (tmp_path / 'names.txt').write_text(''.join(f'class {i}\n' for i in range(1000)))
  config.evals.imagenet2012.class_names = str(tmp_path / 'names.txt')
  coco = _fake_coco_source(6)
  real_data_source = tfds.data_source
  monkeypatch.setattr(tfds, 'data_source', lambda name, **kw: coco if name == 'coco_captions'
                      else real_data_source(name, **kw))
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    evaluator = Evaluator(config)
    results = evaluator(pretrained)
    cifar = pipeline.eval_examples(config, 'tfds:cifar100:test', 6, 0, 'label')
    raw = tfds.data_source('cifar100', split='test')
    assert cifar['label'].tolist() == [int(raw[i]['label']) for i in range(6)]
    assert cifar['class_names'] == tfds.builder('cifar100').info.features['label'].names
    assert len(cifar['class_names']) == 100
  for name in ('imagenet2012', 'cifar10', 'cifar100'):
    assert 0 <= results[f'{name}/top1'] <= results[f'{name}/top5'] <= 1
  assert 0 <= results['cifar10_probe/accuracy'] <= 1
  for method in ('greedy', 'beam'):
    assert results[f'coco_captioning/cider_{method}'] >= 0
    assert 0 <= results[f'coco_captioning/bleu4_{method}'] <= 1

  # COCO protocol, counted by hand: every caption of an image is a correct answer for it.
  references = [list(coco[i]['captions']['text'].astype(str)) for i in range(6)]
  image_emb = pretrained.encode_image(np.stack(
      [pipeline.transforms.decode_image(coco[i]['image'], 16) for i in range(6)]))
  owners = [i for i, refs in enumerate(references) for _ in refs]
  text_emb = pretrained.encode_text([t for refs in references for t in refs])
  scores = image_emb @ text_emb.T
  for k in (1, 5, 10):
    i2t = np.mean([any(owners[t] == i for t in np.argsort(-scores[i], kind='stable')[:k])
                   for i in range(6)])
    t2i = np.mean([owners[t] in np.argsort(-scores[:, t], kind='stable')[:k]
                   for t in range(len(owners))])
    assert results[f'coco_retrieval/i2t_r@{k}'] == pytest.approx(i2t)
    assert results[f'coco_retrieval/t2i_r@{k}'] == pytest.approx(t2i)


def test_python_api_classifier_and_retrieval(model):
  *_, pretrained = model
  images = SyntheticShapes('test', 16)
  images = np.stack([images[i]['image'] for i in range(5)])
  texts = ['two red circles', 'a blue square', 'one large cross']
  classifier = pretrained.zero_shot_classifier(['red', 'blue'], ['{} shapes', 'a {} shape'])
  prompts = pretrained.encode_text(['red shapes', 'a red shape', 'blue shapes', 'a blue shape'])
  mean = prompts.reshape(2, 2, -1).mean(1)
  np.testing.assert_allclose(classifier, mean / np.linalg.norm(mean, axis=1, keepdims=True),
                             rtol=1e-5, atol=1e-6)
  assert pretrained.zero_shot_classifier(['cat']).shape == (1, classifier.shape[1])

  text_emb, image_emb = pretrained.encode_text(texts), pretrained.encode_image(images)
  for queries, candidates, scores in ((texts, images, text_emb @ image_emb.T),
                                      (images, texts, image_emb @ text_emb.T)):
    idx, top = pretrained.retrieve(queries, candidates, k=2)
    np.testing.assert_array_equal(idx, np.argsort(-scores, axis=1, kind='stable')[:, :2])
    np.testing.assert_allclose(top, np.take_along_axis(scores, idx, 1), rtol=1e-5, atol=1e-6)
  idx, _ = pretrained.retrieve(pretrained.tokenize(texts), images, k=10)  # k > candidates
  assert idx.shape == (3, 5)
