"""Parity of `vlrep.load_open_clip` with open_clip's own CLIP and CoCa (float32, 1e-4).

Each case builds an open_clip model from a config dict (tiny widths, 32 px images, 16
tokens; odd head and query counts, both GELUs, every pooling layout), randomises the
parameters open_clip leaves uninitialised, saves its state dict, loads it with vlrep and
compares image embeddings, text embeddings and (CoCa) teacher-forced caption logits.
"""

import copy

import numpy as np
import pytest

import open_clip_shim  # before open_clip: see the module

torch, open_clip = open_clip_shim.require()

import vlrep  # noqa: E402
from vlrep.weights.open_clip import convert_state_dict, read_state_dict  # noqa: E402

CONTEXT = 16
VOCAB = 49408  # CLIP's BPE ids, so open_clip's tokenizer output is valid input
TEXTS = ['a photo of a cat', 'two dogs playing in the snow near a red house', '']


def _vision(width, head_width, layers=1, **kw):
  return dict(image_size=32, patch_size=8, layers=layers, width=width, head_width=head_width,
              **kw)


def _text(width, heads, layers=1, **kw):
  return dict(context_length=CONTEXT, vocab_size=VOCAB, width=width, heads=heads, layers=layers,
              **kw)


CLIP_CASES = {
    # OpenAI-style: class token, quick GELU, 3 vision heads, 5 text heads, argmax pooling.
    'quickgelu_odd_heads': dict(
        embed_dim=12, quick_gelu=True, vision_cfg=_vision(24, 8, layers=2),
        text_cfg=_text(20, 5, layers=2)),
    # Mean pooling with LayerNorm after pooling, no ln_pre, LayerScale, eos pooling and a
    # biased text projection, exact GELU.
    'avg_pool_layerscale': dict(
        embed_dim=16, vision_cfg=_vision(
            32, 16, pool_type='avg', final_ln_after_pool=True, no_ln_pre=True,
            ls_init_value=0.5),
        text_cfg=_text(24, 3, pool_type='eos', eos_id=49407, proj_bias=True,
                       ls_init_value=0.5)),
    # SigLIP-like: attentional pooling ('parallel', 5 queries, 3 heads), bidirectional text
    # with 'last' pooling and no projection, tanh GELU, LayerNorm eps 1e-6, logit bias.
    'parallel_pool_bidirectional': dict(
        embed_dim=24, init_logit_bias=-10.0,
        vision_cfg=_vision(24, 8, attentional_pool='parallel', attn_pooler_queries=5,
                           attn_pooler_heads=3, act_kwargs={'approximate': 'tanh'},
                           norm_kwargs={'eps': 1e-6}),
        text_cfg=_text(24, 3, no_causal_mask=True, pool_type='last', proj_type='none',
                       act_kwargs={'approximate': 'tanh'}, norm_kwargs={'eps': 1e-6})),
}

COCA_CASES = {
    # open_clip's CoCa layout: one pooler (7 queries, 3 heads) whose first output is the
    # contrastive vector; exact GELU; decoder heads differ from the text tower's.
    'coca_legacy_pool': dict(
        embed_dim=18, vision_cfg=_vision(24, 8, attentional_pool=True, attn_pooler_queries=7,
                                         attn_pooler_heads=3, output_tokens=True),
        text_cfg=_text(18, 3, embed_cls=True, output_tokens=True),
        multimodal_cfg=dict(context_length=CONTEXT, vocab_size=VOCAB, width=18, heads=6,
                            layers=2)),
    # coca_base's layout: no attentional pooler (class token for the contrastive vector,
    # the patch tokens for the decoder), with quick GELU, 5 heads and LayerScale.
    'coca_class_token_quickgelu': dict(
        embed_dim=16, quick_gelu=True,
        vision_cfg=_vision(40, 8, output_tokens=True, ls_init_value=0.3),
        text_cfg=_text(40, 5, embed_cls=True, output_tokens=True, ls_init_value=0.3),
        multimodal_cfg=dict(context_length=CONTEXT, vocab_size=VOCAB, width=40, heads=5,
                            layers=1, ls_init_value=0.3)),
    # The paper's 'cascade' poolers (5 queries, 3 heads) and a text tower without [CLS]
    # (argmax pooling, normalised token features into the decoder).
    'coca_cascade_no_cls': dict(
        embed_dim=24, vision_cfg=_vision(24, 8, attentional_pool='cascade',
                                         attn_pooler_queries=5, attn_pooler_heads=3,
                                         output_tokens=True),
        text_cfg=_text(24, 3, output_tokens=True),
        multimodal_cfg=dict(context_length=CONTEXT, vocab_size=VOCAB, width=24, heads=4,
                            layers=1)),
}


def _build(model_cfg, coca):
  torch.manual_seed(0)
  kwargs = copy.deepcopy(model_cfg)
  model = open_clip.CoCa(**kwargs) if coca else open_clip.CLIP(**kwargs)
  with torch.no_grad():
    if coca:  # open_clip never initialises the decoder's output projection
      torch.nn.init.normal_(model.text_decoder.text_projection, std=0.2)
    # Non-trivial LayerNorm affines, so that a missing or misplaced norm shows.
    for module in model.modules():
      if isinstance(module, torch.nn.LayerNorm):
        module.weight.normal_(1.0, 0.2)
        module.bias.normal_(0.0, 0.2)
  return model.eval()


