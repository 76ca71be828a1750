"""transformers CLIPModel / SiglipModel <-> vlrep: tiny random models built from configs,
saved with save_pretrained, imported (CLI, `vlrep.load_hf`, `init_from=hf:`), checked
against transformers' own embeddings (1e-4, float32), fine-tuned with the sigmoid loss and
evaluated, and exported back (`--to=hf`) to directories `from_pretrained` loads."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import vlrep  # noqa: E402
from conftest import REPO  # noqa: E402
from vlrep import train  # noqa: E402
from vlrep.data.tokenizer import train_sentencepiece  # noqa: E402
from vlrep.weights import convert, export, hf, init_from, to_hf  # noqa: E402

TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=12)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              image_size=16, patch_size=8)
TEXTS = ['a photo of a cat', 'Two RED cats, one dog!', '', 'a dog runs on the grass ' * 4]
_WORDS = 'a dog cat photo of on the grass runs two red one blue'.split()


def _perturb(model):
  """transformers leaves biases at 0 and norms at 1: make every parameter count."""
  torch.manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'logit' not in name:
        p.add_(0.05 * torch.randn_like(p))
  return model.eval()


def _siglip_tokenizer(path):
  rng = np.random.default_rng(0)
  captions = [' '.join(rng.choice(_WORDS, size=5)) for _ in range(500)]
  model = train_sentencepiece(captions, 40, str(path / 'sp.model'), minloglevel=2, pad_id=0,
                              eos_id=1, unk_id=2, bos_id=-1)
  return transformers.SiglipTokenizer(vocab_file=model)


def _gemma_tokenizer(path):
  """tests/data/test_hf_tokenizer.py's SigLIP 2-style (Gemma) tokenizer.json tokenizer."""
  spec = importlib.util.spec_from_file_location(
      'hf_tokenizer_tests', os.path.join(REPO, 'tests', 'data', 'test_hf_tokenizer.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.gemma_tokenizer(path)


def make_hf_model(path, kind, **vision):
  """A random CLIPModel (CLIP's BPE) or SiglipModel (a small SentencePiece; 'siglip2': a
  SiglipModel with a Gemma-style tokenizer.json, as SigLIP 2's fixed-resolution ones are)
  at `path`."""
  torch.manual_seed(0)
  if kind == 'clip':
    to_hf.write_clip_tokenizer(str(path), max_len=TEXT['max_position_embeddings'])
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    config = transformers.CLIPConfig(text_config=dict(TEXT, eos_token_id=49407),
                                     vision_config={**VISION, **vision}, projection_dim=24)
    model = transformers.CLIPModel(config)
  else:
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _siglip_tokenizer(path) if kind == 'siglip' else _gemma_tokenizer(path)
    config = transformers.SiglipConfig(text_config=dict(TEXT, vocab_size=tokenizer.vocab_size),
                                       vision_config={**VISION, **vision})
    model = transformers.SiglipModel(config)
  _perturb(model).save_pretrained(str(path))
  tokenizer.save_pretrained(str(path))
  return model, tokenizer


def hf_embeddings(model, tokenizer, images):
  """transformers' normalised text (TEXTS) and image (float NHWC) embeddings."""
  ids = tokenizer(TEXTS, padding='max_length', truncation=True,
                  max_length=TEXT['max_position_embeddings'], return_tensors='pt')['input_ids']
  with torch.no_grad():
    text = model.get_text_features(input_ids=ids).pooler_output
    image = model.get_image_features(
        pixel_values=torch.as_tensor(images).permute(0, 3, 1, 2)).pooler_output
  norm = lambda x: torch.nn.functional.normalize(x, dim=-1).numpy()
  return ids.numpy(), norm(text), norm(image)


def _images(count=3):
  return np.random.default_rng(0).normal(size=(count, 16, 16, 3)).astype(np.float32)


def _check_parity(loaded, model, tokenizer):
  ids, want_text, want_image = hf_embeddings(model, tokenizer, _images())
  np.testing.assert_array_equal(loaded.tokenize(TEXTS), ids)
  np.testing.assert_allclose(loaded.encode_text(TEXTS), want_text, atol=1e-4)
  np.testing.assert_allclose(loaded.encode_image(_images()), want_image, atol=1e-4)


def _run_convert(*flags):
  result = subprocess.run(
      [sys.executable, '-m', 'vlrep.convert', *flags], capture_output=True, text=True,
      timeout=300,
      env=dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get('PYTHONPATH', '')])))
  return result


