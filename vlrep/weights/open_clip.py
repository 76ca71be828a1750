"""open_clip (PyTorch) CLIP and CoCa weights -> a vlrep config and parameters.

`convert_state_dict(state_dict, model_cfg)` reads the dict of numpy arrays a torch
`state_dict()` holds and the model config JSON open_clip builds it from (`embed_dim`,
`vision_cfg`, `text_cfg`, optional `multimodal_cfg`, `quick_gelu`) and returns the vlrep
config that describes the same network (`vlrep.config.defaults()` with its layout options
set) and the float32 parameters `build_model(config)` applies. `load_open_clip(path, model_cfg)`
does it from a `torch.save`d state dict or a `.safetensors` file and wraps the result in
`vlrep.Pretrained`.

Supported: ViT image towers (class token, ln_pre, 'tok'/'avg' pooling, `final_ln_after_pool`,
`attentional_pool` True (open_clip's CoCa: one pooler whose first output is the contrastive
embedding) or 'parallel'/'cascade'), the transformer text tower (argmax/eos/first/last
pooling, appended [CLS], causal or not, linear projection with or without bias or none),
CoCa's multimodal decoder, quick-GELU or exact GELU, LayerScale, LayerNorm epsilons.
timm, ResNet and Hugging Face towers and the custom attention variants (qk-norm, scaled
cosine, head scale, inner norms) have no vlrep equivalent and are refused by name.
The entry-by-entry weight mapping is `open_clip_params.py`.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import ml_collections
import numpy as np

from vlrep import config as vlrep_config
from vlrep.models.layers import ACTIVATIONS
from vlrep.weights.open_clip_params import StateDict, text_params, vision_params

# open_clip's LayerNorm default (torch.nn.LayerNorm); vlrep's default is 1e-6.
TORCH_LN_EPS = 1e-5
_CUSTOM_ATTENTION = ('qk_norm', 'scaled_cosine_attn', 'scale_heads', 'scale_attn_inner',
                     'scale_attn', 'scale_fc')
# The dataclass defaults of open_clip's CLIPVisionCfg / CLIPTextCfg / MultimodalCfg that
# matter here, so that a config dict with fields left out reads as open_clip reads it.
_VISION_DEFAULTS = dict(layers=12, width=768, head_width=64, mlp_ratio=4.0, patch_size=16,
                        image_size=224, ls_init_value=None, attentional_pool=False,
                        attn_pooler_queries=256, attn_pooler_heads=8, no_ln_pre=False,
                        pos_embed_type='learnable', final_ln_after_pool=False, pool_type='tok',
                        act_kwargs=None, norm_kwargs=None)
_TEXT_DEFAULTS = dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12,
                      mlp_ratio=4.0, ls_init_value=None, embed_cls=False, pad_id=0, eos_id=2,
                      no_causal_mask=False, pool_type='argmax', proj_bias=False,
                      proj_type='linear', act_kwargs=None, norm_kwargs=None)
_MULTIMODAL_DEFAULTS = dict(context_length=77, width=512, heads=8, layers=12,
                            ls_init_value=None)


def _refuse_unsupported(tower: str, cfg: Mapping[str, Any]) -> None:
  for key in ('timm_model_name', 'hf_model_name'):
    if cfg.get(key):
      raise NotImplementedError(f'{tower}.{key}={cfg[key]!r}: only open_clip\'s own '
                                f'transformer towers can be converted')
  if isinstance(cfg.get('layers'), (list, tuple)):
    raise NotImplementedError(f'{tower}.layers={cfg["layers"]}: ResNet towers cannot be '
                              f'converted')
  for key in _CUSTOM_ATTENTION:
    if cfg.get(key):
      raise NotImplementedError(f'{tower}.{key}=True: this attention variant has no vlrep '
                                f'equivalent')


def _eps(cfg: Mapping[str, Any]) -> float:
  return float((cfg.get('norm_kwargs') or {}).get('eps', TORCH_LN_EPS))


def _activation(model_cfg: Mapping[str, Any], towers: list[Mapping[str, Any]]) -> str:
  if model_cfg.get('quick_gelu', False):
    return 'quick_gelu'
  kinds = set()
  for cfg in towers:
    kwargs = dict(cfg.get('act_kwargs') or {})
    approximate = kwargs.pop('approximate', 'none')
    if kwargs or approximate not in ('none', 'tanh'):
      raise NotImplementedError(f'act_kwargs {cfg.get("act_kwargs")} are not supported')
    kinds.add('gelu_tanh' if approximate == 'tanh' else 'gelu')
  if len(kinds) > 1:
    raise NotImplementedError('towers with different GELU forms cannot be converted: vlrep '
                              'has one model.activation')
  kind = kinds.pop()
  assert kind in ACTIVATIONS
  return kind


def _config(model_cfg: Mapping[str, Any], coca: bool, text_module: bool,
            logit_bias: bool) -> ml_collections.ConfigDict:
  """The vlrep config of an open_clip model config (see the module docstring)."""
  vision = {**_VISION_DEFAULTS, **model_cfg['vision_cfg']}
  text = {**_TEXT_DEFAULTS, **model_cfg['text_cfg']}
  _refuse_unsupported('vision_cfg', vision)
  _refuse_unsupported('text_cfg', text)
  if text.get('hf_tokenizer_name'):
    raise NotImplementedError(f'text_cfg.hf_tokenizer_name={text["hf_tokenizer_name"]!r}: '
                              f'vlrep has CLIP\'s BPE tokenizer only (data.tokenizer=clip_bpe)')
  if vision['pos_embed_type'] not in ('learnable', 'sin_cos_2d'):
    raise NotImplementedError(f'vision_cfg.pos_embed_type={vision["pos_embed_type"]!r}')
  image_size = vision['image_size']
  if isinstance(image_size, (list, tuple)):
    if len(set(image_size)) != 1:
      raise NotImplementedError(f'vision_cfg.image_size={image_size}: only square images')
    image_size = image_size[0]
  patch = vision['patch_size']
  if isinstance(patch, (list, tuple)):
    if len(set(patch)) != 1:
      raise NotImplementedError(f'vision_cfg.patch_size={patch}: only square patches')
    patch = patch[0]
  embed_dim = int(model_cfg['embed_dim'])
  towers = [vision, text]
  multimodal = None
  if coca:
    multimodal = {**_MULTIMODAL_DEFAULTS, **model_cfg.get('multimodal_cfg', {})}
    towers.append({})  # the decoder's GELU is quick or exact, never act_kwargs'

  c = vlrep_config.defaults()
  m = c.model
  m.activation = _activation(model_cfg, towers)
  m.embed_dim = embed_dim
  m.ln_eps = TORCH_LN_EPS  # the poolers' and the decoder's: plain torch LayerNorms
  v = m.vision
  v.patch_size, v.width, v.layers = int(patch), int(vision['width']), int(vision['layers'])
  v.heads = v.width // int(vision['head_width'])
  v.mlp_dim = int(v.width * vision['mlp_ratio'])
  v.stem_channels = ()
  v.class_token, v.ln_pre, v.patch_bias = True, not vision['no_ln_pre'], False
  v.ln_eps = _eps(vision)
  v.layer_scale = float(vision['ls_init_value'] or 0.0)

  attn_pool, pool_type = vision['attentional_pool'], vision['pool_type']
  if pool_type not in ('tok', 'avg') and attn_pool not in ('parallel', 'cascade'):
    raise NotImplementedError(f"vision_cfg.pool_type={pool_type!r}: the image embedding must "
                              f"be one vector ('tok' or 'avg')")
  m.pooler_heads = int(vision['attn_pooler_heads'])
  m.pooler_width = embed_dim  # open_clip's poolers output embed_dim-wide tokens
  m.pooler_query_norm, m.pooler_output_norm, m.pooled_norm = True, False, False
  m.captioning_queries = int(vision['attn_pooler_queries'])
  if attn_pool in ('parallel', 'cascade'):
    if not coca and attn_pool == 'cascade':
      # vlrep's contrastive pooler reads the image tokens when there is no decoder.
      raise NotImplementedError("attentional_pool='cascade' without a text decoder")
    m.pooler, m.image_pool, v.final_norm = attn_pool, 'attn', True
  elif attn_pool:  # open_clip's CoCa: ln_post after the one pooler
    if v.ln_eps != TORCH_LN_EPS:
      raise NotImplementedError('attentional_pool=True with vision_cfg.norm_kwargs.eps')
    m.pooler, m.image_pool, v.final_norm = 'single', pool_type, False
    m.pooler_output_norm = True
  else:
    m.pooler, m.image_pool = 'none', pool_type
    # Pool-then-normalise equals normalise-then-pool for one token, not for the mean.
    after_pool = vision['final_ln_after_pool']
    v.final_norm, m.pooled_norm = not after_pool, bool(after_pool)

  t = m.text
  context_length = int(text['context_length'])
  t.vocab_size, t.width, t.heads = int(text['vocab_size']), int(text['width']), int(text['heads'])
  t.unimodal_layers = int(text['layers'])
  t.mlp_dim = int(t.width * text['mlp_ratio'])
  t.embed_cls = bool(text['embed_cls'])
  if t.embed_cls and not text_module:  # open_clip's CLIP class cannot run a cls_emb either
    raise NotImplementedError('text_cfg.embed_cls=True needs a CoCa or custom_text model')
  if t.embed_cls:
    # CoCa's tower: cls appended, its position after the caption, open_clip's legacy
    # (`correct_cls_mask=False`) padding mask.
    t.pool, t.pad_mask, t.cls_position = 'cls', 'shifted', 'after_tokens'
  else:
    if text['pool_type'] not in ('argmax', 'eos', 'first', 'last'):
      raise NotImplementedError(f'text_cfg.pool_type={text["pool_type"]!r}')
    t.pool, t.pad_mask = text['pool_type'], 'none'
  t.pad_id, t.eos_id = int(text['pad_id']), int(text['eos_id'])
  t.causal = not text['no_causal_mask']
  t.ln_eps = _eps(text)
  t.layer_scale = float(text['ls_init_value'] or 0.0)
  m.text_projection_bias = bool(text['proj_bias']) and text['proj_type'] != 'none'
  if text['proj_type'] == 'none' and t.width != embed_dim:
    raise NotImplementedError('text_cfg.proj_type="none" needs text width == embed_dim')

  if coca:
    if int(multimodal['width']) != t.width:
      raise ValueError(f'multimodal_cfg.width {multimodal["width"]} != text_cfg.width '
                       f'{t.width}: open_clip feeds the text tokens to the decoder as they are')
    t.multimodal_layers = int(multimodal['layers'])
    t.multimodal_heads = int(multimodal['heads'])
    # open_clip's decoder ignores MultimodalCfg's mlp_ratio and dim_head: MLP 4x, `heads`.
    t.multimodal_mlp_dim = 4 * t.width
    t.multimodal_layout, t.head_bias = 'split', False
    t.multimodal_layer_scale = float(multimodal['ls_init_value'] or 0.0)
  else:
    t.multimodal_layers = 0
    if m.pooler == 'cascade':
      m.pooler = 'parallel'
  c.loss.caption_weight = 2.0 if coca else 0.0
  c.loss.contrastive_type = 'sigmoid' if logit_bias else 'softmax'
  c.data.image_size = int(image_size)
  c.data.max_text_len = context_length
  c.data.tokenizer = 'clip_bpe'
  return c


def convert_state_dict(state_dict: Mapping[str, Any],
                       model_cfg: Mapping[str, Any]) -> tuple[ml_collections.ConfigDict, Any]:
  """(vlrep config, float32 params for `build_model(config)`) of an open_clip CLIP or CoCa.

  `state_dict` maps open_clip's parameter names to arrays (numpy or anything
  `np.asarray` reads); `model_cfg` is its model config JSON as a dict. Every entry of the
  state dict must be used, so a config that does not describe the weights fails here.
  """
  for key in ('embed_dim', 'vision_cfg', 'text_cfg'):
    if key not in model_cfg:
      raise ValueError(f'model_cfg has no {key!r} (expected open_clip\'s model config JSON)')
  sd = StateDict(state_dict)
  coca = 'text_decoder.ln_final.weight' in sd
  if coca and 'multimodal_cfg' not in model_cfg:
    raise ValueError('the state dict is a CoCa model but model_cfg has no multimodal_cfg')
  prefix = 'text.' if 'text.token_embedding.weight' in sd else ''  # CoCa, CustomTextCLIP
  config = _config(model_cfg, coca, bool(prefix), 'logit_bias' in sd)
  encoder, image_top = vision_params(sd, config.model)
  decoder, text_top = text_params(sd, config, prefix)
  params = {'image_encoder': encoder, 'text_decoder': decoder, **image_top, **text_top,
            'logit_scale': sd['logit_scale'].reshape(())}
  if 'logit_bias' in sd:
    params['logit_bias'] = sd['logit_bias'].reshape(())
  sd.check_all_used()
  _check_shapes(config, params)
  return config, params


def _check_shapes(config: ml_collections.ConfigDict, params: Any,
                  what: str = 'the converted open_clip weights') -> None:
  """The converted tree must be exactly the tree `build_model(config)` initialises."""
  import jax
  import flax.linen as nn
  from vlrep.weights import export
  from vlrep.models.build import build_model, init_params

  model = build_model(config)
  expected = jax.eval_shape(
      lambda: nn.unbox(init_params(model, config, jax.random.key(0))))
  export.check_shapes(expected, params, what)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """A torch state dict (`torch.save`, optionally wrapped as {'state_dict': ...}) or a
  `.safetensors` file -> float32 numpy arrays by name."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'no open_clip state dict at {path!r}')
  try:
    import torch  # reads torch pickles, and bfloat16 safetensors that numpy cannot hold
  except ImportError:
    torch = None
  if path.endswith('.safetensors'):
    if torch is None:
      from safetensors.numpy import load_file
      return {k.removeprefix('module.'): v.astype(np.float32) for k, v in load_file(path).items()}
    from safetensors.torch import load_file
    state = load_file(path)
  else:
    if torch is None:
      raise ImportError(f'reading the torch checkpoint {path!r} needs torch installed')
    state = torch.load(path, map_location='cpu', weights_only=True)
    if isinstance(state, dict) and 'state_dict' in state:
      state = state['state_dict']
    if not isinstance(state, dict):
      raise ValueError(f'{path!r} holds a {type(state).__name__}, not a state dict')
  # Checkpoints saved from DistributedDataParallel prefix every name with 'module.'.
  return {k.removeprefix('module.'): v.detach().float().numpy() for k, v in state.items()}


def load_open_clip(state_dict_path: str, model_cfg: Mapping[str, Any]):
  """A `vlrep.Pretrained` holding an open_clip CLIP or CoCa checkpoint (see module doc)."""
  import jax
  from vlrep.parallel import sharding
  from vlrep.pretrained import Pretrained

  config, params = convert_state_dict(read_state_dict(state_dict_path), model_cfg)
  mesh = sharding.make_mesh(sharding.DATA_PARALLEL)
  # Replicated on every device of the mesh, as `Pretrained` applies them data-parallel.
  params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  return Pretrained(config, params, mesh=mesh)
