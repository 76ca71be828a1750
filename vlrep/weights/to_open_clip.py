"""A vlrep model -> open_clip: a state dict and the model config open_clip builds it from.

`export_open_clip(config, params, DIR)` writes `DIR/open_clip_model.safetensors` (open_clip's
parameter names, float32) and `DIR/open_clip_config.json` (`{"model_cfg": ...,
"preprocess_cfg": ...}`, the layout open_clip's hub checkpoints use), which
`open_clip.create_model('local-dir:DIR')` loads, as does `vlrep.convert
--open_clip_state_dict=DIR/open_clip_model.safetensors --model_cfg=DIR/open_clip_config.json`.

`open_clip_cfg(config)` inverts the import's mapping (`open_clip._config`); whether the
model fits is decided by that mapping itself: the written model config is read back through
it, and every field of the network's layout that comes back different is named in the
refusal (`model.vision.class_token=False (open_clip: True)`: open_clip's ViT always has a
class token), so a model imported from open_clip round-trips exactly and no export loads
as another network. The state dict mirrors `open_clip_params.py` entry for entry.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
import numpy as np

from vlrep.weights import open_clip

_GELU_KWARGS = {'gelu': None, 'gelu_tanh': {'approximate': 'tanh'}}
_IGNORED = ('remat', 'scan_layers', 'dtype', 'param_dtype')


def _ratio(mlp_dim: int, width: int) -> float:
  return mlp_dim / width


def _tower_common(config: ml_collections.ConfigDict, tower: ml_collections.ConfigDict) -> dict:
  out = {'ls_init_value': tower.layer_scale or None}
  if tower.ln_eps != open_clip.TORCH_LN_EPS:
    out['norm_kwargs'] = {'eps': tower.ln_eps}
  if config.model.activation != 'quick_gelu' and _GELU_KWARGS.get(config.model.activation):
    out['act_kwargs'] = _GELU_KWARGS[config.model.activation]
  return out


def open_clip_cfg(config: ml_collections.ConfigDict) -> dict:
  """open_clip's model config for a vlrep config (checked by `layout_differences`)."""
  m, v, t = config.model, config.model.vision, config.model.text
  vision = dict(image_size=config.data.image_size, patch_size=v.patch_size, width=v.width,
                layers=v.layers, head_width=v.width // v.heads,
                mlp_ratio=_ratio(v.mlp_dim, v.width), no_ln_pre=not v.ln_pre,
                attn_pooler_queries=m.captioning_queries,
                attn_pooler_heads=m.pooler_heads or v.heads, **_tower_common(config, v))
  if m.pooler in ('parallel', 'cascade'):
    vision['attentional_pool'] = m.pooler
  elif m.pooler == 'single':
    vision.update(attentional_pool=True, pool_type=m.image_pool)
  else:
    vision.update(pool_type=m.image_pool, final_ln_after_pool=bool(m.pooled_norm))
  text = dict(context_length=config.data.max_text_len, vocab_size=t.vocab_size, width=t.width,
              heads=t.heads, layers=t.unimodal_layers, mlp_ratio=_ratio(t.mlp_dim, t.width),
              embed_cls=bool(t.embed_cls), pad_id=t.pad_id, eos_id=t.eos_id,
              no_causal_mask=not t.causal, proj_bias=bool(m.text_projection_bias),
              **_tower_common(config, t))
  if not t.embed_cls:
    text['pool_type'] = t.pool
  cfg = {'embed_dim': m.embed_dim, 'quick_gelu': m.activation == 'quick_gelu',
         'vision_cfg': vision, 'text_cfg': text}
  if t.multimodal_layers:
    vision['output_tokens'] = text['output_tokens'] = True  # CoCa's towers hand on tokens
    cfg['multimodal_cfg'] = dict(context_length=config.data.max_text_len, width=t.width,
                                 heads=t.multimodal_heads or t.heads, layers=t.multimodal_layers,
                                 ls_init_value=t.multimodal_layer_scale or None)
  if t.multimodal_layers or t.embed_cls:
    cfg['custom_text'] = True  # open_clip builds CoCa (and a cls_emb) only as custom text
  if config.loss.contrastive_type == 'sigmoid':
    cfg['init_logit_bias'] = -10.0
  return cfg


