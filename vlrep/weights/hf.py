"""Hugging Face `transformers` CLIPModel and SiglipModel directories -> a vlrep model.

`convert_dir(DIR)` reads a `save_pretrained` directory (`config.json`, `model.safetensors`
or its sharded index, `preprocessor_config.json` and the tokenizer files when present) and
returns the vlrep config that describes the same network (`vlrep.config.defaults()` with
its layout options set) and the float32 parameters `build_model(config)` applies;
`load_hf(DIR)` wraps them in `vlrep.Pretrained`. transformers itself is not needed to read one.

The layouts: CLIP is a class token, `ln_pre`, the class token's output normalised after
pooling (`pooled_norm`), causal text with argmax ('legacy' `eos_token_id=2`) or first-EOS
pooling. SigLIP (and SigLIP 2's fixed-resolution checkpoints, which are `SiglipModel`s with
a Gemma tokenizer) is a patch bias and no class token, its attention-pooling head a parallel
attentional pooler over the normalised tokens with no LayerNorm on its context and a
residual MLP, no image projection; its text tower is bidirectional, unmasked, and pools the
last position, projected with a bias; the loss is sigmoid with the learned bias. The
tokenizer travels as `data.tokenizer=hf:DIR` (`vlrep/data/hf_tokenizer.py`). Anything else
(other architectures, SigLIP 2's NaFlex `Siglip2Model`, no pooling head, unknown
activations) is refused by name. `hf_fields(hf_config)` is the config mapping alone, which
the export (`vlrep/weights/to_hf.py`) inverts and checks against.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import ml_collections
import numpy as np

from vlrep import config as vlrep_config
from vlrep.data.tokenizer import get_tokenizer
from vlrep.weights import hf_params
from vlrep.weights.open_clip import _check_shapes

ARCHITECTURES = {'CLIPModel': 'clip', 'SiglipModel': 'siglip'}
# transformers' `hidden_act` names -> vlrep's model.activation.
ACTIVATIONS = {'quick_gelu': 'quick_gelu', 'gelu': 'gelu', 'gelu_pytorch_tanh': 'gelu_tanh',
               'gelu_new': 'gelu_tanh'}
# The config classes' defaults for the fields read here (transformers 5: CLIPTextConfig,
# CLIPVisionConfig, SiglipTextConfig, SiglipVisionConfig), so that a config.json that
# leaves fields out reads as transformers reads it.
_COMMON = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
               num_attention_heads=12, num_channels=3)
DEFAULTS = {
    ('clip', 'text'): dict(_COMMON, vocab_size=49408, hidden_size=512, intermediate_size=2048,
                           num_attention_heads=8, max_position_embeddings=77,
                           hidden_act='quick_gelu', layer_norm_eps=1e-5, pad_token_id=1,
                           bos_token_id=49406, eos_token_id=49407),
    ('clip', 'vision'): dict(_COMMON, image_size=224, patch_size=32, hidden_act='quick_gelu',
                             layer_norm_eps=1e-5),
    ('siglip', 'text'): dict(_COMMON, vocab_size=32000, max_position_embeddings=64,
                             hidden_act='gelu_pytorch_tanh', layer_norm_eps=1e-6,
                             pad_token_id=1, projection_size=None),
    ('siglip', 'vision'): dict(_COMMON, image_size=224, patch_size=16,
                               hidden_act='gelu_pytorch_tanh', layer_norm_eps=1e-6,
                               vision_use_head=True),
}
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGE_STATS = {'clip': (CLIP_MEAN, CLIP_STD), 'siglip': ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json',
                   'spiece.model', 'tokenizer.model', 'vocab.json', 'merges.txt')


def kind_of(hf_config: Mapping[str, Any]) -> str:
  """'clip' or 'siglip'; any other architecture is refused by name."""
  names = list(hf_config.get('architectures') or [])
  model_type = hf_config.get('model_type')
  for name in names:
    if name in ARCHITECTURES:
      return ARCHITECTURES[name]
  if not names and model_type in ('clip', 'siglip'):
    return model_type
  found = names[0] if names else f'model_type={model_type!r}'
  hint = (": SigLIP 2's NaFlex (variable-resolution) model; its fixed-resolution "
          'checkpoints are SiglipModel and convert' if 'Siglip2' in str(found) else '')
  raise NotImplementedError(f'transformers architecture {found} has no vlrep equivalent '
                            f'(supported: {", ".join(ARCHITECTURES)}){hint}')


def _tower(hf_config: Mapping[str, Any], kind: str, tower: str) -> dict:
  return {**DEFAULTS[kind, tower], **(hf_config.get(f'{tower}_config') or {})}


def _activation(text: Mapping[str, Any], vision: Mapping[str, Any]) -> str:
  acts = {text['hidden_act'], vision['hidden_act']}
  for act in acts:
    if act not in ACTIVATIONS:
      raise NotImplementedError(f'hidden_act={act!r} has no vlrep equivalent (supported: '
                                f'{", ".join(ACTIVATIONS)})')
  if len({ACTIVATIONS[a] for a in acts}) > 1:
    raise NotImplementedError(f'text hidden_act={text["hidden_act"]!r} and vision '
                              f'hidden_act={vision["hidden_act"]!r}: vlrep has one '
                              'model.activation')
  return ACTIVATIONS[acts.pop()]


def hf_fields(hf_config: Mapping[str, Any],
              preprocessor: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The vlrep config fields ('model.vision.width': value, ...) of a transformers config."""
  kind = kind_of(hf_config)
  text, vision = _tower(hf_config, kind, 'text'), _tower(hf_config, kind, 'vision')
  if vision['num_channels'] != 3:
    raise NotImplementedError(f'vision_config.num_channels={vision["num_channels"]}: vlrep '
                              'reads RGB images')
  if vision['image_size'] % vision['patch_size']:
    raise NotImplementedError(f'vision_config.image_size={vision["image_size"]} is not a '
                              f'multiple of patch_size={vision["patch_size"]}')
  mean, std = IMAGE_STATS[kind]
  if preprocessor:
    mean, std = preprocessor.get('image_mean', mean), preprocessor.get('image_std', std)
  f = {'model.activation': _activation(text, vision),
       'model.vision.patch_size': vision['patch_size'], 'model.vision.width': vision['hidden_size'],
       'model.vision.layers': vision['num_hidden_layers'],
       'model.vision.heads': vision['num_attention_heads'],
       'model.vision.mlp_dim': vision['intermediate_size'], 'model.vision.stem_channels': (),
       'model.vision.ln_eps': float(vision['layer_norm_eps']), 'model.vision.layer_scale': 0.0,
       'model.vision.image_mean': tuple(float(x) for x in mean),
       'model.vision.image_std': tuple(float(x) for x in std),
       'model.text.vocab_size': text['vocab_size'], 'model.text.width': text['hidden_size'],
       'model.text.heads': text['num_attention_heads'],
       'model.text.unimodal_layers': text['num_hidden_layers'],
       'model.text.mlp_dim': text['intermediate_size'], 'model.text.multimodal_layers': 0,
       'model.text.embed_cls': False, 'model.text.pad_mask': 'none',
       'model.text.ln_eps': float(text['layer_norm_eps']), 'model.text.layer_scale': 0.0,
       'model.pooled_norm': kind == 'clip', 'model.image_projection': kind == 'clip',
       'data.image_size': vision['image_size'],
       'data.max_text_len': text['max_position_embeddings'],
       'loss.caption_weight': 0.0,
       'loss.contrastive_type': 'sigmoid' if kind == 'siglip' else 'softmax'}
  if kind == 'clip':
    f.update({'model.vision.class_token': True, 'model.vision.ln_pre': True,
              'model.vision.patch_bias': False, 'model.vision.final_norm': False,
              'model.pooler': 'none', 'model.image_pool': 'tok',
              'model.embed_dim': hf_config.get('projection_dim', 512),
              'model.text.causal': True, 'model.text_projection_bias': False})
    if text['eos_token_id'] == 2:  # transformers' legacy configs: the highest id is the EOT
      f['model.text.pool'] = 'argmax'
    else:
      f.update({'model.text.pool': 'eos', 'model.text.eos_id': text['eos_token_id']})
  else:
    if not vision['vision_use_head']:
      raise NotImplementedError('vision_config.vision_use_head=False: a SigLIP vision tower '
                                'without its pooling head has no image embedding')
    projection = text['projection_size'] or text['hidden_size']
    if projection != vision['hidden_size']:
      raise NotImplementedError(f'text_config.projection_size={projection} != vision '
                                f'hidden_size={vision["hidden_size"]}: the embeddings must meet')
    f.update({'model.vision.class_token': False, 'model.vision.ln_pre': False,
              'model.vision.patch_bias': True, 'model.vision.final_norm': True,
              'model.pooler': 'parallel', 'model.image_pool': 'attn',
              'model.pooler_heads': vision['num_attention_heads'], 'model.pooler_width': 0,
              'model.pooler_query_norm': False, 'model.pooler_output_norm': False,
              'model.pooler_context_norm': False,
              'model.pooler_mlp_dim': vision['intermediate_size'],
              'model.ln_eps': float(vision['layer_norm_eps']),
              'model.embed_dim': vision['hidden_size'], 'model.text.causal': False,
              'model.text.pool': 'last', 'model.text_projection_bias': True})
  return f


