"""A vlrep model -> a Hugging Face `transformers` CLIPModel or SiglipModel directory.

`export_hf(config, params, DIR)` writes what `from_pretrained(DIR)` reads: `config.json`,
`model.safetensors` (float32, transformers' names), `preprocessor_config.json` (image
size, mean and std) and the tokenizer files (those of an `hf:DIR` tokenizer, or CLIP's
vocab.json / merges.txt for `clip_bpe`). A model with an attentional pooler exports as a
SiglipModel, one without as a CLIPModel. Whether the layout fits is decided by the import's
own mapping: the transformers config written here is read back through
`hf.hf_fields`, and every vlrep field that comes back different is named in the refusal
(e.g. a native CoCa's `model.vision.class_token=False` where a CLIPModel has a class
token), so the export never writes a model that would load as another network.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
import numpy as np

from vlrep.weights import hf, hf_params

_HIDDEN_ACT = {'quick_gelu': 'quick_gelu', 'gelu': 'gelu', 'gelu_tanh': 'gelu_pytorch_tanh'}
_CLIP_SPECIAL = ('<|startoftext|>', '<|endoftext|>')
# Fields `hf.hf_fields` sets that are training choices, not the network's layout.
_NOT_ARCHITECTURE = ('loss.caption_weight',)


def _tower(config: ml_collections.ConfigDict, tower: str) -> dict:
  m = config.model
  t = m.text if tower == 'text' else m.vision
  out = dict(hidden_size=t.width, intermediate_size=t.mlp_dim, num_attention_heads=t.heads,
             hidden_act=_HIDDEN_ACT.get(m.activation, m.activation),
             layer_norm_eps=float(t.ln_eps))
  if tower == 'text':
    out.update(vocab_size=t.vocab_size, num_hidden_layers=t.unimodal_layers,
               max_position_embeddings=config.data.max_text_len)
  else:
    out.update(num_hidden_layers=t.layers, image_size=config.data.image_size,
               patch_size=t.patch_size, num_channels=3)
  return out


def hf_config(config: ml_collections.ConfigDict, tokenizer: Any = None) -> dict:
  """The transformers config.json of a vlrep model (its layout is checked in `export_hf`)."""
  m = config.model
  text, vision = _tower(config, 'text'), _tower(config, 'vision')
  if tokenizer is not None:
    text.update(pad_token_id=int(tokenizer.pad_id), bos_token_id=int(tokenizer.bos_id),
                eos_token_id=int(tokenizer.eos_id))
  if m.image_pool == 'attn':
    text['projection_size'] = m.embed_dim
    vision['vision_use_head'] = True
    return {'architectures': ['SiglipModel'], 'model_type': 'siglip', 'text_config': text,
            'vision_config': vision}
  # transformers pools the highest id ('argmax') exactly when eos_token_id is 2.
  text['eos_token_id'] = 2 if m.text.pool == 'argmax' else int(m.text.eos_id)
  text['projection_dim'] = vision['projection_dim'] = m.embed_dim
  return {'architectures': ['CLIPModel'], 'model_type': 'clip', 'projection_dim': m.embed_dim,
          'logit_scale_init_value': 2.6592, 'text_config': text, 'vision_config': vision}


def _preprocessor(config: ml_collections.ConfigDict, siglip: bool) -> dict:
  v, size = config.model.vision, int(config.data.image_size)
  common = dict(do_resize=True, resample=3, do_rescale=True, rescale_factor=1 / 255,
                do_normalize=True, image_mean=list(v.image_mean), image_std=list(v.image_std))
  if siglip:
    return dict(common, image_processor_type='SiglipImageProcessor',
                size={'height': size, 'width': size})
  return dict(common, image_processor_type='CLIPImageProcessor', size={'shortest_edge': size},
              do_center_crop=True, crop_size={'height': size, 'width': size},
              do_convert_rgb=True)


def layout_differences(config: ml_collections.ConfigDict, hf_cfg: dict,
                       preprocessor: dict) -> list[str]:
  """'field=ours (transformers: theirs)' for every field the transformers config reads
  back differently."""
  out = []
  for key, theirs in hf.hf_fields(hf_cfg, preprocessor).items():
    if key in _NOT_ARCHITECTURE:
      continue
    node = config
    for part in key.split('.'):
      node = node.get(part) if node is not None else None
    ours = tuple(node) if isinstance(node, (list, tuple)) else node
    theirs = tuple(theirs) if isinstance(theirs, (list, tuple)) else theirs
    if ours != theirs and not (isinstance(ours, float) and np.isclose(ours, theirs)):
      out.append(f'{key}={ours!r} ({hf_cfg["architectures"][0]}: {theirs!r})')
  return out


def write_clip_tokenizer(path: str, pad_token: str = _CLIP_SPECIAL[1], max_len: int = 77,
                         merges_file: str = '') -> None:
  """CLIPTokenizer files (vocab.json, merges.txt, tokenizer_config.json) from vlrep's CLIP
  BPE vocabulary. Padded with EOT, as OpenAI's transformers checkpoints are: a pad token
  '!' (id 0, vlrep's and open_clip's padding) would make transformers read every '!' in a
  text as padding. The text embedding never reads the padding (causal, pooled at EOT)."""
  from vlrep.data import clip_bpe  # pylint: disable=g-import-not-at-top
  pieces, merges = clip_bpe.get(merges_file).vocabulary()
  pieces[-2:] = _CLIP_SPECIAL  # open_clip names them <start_of_text> / <end_of_text>
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, 'vocab.json'), 'w', encoding='utf-8') as f:
    json.dump({p: i for i, p in enumerate(pieces)}, f, ensure_ascii=False)
  with open(os.path.join(path, 'merges.txt'), 'w', encoding='utf-8') as f:
    f.write('#version: 0.2\n' + ''.join(f'{a} {b}\n' for a, b in merges))
  with open(os.path.join(path, 'tokenizer_config.json'), 'w') as f:
    json.dump({'tokenizer_class': 'CLIPTokenizer', 'bos_token': _CLIP_SPECIAL[0],
               'eos_token': _CLIP_SPECIAL[1], 'unk_token': _CLIP_SPECIAL[1],
               'pad_token': pad_token, 'model_max_length': max_len}, f, indent=2)


def _check_tokenizer(config: ml_collections.ConfigDict) -> None:
  if config.data.tokenizer.partition(':')[0] not in ('hf', 'clip_bpe'):
    raise NotImplementedError(f'data.tokenizer={config.data.tokenizer!r} has no transformers '
                              'tokenizer to export (clip_bpe and hf:DIR tokenizers do)')


def _write_tokenizer(config: ml_collections.ConfigDict, path: str) -> None:
  name, _, source = config.data.tokenizer.partition(':')
  if name == 'hf':
    hf.copy_tokenizer(os.path.expanduser(source), path)
  else:
    write_clip_tokenizer(path, max_len=config.data.max_text_len, merges_file=source)


def export_hf(config: ml_collections.ConfigDict, params: Any, path: str) -> str:
  """Writes the transformers directory of a vlrep model (module docstring); returns path."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  from vlrep.weights import export  # pylint: disable=g-import-not-at-top
  from vlrep.data.tokenizer import get_tokenizer  # pylint: disable=g-import-not-at-top

  if config.model.text.multimodal_layers:
    raise NotImplementedError(f'model.text.multimodal_layers={config.model.text.multimodal_layers}'
                              ': CLIPModel and SiglipModel have no captioning decoder')
  _check_tokenizer(config)
  tokenizer = get_tokenizer(config.data.tokenizer)
  hf_cfg = hf_config(config, tokenizer)
  siglip = hf_cfg['model_type'] == 'siglip'
  preprocessor = _preprocessor(config, siglip)
  try:
    differences = layout_differences(config, hf_cfg, preprocessor)
  except NotImplementedError as e:  # the transformers config itself is out of bounds
    differences = [str(e)]
  if differences:
    raise NotImplementedError(f'this model\'s layout has no transformers '
                              f'{hf_cfg["architectures"][0]} equivalent: ' + '; '.join(differences))
  state_dict = hf_params.to_hf(export.host_arrays(params),
                               hf_params.entries(config, siglip=siglip))
  os.makedirs(path, exist_ok=True)
  _write_tokenizer(config, path)
  for name, content in (('config.json', hf_cfg), ('preprocessor_config.json', preprocessor)):
    with open(os.path.join(path, name), 'w') as f:
      json.dump(content, f, indent=2)
  safetensors.numpy.save_file(state_dict, os.path.join(path, 'model.safetensors'),
                              metadata={'format': 'pt'})
  return path