def _relevant(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The fields that determine the network, leaving out those its other fields switch off."""
  flat = {}

  def walk(node, prefix):
    for key, value in node.items():
      if isinstance(value, ml_collections.ConfigDict):
        walk(value, f'{prefix}{key}.')
      elif key not in _IGNORED:
        flat[prefix + key] = tuple(value) if isinstance(value, (list, tuple)) else value
  walk(config.model, 'model.')
  m, t = config.model, config.model.text
  drop = set()
  if m.pooler == 'none':
    drop |= {k for k in flat if k.startswith('model.pooler_')} | {'model.captioning_queries'}
  if not t.multimodal_layers:
    drop |= {k for k in flat if k.startswith('model.text.multimodal_')} | {'model.text.head_bias'}
    if m.pooler != 'single':
      drop.add('model.captioning_queries')
  if m.pooler == 'none' and not t.multimodal_layers:
    drop.add('model.ln_eps')
  if t.pool != 'eos':
    drop.add('model.text.eos_id')
  if t.pad_mask == 'none':
    drop.add('model.text.pad_id')
  if not t.embed_cls:
    drop.add('model.text.cls_position')
  out = {k: v for k, v in flat.items() if k not in drop}
  for key in ('data.image_size', 'data.max_text_len', 'loss.contrastive_type'):
    section, field = key.split('.')
    out[key] = config[section][field]
  return out


def layout_differences(config: ml_collections.ConfigDict, cfg: dict) -> list[str]:
  """'field=ours (open_clip: theirs)' for each layout field open_clip reads back otherwise,
  and what open_clip refuses outright."""
  m, out = config.model, []
  if not m.contrastive:
    out.append('model.contrastive=False (every open_clip model has the contrastive '
               'projections and temperature that a captioning-only model lacks)')
  if m.pooler in ('parallel', 'cascade') and not m.text.multimodal_layers:
    out.append(f"model.pooler={m.pooler!r} without a text decoder (open_clip's "
               f"attentional_pool={m.pooler!r} tower also holds a captioning pooler, which "
               'such a vlrep model does not have)')
  coca = bool(cfg.get('multimodal_cfg'))
  try:
    back = open_clip._config(cfg, coca, coca or bool(cfg.get('custom_text')),  # pylint: disable=protected-access
                             'init_logit_bias' in cfg)
  except (NotImplementedError, ValueError) as e:
    return out + [f'model.activation={m.activation!r} ({e})' if 'GELU' in str(e) else str(e)]
  ours, theirs = _relevant(config), _relevant(back)
  for key in sorted(set(ours) | set(theirs)):
    a, b = ours.get(key), theirs.get(key)
    if a != b and not (isinstance(a, float) and isinstance(b, float) and np.isclose(a, b)):
      out.append(f'{key}={a!r} (open_clip: {b!r})')
  return out


def _ln(out: dict, name: str, p: dict) -> None:
  out[name + '.weight'], out[name + '.bias'] = p['scale'], p['bias']


def _dense(out: dict, name: str, p: dict) -> None:
  out[name + '.weight'], out[name + '.bias'] = p['kernel'].T, p['bias']


def _attention(out: dict, name: str, p: dict) -> None:
  """vlrep `Attention` -> nn.MultiheadAttention (packed in-projection)."""
  weights = [p[n]['kernel'].reshape(p[n]['kernel'].shape[0], -1).T for n in ('query', 'key', 'value')]
  biases = [p[n]['bias'].reshape(-1) for n in ('query', 'key', 'value')]
  if len({w.shape for w in weights}) == 1:
    out[name + '.in_proj_weight'] = np.concatenate(weights)
  else:  # kdim != embed_dim
    for n, w in zip('qkv', weights):
      out[f'{name}.{n}_proj_weight'] = w
  out[name + '.in_proj_bias'] = np.concatenate(biases)
  kernel = p['out']['kernel']
  out[name + '.out_proj.weight'] = kernel.reshape(-1, kernel.shape[-1]).T
  out[name + '.out_proj.bias'] = p['out']['bias']


def _block(out: dict, name: str, p: dict, names=('ln_self', 'self_attention', 'ls_self', 'ln_mlp',
                                                  'mlp', 'ls_mlp')) -> None:
  ln_attn, attn, ls_attn, ln_mlp, mlp, ls_mlp = names
  _ln(out, name + '.ln_1', p[ln_attn])
  _attention(out, name + '.attn', p[attn])
  _ln(out, name + '.ln_2', p[ln_mlp])
  _dense(out, name + '.mlp.c_fc', p[mlp]['fc1'])
  _dense(out, name + '.mlp.c_proj', p[mlp]['fc2'])
  if ls_attn in p:
    out[name + '.ls_1.gamma'], out[name + '.ls_2.gamma'] = p[ls_attn], p[ls_mlp]


def _pooler(out: dict, name: str, p: dict) -> None:
  out[name + '.query'] = p['queries']
  _ln(out, name + '.ln_q', p['ln_query'])
  _ln(out, name + '.ln_k', p['ln_context'])
  _attention(out, name + '.attn', p['attention'])


def state_dict(config: ml_collections.ConfigDict, params: dict) -> dict[str, np.ndarray]:
  """open_clip's state dict of a model whose layout open_clip expresses."""
  m, v, t = config.model, config.model.vision, config.model.text
  enc, dec, out = params['image_encoder'], params['text_decoder'], {}
  out['visual.conv1.weight'] = enc['patch_embed']['kernel'].transpose(3, 2, 0, 1)
  out['visual.class_embedding'] = enc['cls_embed']
  out['visual.positional_embedding'] = enc['pos_embed']
  if v.ln_pre:
    _ln(out, 'visual.ln_pre', enc['ln_pre'])
  for i in range(v.layers):
    _block(out, f'visual.transformer.resblocks.{i}', enc[f'block_{i}'])
  out['visual.proj'] = params['image_projection']['kernel']
  if m.pooler == 'single':
    _pooler(out, 'visual.attn_pool', params['captioning_pooler'])
    _ln(out, 'visual.ln_post', params['captioning_pooler']['ln_out'])
  elif m.pooler in ('parallel', 'cascade'):
    _ln(out, 'visual.ln_post', enc['ln_final'])
    _pooler(out, 'visual.attn_pool_contrastive', params['contrastive_pooler'])
    _pooler(out, 'visual.attn_pool', params['captioning_pooler'])
  else:
    _ln(out, 'visual.ln_post', params['image_pooled_norm'] if m.pooled_norm else enc['ln_final'])
  prefix = 'text.' if t.multimodal_layers or t.embed_cls else ''
  out[prefix + 'token_embedding.weight'] = dec['token_embed']['embedding']
  out[prefix + 'positional_embedding'] = dec['pos_embed']
  _ln(out, prefix + 'ln_final', dec['ln_cls'])
  if t.embed_cls:
    out[prefix + 'cls_emb'] = dec['cls_embed']
  for i in range(t.unimodal_layers):
    _block(out, f'{prefix}transformer.resblocks.{i}', dec[f'unimodal_{i}'])
  projection = params['text_projection']
  if m.text_projection_bias:
    _dense(out, prefix + 'text_projection', projection)
  else:
    out[prefix + 'text_projection'] = projection['kernel']
  for i in range(t.multimodal_layers):
    block = dec[f'multimodal_{i}']
    _block(out, f'text_decoder.resblocks.{i}', block)
    cross = f'text_decoder.cross_attn.{i}'
    _block(out, cross, block, ('ln_cross', 'cross_attention', 'ls_cross', 'ln_cross_mlp',
                               'cross_mlp', 'ls_cross_mlp'))
    _ln(out, cross + '.ln_1_kv', block['ln_cross_context'])
  if t.multimodal_layers:
    _ln(out, 'text_decoder.ln_final', dec['ln_final'])
    out['text_decoder.text_projection'] = dec['output_head']['kernel']
  out['logit_scale'] = np.reshape(params['logit_scale'], ())
  if 'logit_bias' in params:
    out['logit_bias'] = np.reshape(params['logit_bias'], ())
  return {k: np.asarray(x, np.float32, order='C') for k, x in out.items()}


def export_open_clip(config: ml_collections.ConfigDict, params: Any, path: str) -> str:
  """Writes the open_clip files of a vlrep model (module docstring); returns `path`."""
  import flax.traverse_util  # pylint: disable=g-import-not-at-top
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  from vlrep.weights import export  # pylint: disable=g-import-not-at-top

  cfg = open_clip_cfg(config)
  differences = layout_differences(config, cfg)
  if config.data.tokenizer != 'clip_bpe':
    differences.append(f'data.tokenizer={config.data.tokenizer!r} (open_clip: \'clip_bpe\', '
                       'its own tokenizer)')
  if differences:
    raise NotImplementedError("this model's layout has no open_clip equivalent: " +
                              '; '.join(differences))
  named = export.host_arrays(params)
  tree = flax.traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in named.items()})
  arrays = state_dict(config, tree)
  v = config.model.vision
  preprocess = {'size': config.data.image_size, 'mean': list(v.image_mean),
                'std': list(v.image_std)}
  os.makedirs(path, exist_ok=True)
  safetensors.numpy.save_file(arrays, os.path.join(path, 'open_clip_model.safetensors'))
  with open(os.path.join(path, 'open_clip_config.json'), 'w') as f:
    json.dump({'model_cfg': cfg, 'preprocess_cfg': preprocess}, f, indent=2)
  return path
