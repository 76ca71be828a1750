"""config.init_from: a new run starts from an export's or a run's parameters exactly, or from
part of them (init_from_include / init_from_exclude), position embeddings resized."""

import json
import os
import re

import flax.linen as nn
import jax
import numpy as np
import pytest

import vlrep
from vlrep import train
from vlrep.models.build import build_model, init_params
from vlrep.parallel import sharding
from vlrep.pretrained import Pretrained
from vlrep.weights import export, init_from

from conftest import load_config, shrink


def test_fine_tune_from_export_then_from_run(config, tmp_path):
  config.total_steps = 1
  config.eval_every_steps = 0
  # The weights to start from: another initialisation (seed 1), exported.
  model = build_model(config)
  weights = jax.jit(lambda: nn.unbox(init_params(model, config, jax.random.key(1))))()
  exported = Pretrained(config, weights).save(str(tmp_path / 'export'))
  # configs/saved.py:DIR gives a new run the exported model's config.
  assert json.loads(load_config('saved', exported).to_json()) == json.loads(config.to_json())

  # A run started from it: with learning rate 0 its parameters stay exactly the exported
  # ones, so they are what it started from (not its own seed-0 initialisation); the loop
  # still runs end to end (metrics, checkpoint).
  config.init_from = exported
  config.optim.learning_rate = 0.0
  run = str(tmp_path / 'run')
  train.train_and_evaluate(config, run)
  tuned = vlrep.load(run)
  jax.tree.map(np.testing.assert_array_equal, tuned.params, weights)
  records = [json.loads(line) for line in open(os.path.join(run, 'metrics.jsonl'))]
  assert [r['step'] for r in records if 'train/loss' in r] == [1]
  assert np.isfinite(records[-1]['train/loss'])

  # Running it again resumes from its own checkpoint: init_from is not read (it would fail).
  config.init_from = str(tmp_path / 'missing')
  train.train_and_evaluate(config, run)
  assert sorted(os.listdir(os.path.join(run, 'checkpoints'))) == ['1']

  # A run directory as the source: its latest checkpoint's parameters.
  like = export.abstract_params(config, sharding.make_mesh(sharding.DATA_PARALLEL))
  jax.tree.map(np.testing.assert_array_equal, init_from.load_params(run, like), weights)

  # A model of another shape: one error names the array and both shapes (train.py calls
  # load_params with the new run's initial parameters, as here).
  other = config.copy_and_resolve_references()
  other.model.embed_dim = 8
  other_like = export.abstract_params(other, sharding.make_mesh(sharding.DATA_PARALLEL))
  with pytest.raises(ValueError, match=r'text_projection/kernel: \(32, 16\) in init_from=.*, '
                                       r'\(32, 8\) in the config'):
    init_from.load_params(exported, other_like)
  with pytest.raises(FileNotFoundError, match='neither a vlrep run directory nor'):
    init_from.load_params(str(tmp_path / 'missing'), like)
  with pytest.raises(ValueError, match='open_clip:STATE_DICT_PATH:MODEL_CFG_JSON'):
    init_from.load_params('open_clip:weights.pt', like)


# init_from in part: a subset of the arrays, resized position embeddings.

# What a CoCa has and a CLIP lacks: the captioning pooler and the decoder's multimodal half
# with its final LayerNorm and output head (README "Weights in and out").
COCA_ONLY = ('captioning_pooler/.*', 'text_decoder/(multimodal_.*|ln_final|output_head)/.*')


def _init(config, seed: int) -> dict:
  """A fresh initialisation as named arrays, as a run with this seed starts."""
  model = build_model(config)
  return export.named_arrays(
      jax.jit(lambda: nn.unbox(init_params(model, config, jax.random.key(seed))))())


def _like(config):
  """The new run's own initial parameters (seed 0), the tree `train.py` hands load_params."""
  model = build_model(config)
  return jax.jit(lambda: nn.unbox(init_params(model, config, jax.random.key(0))))()


def _load(config, like):
  return export.named_arrays(init_from.load_params(config.init_from, like, config))


def _coca(**data):
  config = shrink(load_config('coca'))
  config.data.update(data)
  return config


