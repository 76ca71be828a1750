"""Hugging Face CLIPModel / SiglipModel state dict entries <-> vlrep parameters, both ways.

`entries(config)` lists, for the vlrep model `config` describes, every parameter as
(transformers name, vlrep '/'-path, kind, heads): the one table that `to_vlrep` reads
forwards (import) and `to_hf` backwards (export), so the two directions cannot drift
apart. Kinds: 'copy'; 'linear' (torch [out, in] <-> kernel [in, out]); 'heads_in' /
'heads_bias' / 'heads_out' (attention projections split into heads); 'conv' (torch
OIHW <-> HWIO); 'scalar' / 'scalar1' (shape () or (1,) in torch, () here); 'probe'
(SigLIP's [1, 1, W] query <-> [1, W]). A name ending in '#i' is the i-th third of a packed
`nn.MultiheadAttention` in-projection (SigLIP's pooling head). Names follow transformers'
modules (`CLIPEncoderLayer`: layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2,
mlp.fc1/fc2; `SiglipMultiheadAttentionPoolingHead`: probe, attention, layernorm, mlp).
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections
import numpy as np

Entry = tuple[str, str, str, int]


def _ln(hf: str, path: str) -> list[Entry]:
  return [(f'{hf}.weight', f'{path}/scale', 'copy', 0), (f'{hf}.bias', f'{path}/bias', 'copy', 0)]


def _linear(hf: str, path: str, bias: bool = True) -> list[Entry]:
  out = [(f'{hf}.weight', f'{path}/kernel', 'linear', 0)]
  return out + [(f'{hf}.bias', f'{path}/bias', 'copy', 0)] if bias else out


def _attention(path: str, heads: int, names: dict[str, str]) -> list[Entry]:
  """{'query': hf weight name, ..., 'out': ...}; the q/k/v names carry their bias name."""
  out = []
  for part in ('query', 'key', 'value'):
    weight, bias = names[part]
    out += [(weight, f'{path}/{part}/kernel', 'heads_in', heads),
            (bias, f'{path}/{part}/bias', 'heads_bias', heads)]
  return out + [(f'{names["out"]}.weight', f'{path}/out/kernel', 'heads_out', heads),
                (f'{names["out"]}.bias', f'{path}/out/bias', 'copy', 0)]


def _encoder_layer(hf: str, path: str, heads: int) -> list[Entry]:
  attn = {part: (f'{hf}.self_attn.{p}_proj.weight', f'{hf}.self_attn.{p}_proj.bias')
          for part, p in (('query', 'q'), ('key', 'k'), ('value', 'v'))}
  attn['out'] = f'{hf}.self_attn.out_proj'
  return (_ln(f'{hf}.layer_norm1', f'{path}/ln_self') +
          _attention(f'{path}/self_attention', heads, attn) +
          _ln(f'{hf}.layer_norm2', f'{path}/ln_mlp') +
          _linear(f'{hf}.mlp.fc1', f'{path}/mlp/fc1') + _linear(f'{hf}.mlp.fc2', f'{path}/mlp/fc2'))


def entries(config: ml_collections.ConfigDict, siglip: bool) -> list[Entry]:
  """The name table of the CLIPModel (`siglip=False`) or SiglipModel layout of `config`."""
  m, v, t = config.model, config.model.vision, config.model.text
  vis, txt = 'vision_model', 'text_model'
  out = [(f'{vis}.embeddings.patch_embedding.weight', 'image_encoder/patch_embed/kernel',
          'conv', 0),
         (f'{vis}.embeddings.position_embedding.weight', 'image_encoder/pos_embed', 'copy', 0)]
  if siglip:
    out.append((f'{vis}.embeddings.patch_embedding.bias', 'image_encoder/patch_embed/bias',
                'copy', 0))
  else:
    out.append((f'{vis}.embeddings.class_embedding', 'image_encoder/cls_embed', 'copy', 0))
    out += _ln(f'{vis}.pre_layrnorm', 'image_encoder/ln_pre')
  for i in range(v.layers):
    out += _encoder_layer(f'{vis}.encoder.layers.{i}', f'image_encoder/block_{i}', v.heads)
  if siglip:
    head, pool = f'{vis}.head', 'contrastive_pooler'
    out += _ln(f'{vis}.post_layernorm', 'image_encoder/ln_final')
    out.append((f'{head}.probe', f'{pool}/queries', 'probe', 0))
    packed = {part: (f'{head}.attention.in_proj_weight#{i}', f'{head}.attention.in_proj_bias#{i}')
              for i, part in enumerate(('query', 'key', 'value'))}
    packed['out'] = f'{head}.attention.out_proj'
    out += _attention(f'{pool}/attention', m.pooler_heads or v.heads, packed)
    out += _ln(f'{head}.layernorm', f'{pool}/ln_mlp')
    out += _linear(f'{head}.mlp.fc1', f'{pool}/mlp/fc1') + _linear(f'{head}.mlp.fc2',
                                                                   f'{pool}/mlp/fc2')
    out += _linear(f'{txt}.head', 'text_projection')
    out += [('logit_scale', 'logit_scale', 'scalar1', 0), ('logit_bias', 'logit_bias', 'scalar1', 0)]
  else:
    out += _ln(f'{vis}.post_layernorm', 'image_pooled_norm')
    out += _linear('visual_projection', 'image_projection', bias=False)
    out += _linear('text_projection', 'text_projection', bias=False)
    out.append(('logit_scale', 'logit_scale', 'scalar', 0))
  out += [(f'{txt}.embeddings.token_embedding.weight', 'text_decoder/token_embed/embedding',
           'copy', 0),
          (f'{txt}.embeddings.position_embedding.weight', 'text_decoder/pos_embed', 'copy', 0)]
  for i in range(t.unimodal_layers):
    out += _encoder_layer(f'{txt}.encoder.layers.{i}', f'text_decoder/unimodal_{i}', t.heads)
  return out + _ln(f'{txt}.final_layer_norm', 'text_decoder/ln_cls')


def _forward(x: np.ndarray, kind: str, heads: int) -> np.ndarray:
  if kind == 'linear':
    return x.T
  if kind == 'heads_in':  # [H*D, W] -> [W, H, D]
    return x.T.reshape(x.shape[1], heads, -1)
  if kind == 'heads_bias':
    return x.reshape(heads, -1)
  if kind == 'heads_out':  # [W, H*D] -> [H, D, W]
    return x.T.reshape(heads, -1, x.shape[0])
  if kind == 'conv':
    return x.transpose(2, 3, 1, 0)
  if kind in ('scalar', 'scalar1'):
    return x.reshape(())
  if kind == 'probe':
    return x.reshape(x.shape[-2:])
  return x


def _backward(x: np.ndarray, kind: str) -> np.ndarray:
  if kind == 'linear':
    return x.T
  if kind == 'heads_in':  # [W, H, D] -> [H*D, W]
    return x.reshape(x.shape[0], -1).T
  if kind == 'heads_bias':
    return x.reshape(-1)
  if kind == 'heads_out':  # [H, D, W] -> [W, H*D]
    return x.reshape(-1, x.shape[-1]).T
  if kind == 'conv':
    return x.transpose(3, 2, 0, 1)
  if kind == 'scalar1':
    return x.reshape(1)
  if kind == 'probe':
    return x.reshape(1, *x.shape)
  return x


def to_vlrep(state_dict: Mapping[str, Any], table: list[Entry]) -> dict:
  """The nested vlrep parameter tree; every (non-buffer) state dict entry must be used."""
  arrays = {k: np.asarray(v, np.float32) for k, v in state_dict.items()
            if not k.endswith('position_ids')}
  used, tree = set(), {}
  for name, path, kind, heads in table:
    key, _, third = name.partition('#')
    if key not in arrays:
      raise ValueError(f'the transformers checkpoint has no {key!r} (needed for {path})')
    used.add(key)
    x = np.split(arrays[key], 3)[int(third)] if third else arrays[key]
    *parents, leaf = path.split('/')
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = np.asarray(_forward(x, kind, heads), order='C')
  unused = sorted(set(arrays) - used)
  if unused:
    raise ValueError(f'transformers weights that the config does not account for: {unused[:8]}'
                     f'{" ..." if len(unused) > 8 else ""}')
  return tree


def to_hf(named: Mapping[str, Any], table: list[Entry]) -> dict[str, np.ndarray]:
  """transformers' state dict (float32 numpy) from vlrep's named arrays ('a/b/c' -> array);
  a vlrep array the table has no place for is refused by name."""
  out, packed, used = {}, {}, set()
  for name, path, kind, _ in table:
    used.add(path)
    x = np.asarray(_backward(np.asarray(named[path], np.float32), kind), order='C')
    key, _, third = name.partition('#')
    if third:
      packed.setdefault(key, {})[int(third)] = x
    else:
      out[key] = x
  for key, parts in packed.items():
    out[key] = np.concatenate([parts[i] for i in range(3)])
  extra = sorted(set(named) - used)
  if extra:
    raise ValueError(f'vlrep parameters with no transformers equivalent: {extra[:8]}')
  return out