@pytest.mark.parametrize('kind', ['clip', 'siglip', 'siglip2'])
def test_load_hf_embeds_as_transformers(tmp_path, kind):
  model, tokenizer = make_hf_model(tmp_path, kind)
  loaded = vlrep.load_hf(str(tmp_path))
  _check_parity(loaded, model, tokenizer)
  # uint8 images are standardised with the checkpoint's own mean and std (SigLIP: 0.5).
  pixels = np.random.default_rng(1).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  mean, std = hf.IMAGE_STATS['clip' if kind == 'clip' else 'siglip']
  standard = ((pixels / 255.0 - np.asarray(mean)) / np.asarray(std)).astype(np.float32)
  np.testing.assert_allclose(loaded.encode_image(pixels), loaded.encode_image(standard),
                             atol=1e-5)
  assert loaded.config.loss.contrastive_type == ('softmax' if kind == 'clip' else 'sigmoid')

  # Exported back: transformers loads it, with the same weights and embeddings.
  out = tmp_path / 'back'
  to_hf.export_hf(loaded.config, loaded.params, str(out))
  cls = transformers.CLIPModel if kind == 'clip' else transformers.SiglipModel
  again = cls.from_pretrained(str(out)).eval()
  want = model.state_dict()
  for name, value in again.state_dict().items():
    np.testing.assert_array_equal(value.numpy(), want[name].numpy(), err_msg=name)
  _check_parity(loaded, again, transformers.AutoTokenizer.from_pretrained(str(out)))


def test_convert_cli_init_from_fine_tune_evaluate_and_export(tmp_path):
  """SigLIP end to end: --from=hf, init_from=hf:DIR, sigmoid fine-tuning, evaluation, --to=hf."""
  source, output = tmp_path / 'siglip', tmp_path / 'export'
  model, tokenizer = make_hf_model(source, 'siglip')
  result = _run_convert('--from=hf', f'--input={source}', f'--output={output}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'wrote {output}' in result.stdout
  assert sorted(os.listdir(output)) == ['config.json', 'params.safetensors', 'tokenizer']
  loaded = vlrep.load(str(output))
  assert loaded.config.data.tokenizer == f'hf:{output}/tokenizer'
  np.testing.assert_array_equal(loaded.tokenize(TEXTS), hf_embeddings(model, tokenizer,
                                                                       _images())[0])
  # The exported weights are init_from=hf:'s, and those load_hf's (parity: the test above).
  like = export.abstract_params(loaded.config, loaded.mesh)
  direct = init_from.load_params(f'hf:{source}', like)
  jax.tree.map(np.testing.assert_array_equal, direct, loaded.params)

  from test_convert_open_clip import _saved_config  # pylint: disable=g-import-not-at-top
  config = _saved_config(str(output))  # --config=configs/saved.py:DIR
  config.update(batch_size=8, total_steps=2, log_every_steps=1, checkpoint_every_steps=2,
                eval_every_steps=2, eval_batch_size=8, init_from=str(output))
  config.data.eval_examples = 8
  config.optim.update(warmup_steps=1, learning_rate=1e-3)
  with config.unlocked():  # two of the demo's evaluations, on 8 examples
    config.evals = {name: dict(config.evals[name], num_examples=8)
                    for name in ('retrieval', 'zeroshot_shape')}
  run = str(tmp_path / 'tuned')
  train.train_and_evaluate(config, run)
  records = [json.loads(line) for line in open(os.path.join(run, 'metrics.jsonl'))]
  losses = [r['train/loss'] for r in records if 'train/loss' in r]
  assert len(losses) == 2 and np.isfinite(losses).all()
  evals = records[-1]  # the evaluators' metrics at the last step
  assert {'retrieval/i2t_r@1', 'retrieval/t2i_r@1', 'zeroshot_shape/top1'} <= set(evals), evals
  assert all(np.isfinite(v) for v in evals.values()), evals
  tuned = vlrep.load(run)
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                       tuned.params, loaded.params)
  assert 0 < max(jax.tree.leaves(moved)) <= 3e-3, moved
  assert float(np.abs(tuned.params['logit_bias'] - loaded.params['logit_bias'])) > 0

  back = tmp_path / 'hf'
  convert.to_format('hf', run, str(back))  # --to=hf (the flags' parsing is tested above)
  transformers.SiglipModel.from_pretrained(str(back))  # loads (parity: the test above)
  np.testing.assert_array_equal(  # the same ids
      transformers.AutoTokenizer.from_pretrained(str(back))(
          TEXTS, padding='max_length', truncation=True, max_length=12)['input_ids'],
      tuned.tokenize(TEXTS))
  # and the fine-tuned weights, read back, exactly
  jax.tree.map(np.testing.assert_array_equal, hf.convert_dir(str(back))[1],
               jax.device_get(tuned.params))