@pytest.fixture(scope='module')
def clip_export(tmp_path_factory):
  """(directory, named arrays): a CLIP export of a seed-1 initialisation, never trained."""
  clip = shrink(load_config('clip'))
  arrays = _init(clip, seed=1)
  return export.save(str(tmp_path_factory.mktemp('clip')), clip, arrays), arrays


@pytest.fixture(scope='module')
def coca_export(tmp_path_factory):
  coca = _coca()
  arrays = _init(coca, seed=1)
  return export.save(str(tmp_path_factory.mktemp('coca')), coca, arrays), arrays


def test_coca_run_from_a_clip_export_takes_the_shared_arrays_the_rest_fresh(clip_export,
                                                                            tmp_path):
  exported, source = clip_export
  config = _coca()
  config.update(total_steps=1, eval_every_steps=0, init_from=exported,
                init_from_exclude=COCA_ONLY)
  config.optim.learning_rate = 0.0  # the parameters stay those it started from
  run = str(tmp_path / 'run')
  train.train_and_evaluate(config, run)
  got = export.named_arrays(vlrep.load(run).params)
  fresh = _init(config, seed=config.seed)  # the same run started from scratch
  shared = [n for n in got if not any(re.fullmatch(p, n) for p in COCA_ONLY)]
  assert set(shared) == set(source) and len(shared) < len(got)
  for name, value in got.items():
    np.testing.assert_array_equal(value, source[name] if name in source else fresh[name],
                                  err_msg=name)
  assert not np.array_equal(got['image_encoder/pos_embed'], fresh['image_encoder/pos_embed'])


def test_include_takes_only_the_image_tower(clip_export):
  exported, source = clip_export
  config = _coca()
  config.update(init_from=exported, init_from_include=('image_encoder/.*',))
  like = _like(config)
  got, fresh = _load(config, like), export.named_arrays(like)
  tower = [n for n in got if n.startswith('image_encoder/')]
  assert len(tower) > 10
  for name, value in got.items():
    np.testing.assert_array_equal(value, source[name] if name in tower else fresh[name],
                                  err_msg=name)


@pytest.mark.parametrize('class_token', [False, True])
def test_image_pos_embed_resized_by_2d_interpolation_of_the_grid(tmp_path, caplog, class_token):
  source_config = _coca()  # 16 px images, 8 px patches: a 2 x 2 grid
  source_config.model.vision.class_token = class_token
  arrays = _init(source_config, seed=1)
  width = source_config.model.vision.width
  # Grid row r's embedding is rows[r] in both columns: constant along one axis.
  rows = np.array([[1.0], [3.0]]) + np.arange(width) / width
  grid = np.repeat(rows[:, None], 2, axis=1).reshape(4, width)
  cls = np.full((int(class_token), width), 7.0)
  arrays['image_encoder/pos_embed'] = np.concatenate([cls, grid]).astype(np.float32)
  exported = export.save(str(tmp_path / 'export'), source_config, arrays)

  config = _coca(image_size=32)  # a 4 x 4 grid
  config.model.vision.class_token = class_token
  config.init_from = exported
  caplog.set_level('INFO')
  got = _load(config, _like(config))
  # Bilinear with half-pixel centres, 2 -> 4: output row i samples input position
  # (i + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25 (the ends clamp to the edge rows).
  weights = np.array([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])
  want = np.repeat((weights @ rows)[:, None], 4, axis=1).reshape(16, width)
  np.testing.assert_allclose(got['image_encoder/pos_embed'], np.concatenate([cls, want]),
                             rtol=0, atol=1e-6)
  # Not a 1-D resize of the flattened sequence [a, a, b, b], which is no grid row by row.
  flat = np.asarray(jax.image.resize(grid, (16, width), 'bilinear'))
  assert not np.allclose(flat, want, atol=1e-3)
  for name, value in got.items():
    if name != 'image_encoder/pos_embed':
      np.testing.assert_array_equal(value, arrays[name], err_msg=name)
  rows_before, rows_after = 4 + class_token, 16 + class_token
  assert (f'image_encoder/pos_embed resized from ({rows_before}, {width}) to '
          f'({rows_after}, {width})') in caplog.text