def config_from_fields(fields: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """`vlrep.config.defaults()` with `fields` set."""
  config = vlrep_config.defaults()
  vlrep_config.set_fields(config, fields)
  return config


def _read_json(path: str) -> dict | None:
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def read_weights(path: str) -> dict[str, np.ndarray]:
  """`model.safetensors` (or the shards its index names) of a transformers directory."""
  from vlrep.weights.open_clip import read_state_dict  # pylint: disable=g-import-not-at-top
  single = os.path.join(path, 'model.safetensors')
  if os.path.isfile(single):
    return read_state_dict(single)
  index = _read_json(os.path.join(path, 'model.safetensors.index.json'))
  if index is None:
    if os.path.isfile(os.path.join(path, 'pytorch_model.bin')):
      return read_state_dict(os.path.join(path, 'pytorch_model.bin'))
    raise FileNotFoundError(f'{path!r} has no model.safetensors (nor its index, nor '
                            'pytorch_model.bin)')
  out = {}
  for shard in sorted(set(index['weight_map'].values())):
    out.update(read_state_dict(os.path.join(path, shard)))
  return out


def has_tokenizer(path: str) -> bool:
  return any(os.path.isfile(os.path.join(path, f)) for f in ('tokenizer.json', 'spiece.model'))


def convert_dir(path: str, tokenizer_dir: str | None = None
                ) -> tuple[ml_collections.ConfigDict, dict]:
  """(vlrep config, float32 params) of a transformers CLIPModel / SiglipModel directory.

  The config's `data.tokenizer` is `hf:` + `tokenizer_dir` (default: `path` itself) when
  `path` has tokenizer files, CLIP's BPE for a tokenizer-less CLIP of CLIP's vocabulary.
  """
  path = os.path.abspath(os.path.expanduser(path))
  hf_config = _read_json(os.path.join(path, 'config.json'))
  if hf_config is None:
    raise FileNotFoundError(f'{path!r} has no config.json: not a transformers model directory')
  fields = hf_fields(hf_config, _read_json(os.path.join(path, 'preprocessor_config.json')))
  config = config_from_fields(fields)
  if has_tokenizer(path):
    config.data.tokenizer = 'hf:' + os.path.abspath(tokenizer_dir or path)
    # The losses and decoding skip the model's pad id, which must be the tokenizer's.
    config.model.text.pad_id = get_tokenizer('hf:' + path).pad_id
  elif kind_of(hf_config) == 'clip' and config.model.text.vocab_size == 49408:
    config.data.tokenizer = 'clip_bpe'
  else:
    raise FileNotFoundError(f'{path!r} has no tokenizer.json nor spiece.model')
  table = hf_params.entries(config, siglip=kind_of(hf_config) == 'siglip')
  params = hf_params.to_vlrep(read_weights(path), table)
  _check_shapes(config, params, 'the converted transformers weights')
  return config, params


def copy_tokenizer(source: str, dest: str) -> None:
  """Copies the tokenizer files of a transformers directory to `dest`."""
  import shutil  # pylint: disable=g-import-not-at-top
  os.makedirs(dest, exist_ok=True)
  for name in TOKENIZER_FILES:
    if os.path.isfile(os.path.join(source, name)):
      shutil.copyfile(os.path.join(source, name), os.path.join(dest, name))


def load_hf(path: str, tokenizer_dir: str | None = None):
  """A `vlrep.Pretrained` holding a transformers CLIPModel or SiglipModel (module doc)."""
  import jax  # pylint: disable=g-import-not-at-top
  from vlrep.parallel import sharding  # pylint: disable=g-import-not-at-top
  from vlrep.pretrained import Pretrained  # pylint: disable=g-import-not-at-top

  config, params = convert_dir(path, tokenizer_dir)
  mesh = sharding.make_mesh(sharding.DATA_PARALLEL)
  params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  return Pretrained(config, params, mesh=mesh)
