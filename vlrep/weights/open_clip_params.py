"""open_clip state dict entries -> vlrep parameter trees, one function per module kind.

Names follow open_clip's modules (`ResidualAttentionBlock`: ln_1, attn, ls_1, ln_2, mlp,
ls_2; `AttentionalPooler`: query, ln_q, ln_k, attn; `nn.MultiheadAttention`: packed
`in_proj_weight` or separate q/k/v weights, `out_proj`); torch `Linear` weights are
[out, in] and become [in, out] kernels, attention projections are split into heads.
`vlrep/weights/open_clip.py` decides which of these the config calls for.
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections
import numpy as np


class StateDict:
  """The state dict's arrays by key, remembering which were read (all must be)."""

  def __init__(self, state_dict: Mapping[str, Any]):
    self._arrays = {k: np.asarray(v, np.float32) for k, v in state_dict.items()
                    if not k.endswith('attn_mask')}
    self._used: set[str] = set()

  def __contains__(self, key: str) -> bool:
    return key in self._arrays

  def __getitem__(self, key: str) -> np.ndarray:
    if key not in self._arrays:
      raise KeyError(f'open_clip state dict has no {key!r}')
    self._used.add(key)
    return self._arrays[key]

  def check_all_used(self) -> None:
    unused = sorted(set(self._arrays) - self._used)
    if unused:
      raise ValueError(f'state dict entries the config does not account for: {unused[:8]}'
                       f'{" ..." if len(unused) > 8 else ""}')


def _ln(sd: StateDict, prefix: str) -> dict:
  return {'scale': sd[prefix + '.weight'], 'bias': sd[prefix + '.bias']}


def _dense(sd: StateDict, prefix: str) -> dict:
  return {'kernel': sd[prefix + '.weight'].T, 'bias': sd[prefix + '.bias']}


def _attention(sd: StateDict, prefix: str, heads: int) -> dict:
  """nn.MultiheadAttention (packed or separate q/k/v weights) -> vlrep `Attention`."""
  bias = sd[prefix + '.in_proj_bias']
  if prefix + '.in_proj_weight' in sd:
    weights = np.split(sd[prefix + '.in_proj_weight'], 3)
  else:  # kdim/vdim != embed_dim: separate projections
    weights = [sd[f'{prefix}.{n}_proj_weight'] for n in 'qkv']
  width = weights[0].shape[0]
  head_dim = width // heads
  out = {}
  for name, w, b in zip(('query', 'key', 'value'), weights, np.split(bias, 3)):
    out[name] = {'kernel': w.T.reshape(w.shape[1], heads, head_dim),
                 'bias': b.reshape(heads, head_dim)}
  out_w = sd[prefix + '.out_proj.weight']
  out['out'] = {'kernel': out_w.T.reshape(heads, head_dim, out_w.shape[0]),
                'bias': sd[prefix + '.out_proj.bias']}
  return out


def _mlp(sd: StateDict, prefix: str) -> dict:
  return {'fc1': _dense(sd, prefix + '.c_fc'), 'fc2': _dense(sd, prefix + '.c_proj')}


def _residual_block(sd: StateDict, prefix: str, heads: int, layer_scale: bool,
                    names=('ln_self', 'self_attention', 'ls_self', 'ln_mlp', 'mlp',
                           'ls_mlp')) -> dict:
  """open_clip ResidualAttentionBlock (ln_1, attn, ls_1, ln_2, mlp, ls_2) -> vlrep names."""
  ln_attn, attn, ls_attn, ln_mlp, mlp, ls_mlp = names
  out = {ln_attn: _ln(sd, prefix + '.ln_1'), attn: _attention(sd, prefix + '.attn', heads),
         ln_mlp: _ln(sd, prefix + '.ln_2'), mlp: _mlp(sd, prefix + '.mlp')}
  if layer_scale:
    out[ls_attn], out[ls_mlp] = sd[prefix + '.ls_1.gamma'], sd[prefix + '.ls_2.gamma']
  return out