@pytest.mark.parametrize('max_text_len', [16, 32])
def test_text_pos_embed_cut_or_extended(coca_export, max_text_len):
  exported, source = coca_export  # max_text_len 24: 24 positions + the [CLS] row, last
  config = _coca(max_text_len=max_text_len)
  config.init_from = exported
  like = _like(config)
  got, fresh = _load(config, like), export.named_arrays(like)
  old, new = source['text_decoder/pos_embed'], fresh['text_decoder/pos_embed']
  kept = min(24, max_text_len)
  want = np.concatenate([old[:kept], new[kept:max_text_len], old[-1:]])
  np.testing.assert_array_equal(got['text_decoder/pos_embed'], want)
  assert got['text_decoder/pos_embed'].shape == (max_text_len + 1, 32)
  # Without a [CLS] row last (no [CLS], or 'after_tokens') every row is a position.
  table = np.arange(10.0)[:, None]
  np.testing.assert_array_equal(
      init_from.resize_text_pos_embed(table, 4, False, lambda: None), table[:4])
  np.testing.assert_array_equal(
      init_from.resize_text_pos_embed(table, 12, False, lambda: -np.ones((12, 1))),
      np.concatenate([table, [[-1.0], [-1.0]]]))


def test_other_mismatches_fail_naming_each_array_and_both_shapes(coca_export):
  exported, _ = coca_export
  config = _coca(image_size=32)  # resized: not among the mismatches
  config.model.embed_dim = 8
  config.init_from = exported
  with pytest.raises(ValueError) as e:
    _load(config, _like(config))
  message = str(e.value)
  assert '(2 arrays)' in message and 'pos_embed' not in message
  for name in ('image_projection/kernel', 'text_projection/kernel'):
    assert f'{name}: (32, 16) in init_from={exported!r}, (32, 8) in the config' in message
  # A class token the source lacks: its row is no grid, so the table does not resize.
  config = _coca()
  config.model.vision.class_token = True
  config.init_from = exported
  with pytest.raises(ValueError, match=r'image_encoder/pos_embed: \(4, 32\) in init_from=.*, '
                                       r'\(5, 32\) in the config.*image_encoder/cls_embed: '
                                       r'not in init_from'):
    _load(config, _like(config))


def test_patterns_and_arrays_the_other_side_lacks(clip_export, coca_export):
  clip_dir, _ = clip_export
  coca_dir, coca_arrays = coca_export
  config = _coca()
  config.init_from = clip_dir
  like = _like(config)
  # Patterns match whole paths: 'decoder/.*' is not 'text_decoder/...'.
  for field, pattern in (('init_from_include', 'image_encoder/nope.*'),
                         ('init_from_exclude', 'decoder/.*')):
    config[field] = (pattern,)
    with pytest.raises(ValueError, match=f"no parameter matches {field} '{re.escape(pattern)}'"):
      _load(config, like)
    config[field] = ()
  # A parameter the CLIP lacks, not left out: named.
  with pytest.raises(ValueError, match=r'captioning_pooler/attention/key/bias: not in '
                                       r'init_from=.*init_from_include / init_from_exclude'):
    _load(config, like)
  # A CLIP run from a CoCa: the arrays it lacks must be left out, by patterns that match
  # only the source's names.
  clip = shrink(load_config('clip'))
  clip.init_from = coca_dir
  clip_like = _like(clip)
  with pytest.raises(ValueError, match=r'captioning_pooler/attention/key/bias: in init_from=.* '
                                       r'\(2, 16\) but not in the config'):
    _load(clip, clip_like)
  clip.init_from_exclude = COCA_ONLY
  for name, value in _load(clip, clip_like).items():
    np.testing.assert_array_equal(value, coca_arrays[name], err_msg=name)
  # Checked with the rest of the config, before anything compiles.
  for changes, message in (({'init_from_include': ('image_encoder/.*',)}, 'needs init_from'),
                           ({'init_from': 'x', 'init_from_exclude': ('(',)},
                            "'\\(' is not a regular expression")):
    bad = _coca()
    bad.update(changes)
    with pytest.raises(ValueError, match=message):
      train.validate(bad)