def _load(tmp_path, model, model_cfg):
  path = str(tmp_path / 'open_clip.pt')
  torch.save(model.state_dict(), path)
  loaded = vlrep.load_open_clip(path, model_cfg)
  loaded.batch_size = 8  # one row per simulated device: small chunks compile and run fast
  return loaded


def _inputs():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(3, 3, 32, 32)).astype(np.float32)  # NCHW, already normalised
  tokens = open_clip.tokenize(TEXTS, context_length=CONTEXT)
  return images, tokens


def _close(ours, theirs, what):
  theirs = theirs.detach().numpy()
  assert ours.shape == theirs.shape, (what, ours.shape, theirs.shape)
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4, err_msg=what)


def _check_embeddings(model, loaded, images, tokens):
  """Normalised image and text embeddings of the converted model against open_clip's;
  returns open_clip's text embeddings."""
  with torch.no_grad():
    image_ref = model.encode_image(torch.from_numpy(images), normalize=True).reshape(3, -1)
    text_ref = model.encode_text(tokens, normalize=True)
  _close(loaded.encode_image(images.transpose(0, 2, 3, 1)), image_ref, 'encode_image')
  _close(loaded.encode_text(tokens.numpy()), text_ref, 'encode_text')
  return text_ref


@pytest.mark.parametrize('name', sorted(CLIP_CASES))
def test_clip_parity(name, tmp_path):
  model_cfg = CLIP_CASES[name]
  model = _build(model_cfg, coca=False)
  loaded = _load(tmp_path, model, model_cfg)
  images, tokens = _inputs()
  text_ref = _check_embeddings(model, loaded, images, tokens)
  _close(loaded.encode_text(TEXTS), text_ref, 'encode_text(strings)')
  np.testing.assert_array_equal(loaded.tokenize(TEXTS), tokens.numpy())


@pytest.mark.parametrize('name', sorted(COCA_CASES))
def test_coca_parity(name, tmp_path):
  model_cfg = COCA_CASES[name]
  model = _build(model_cfg, coca=True)
  loaded = _load(tmp_path, model, model_cfg)
  images, tokens = _inputs()
  _check_embeddings(model, loaded, images, tokens)
  with torch.no_grad():
    torch_images = torch.from_numpy(images)
    logits_all = model(torch_images, tokens, output_labels=False)['logits']
    logits_labels = model(torch_images, tokens)['logits']  # training form: drops the last
  logits = loaded.caption_logits(images.transpose(0, 2, 3, 1), tokens.numpy())
  assert logits.shape == (3, CONTEXT, VOCAB)
  _close(logits, logits_all, 'caption_logits')
  _close(logits[:, :-1], logits_labels, 'caption_logits[:, :-1]')
  # The padding actually matters to open_clip's text tower, so it is tested above.
  assert (tokens == 0).any()


def test_convert_refuses_what_it_cannot_express():
  model_cfg = CLIP_CASES['quickgelu_odd_heads']
  state = {k: v.numpy() for k, v in _build(model_cfg, coca=False).state_dict().items()}
  with pytest.raises(NotImplementedError, match='qk_norm'):
    convert_state_dict(state, {**model_cfg, 'vision_cfg': {**model_cfg['vision_cfg'],
                                                            'qk_norm': True}})
  with pytest.raises(ValueError, match='does not account for'):
    convert_state_dict({**state, 'visual.extra': np.zeros(3)}, model_cfg)
  with pytest.raises(ValueError, match='shape'):
    convert_state_dict(state, {**model_cfg, 'vision_cfg': {**model_cfg['vision_cfg'],
                                                            'mlp_ratio': 2.0}})


def test_state_dict_files_torch_wrapped_and_safetensors(tmp_path):
  state = _build(CLIP_CASES['quickgelu_odd_heads'], coca=False).state_dict()
  # open_clip's training checkpoints: {'state_dict': ...} with DistributedDataParallel's
  # 'module.' prefix.
  torch.save({'epoch': 3, 'state_dict': {'module.' + k: v for k, v in state.items()}},
             tmp_path / 'epoch_3.pt')
  read = read_state_dict(str(tmp_path / 'epoch_3.pt'))
  assert read.keys() == state.keys()
  np.testing.assert_array_equal(read['visual.proj'], state['visual.proj'].numpy())
  safetensors_torch = pytest.importorskip('safetensors.torch')
  safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()},
                              str(tmp_path / 'model.safetensors'))
  read = read_state_dict(str(tmp_path / 'model.safetensors'))
  np.testing.assert_array_equal(read['text_projection'], state['text_projection'].numpy())
  with pytest.raises(FileNotFoundError, match='missing.pt'):
    read_state_dict(str(tmp_path / 'missing.pt'))