def _pooler(sd: StateDict, prefix: str, heads: int) -> dict:
  return {'queries': sd[prefix + '.query'], 'ln_query': _ln(sd, prefix + '.ln_q'),
          'ln_context': _ln(sd, prefix + '.ln_k'),
          'attention': _attention(sd, prefix + '.attn', heads)}


def vision_params(sd: StateDict, m: ml_collections.ConfigDict) -> tuple[dict, dict]:
  """(image encoder params, CoCa-level params: poolers, pooled norm, projection)."""
  v = m.vision
  enc = {'patch_embed': {'kernel': sd['visual.conv1.weight'].transpose(2, 3, 1, 0)},
         'cls_embed': sd['visual.class_embedding'],
         'pos_embed': sd['visual.positional_embedding']}
  if v.ln_pre:
    enc['ln_pre'] = _ln(sd, 'visual.ln_pre')
  for i in range(v.layers):
    enc[f'block_{i}'] = _residual_block(sd, f'visual.transformer.resblocks.{i}', v.heads,
                                        bool(v.layer_scale))
  top = {'image_projection': {'kernel': sd['visual.proj']}}
  if m.pooler == 'single':
    top['captioning_pooler'] = {**_pooler(sd, 'visual.attn_pool', m.pooler_heads),
                                'ln_out': _ln(sd, 'visual.ln_post')}
  elif m.pooler in ('parallel', 'cascade'):
    enc['ln_final'] = _ln(sd, 'visual.ln_post')
    top['contrastive_pooler'] = _pooler(sd, 'visual.attn_pool_contrastive', m.pooler_heads)
    if 'visual.attn_pool.query' in sd:
      captioning = _pooler(sd, 'visual.attn_pool', m.pooler_heads)
      if m.text.multimodal_layers:
        top['captioning_pooler'] = captioning
  elif m.pooled_norm:
    top['image_pooled_norm'] = _ln(sd, 'visual.ln_post')
  else:
    enc['ln_final'] = _ln(sd, 'visual.ln_post')
  return enc, top


def text_params(sd: StateDict, config: ml_collections.ConfigDict,
                prefix: str) -> tuple[dict, dict]:
  """(text decoder params, CoCa-level text projection params)."""
  t = config.model.text
  dec = {'token_embed': {'embedding': sd[prefix + 'token_embedding.weight']},
         'pos_embed': sd[prefix + 'positional_embedding'],
         'ln_cls': _ln(sd, prefix + 'ln_final')}
  if t.embed_cls:
    dec['cls_embed'] = sd[prefix + 'cls_emb']
  for i in range(t.unimodal_layers):
    dec[f'unimodal_{i}'] = _residual_block(sd, f'{prefix}transformer.resblocks.{i}', t.heads,
                                           bool(t.layer_scale))
  key = prefix + 'text_projection'
  if key + '.weight' in sd:  # nn.Linear (proj_bias)
    projection = _dense(sd, key)
  elif key in sd:
    projection = {'kernel': sd[key]}
  else:  # proj_type 'none': the identity (embed_dim == width is checked in `_config`)
    projection = {'kernel': np.eye(t.width, dtype=np.float32)}
  if t.multimodal_layers:
    cross_names = ('ln_cross', 'cross_attention', 'ls_cross', 'ln_cross_mlp', 'cross_mlp',
                   'ls_cross_mlp')
    for i in range(t.multimodal_layers):
      block = _residual_block(sd, f'text_decoder.resblocks.{i}', t.multimodal_heads,
                              bool(t.multimodal_layer_scale))
      cross = f'text_decoder.cross_attn.{i}'
      block.update(_residual_block(sd, cross, t.multimodal_heads,
                                   bool(t.multimodal_layer_scale), cross_names))
      block['ln_cross_context'] = _ln(sd, cross + '.ln_1_kv')
      dec[f'multimodal_{i}'] = block
    dec['ln_final'] = _ln(sd, 'text_decoder.ln_final')
    dec['output_head'] = {'kernel': sd['text_decoder.text_projection']}
  return dec, {'text_projection': projection}