def test_refusals_are_named(tmp_path):
  with pytest.raises(NotImplementedError, match="Siglip2Model has no vlrep equivalent.*NaFlex"):
    hf.hf_fields({'architectures': ['Siglip2Model']})
  with pytest.raises(NotImplementedError, match='architecture BlipModel has no vlrep'):
    hf.hf_fields({'architectures': ['BlipModel']})
  with pytest.raises(NotImplementedError, match='vision_use_head=False'):
    hf.hf_fields({'model_type': 'siglip', 'vision_config': {'vision_use_head': False}})
  with pytest.raises(NotImplementedError, match="hidden_act='relu'"):
    hf.hf_fields({'model_type': 'clip', 'text_config': {'hidden_act': 'relu'}})
  with pytest.raises(NotImplementedError, match="text hidden_act='gelu' and vision"):
    hf.hf_fields({'model_type': 'clip', 'text_config': {'hidden_act': 'gelu'}})
  with pytest.raises(FileNotFoundError, match='no config.json'):
    vlrep.load_hf(str(tmp_path))
  # A native vlrep model: its layout (no class token, ...) is no CLIPModel's / SiglipModel's.
  from conftest import load_config, shrink  # pylint: disable=g-import-not-at-top
  for name in ('clip', 'siglip'):
    config = shrink(load_config(name))
    config.data.tokenizer = 'clip_bpe'
    # Their attentional pooler makes them SigLIP-like; their embed_dim is no SiglipModel's.
    with pytest.raises(NotImplementedError, match='no transformers SiglipModel equivalent: '
                       'text_config.projection_size=16 != vision hidden_size=32'):
      to_hf.export_hf(config, {}, str(tmp_path / name))
  config.model.update(image_pool='tok', pooler='none')
  with pytest.raises(NotImplementedError, match='no transformers CLIPModel equivalent: .*'
                     r'model\.vision\.class_token=False \(CLIPModel: True\)'):
    to_hf.export_hf(config, {}, str(tmp_path / name))
  config = hf.config_from_fields(hf.hf_fields({'model_type': 'clip'}))  # fits a CLIPModel
  config.data.tokenizer = 'bytes'
  with pytest.raises(NotImplementedError, match="data.tokenizer='bytes' has no transformers"):
    to_hf.export_hf(config, {}, str(tmp_path / 'b'))
  result = _run_convert('--from=open_clip', f'--input={tmp_path}', f'--output={tmp_path}/x')
  assert result.returncode != 0 and "--from='open_clip'" in result.stderr
  assert convert.DIRECTIONS == ('hf', 'open_clip')
