"""Text decoder: causality, [CLS] at the end, padding invariance, cached decoding."""

import jax
import jax.numpy as jnp
import numpy as np

from vlrep.data.tokenizer import ByteTokenizer
from vlrep.models.build import build_model, init_params
from vlrep.models.coca import CoCa
import flax.linen as nn


def _model_and_params(config):
  model = build_model(config)
  return model, jax.jit(lambda rng: nn.unbox(init_params(model, config, rng)))(jax.random.key(1))


def _tokens(config, texts):
  return jnp.asarray(ByteTokenizer().encode(texts, config.data.max_text_len))


def test_changing_a_later_token_never_changes_earlier_logits(config):
  model, params = _model_and_params(config)
  images = jnp.asarray(np.random.default_rng(0).integers(0, 255, (2, 16, 16, 3)), jnp.uint8)
  tokens = _tokens(config, ['two red circles', 'one blue square'])
  changed = tokens.at[:, 6].set(77)
  out = model.apply({'params': params}, images, tokens)
  out_changed = model.apply({'params': params}, images, changed)
  # caption_logits[:, t] sees tokens[:, :t+1]: positions 0..5 must not move, 6 must.
  np.testing.assert_allclose(out['caption_logits'][:, :6], out_changed['caption_logits'][:, :6],
                             atol=1e-6)
  assert np.abs(out['caption_logits'][:, 6] - out_changed['caption_logits'][:, 6]).max() > 1e-4
  # ...and the unimodal token features the same way.
  _, feats = model.apply({'params': params}, tokens, method=CoCa.encode_text)
  _, feats_changed = model.apply({'params': params}, changed, method=CoCa.encode_text)
  np.testing.assert_allclose(feats[:, :6], feats_changed[:, :6], atol=1e-6)


def test_cls_is_appended_at_the_end_and_reads_the_whole_caption(config):
  model, params = _model_and_params(config)
  tokens = _tokens(config, ['two red circles and a square'])
  emb, feats = model.apply({'params': params}, tokens, method=CoCa.encode_text)
  assert feats.shape == (1, config.data.max_text_len, config.model.text.width)
  # The last real token (before EOS) changes the [CLS] embedding: [CLS] comes after it.
  last = int(np.nonzero(np.asarray(tokens[0]) == 2)[0][0]) - 1
  emb_changed, _ = model.apply({'params': params}, tokens.at[0, last].set(90),
                               method=CoCa.encode_text)
  assert np.abs(emb - emb_changed).max() > 1e-4


def test_text_embedding_ignores_padding_length(config):
  model, params = _model_and_params(config)
  short = _tokens(config, ['a red shape'])
  config.data.max_text_len = 20
  shorter_pad = jnp.asarray(ByteTokenizer().encode(['a red shape'], 20))
  emb_a, _ = model.apply({'params': params}, short, method=CoCa.encode_text)
  emb_b, _ = model.apply({'params': params}, shorter_pad, method=CoCa.encode_text)
  np.testing.assert_allclose(emb_a, emb_b, atol=1e-5)


def test_cached_decode_steps_equal_the_full_forward_pass(config):
  model, params = _model_and_params(config)
  decoder = build_model(config, decode=True)
  images = jnp.asarray(np.random.default_rng(0).integers(0, 255, (2, 16, 16, 3)), jnp.uint8)
  tokens = _tokens(config, ['two red circles', 'one blue square and a cross'])
  full = model.apply({'params': params}, images, tokens)['caption_logits']
  _, context = model.apply({'params': params}, images, method=CoCa.encode_image)
  from vlrep.models.decode import init_cache
  cache = init_cache(decoder, params, context, config.data.max_text_len)
  for t in range(10):
    logits, variables = decoder.apply({'params': params, 'cache': cache}, tokens[:, t:t + 1],
                                      context if t == 0 else None, method=CoCa.decode_step,
                                      mutable=['cache'])
    cache = variables['cache']
    np.testing.assert_allclose(logits, full[:, t], atol=2e-5, rtol=1e-4)


def _open_clip_layout(config, **text):
  """The shrunk config with open_clip CoCa's layout options (see vlrep/weights)."""
  config.model.update(pooler='single', image_pool='tok', pooler_heads=1, pooler_width=32,
                      pooler_query_norm=True, activation='quick_gelu', ln_eps=1e-5)
  config.model.vision.update(class_token=True, ln_pre=True, patch_bias=False, final_norm=False)
  config.model.text.update(pad_mask='shifted', cls_position='after_tokens', multimodal_heads=4,
                           multimodal_layout='split', head_bias=False,
                           multimodal_layer_scale=0.5, **text)
  return config


def test_open_clip_layout_cached_decode_equals_the_full_forward_pass(config):
  config = _open_clip_layout(config)
  config.data.max_text_len = 8
  model, params = _model_and_params(config)
  assert 'bias' not in params['text_decoder']['output_head']
  assert 'cross_mlp' in params['text_decoder']['multimodal_0']
  decoder = build_model(config, decode=True)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
  tokens = _tokens(config, ['red circles', 'a blue square'])
  full, context = jax.jit(lambda p, x, t: (
      model.apply({'params': p}, x, t, method=CoCa.next_token_logits),
      model.apply({'params': p}, x, method=CoCa.encode_image)[1]))(params, images, tokens)
  assert full.shape == (2, config.data.max_text_len, config.model.text.vocab_size)
  assert context.shape == (2, config.model.captioning_queries - 1, 32)
  from vlrep.models.decode import init_cache
  cache = init_cache(decoder, params, context, config.data.max_text_len)
  step = jax.jit(lambda cache, token, context: decoder.apply(
      {'params': params, 'cache': cache}, token, context, method=CoCa.decode_step,
      mutable=['cache']))
  for t in range(3):
    logits, variables = step(cache, tokens[:, t:t + 1], context if t == 0 else None)
    cache = variables['cache']
    np.testing.assert_allclose(logits, full[:, t], atol=2e-5, rtol=1e-4)


def test_pooling_without_cls_picks_the_normalised_token():
  from vlrep.models.text import TextDecoder
  decoder = TextDecoder(vocab_size=300, max_len=8, width=16, unimodal_layers=1,
                        multimodal_layers=0, num_heads=2, mlp_dim=32, embed_cls=False,
                        pool='argmax', pad_mask='none')
  tokens = jnp.asarray([[5, 200, 7, 0, 0, 0, 0, 0], [3, 4, 9, 299, 1, 0, 0, 0]])
  encode = jax.jit(lambda p, t: decoder.apply(p, t, method=TextDecoder.encode))
  params = nn.unbox(jax.jit(lambda t: decoder.init(jax.random.key(0), t,
                                                   method=TextDecoder.encode))(tokens))
  assert params['params']['pos_embed'].shape == (8, 16) and 'cls_embed' not in params['params']
  pooled, feats = encode(params, tokens)
  np.testing.assert_allclose(pooled, np.asarray(feats)[[0, 1], [1, 3]], atol=1e-6)
  np.testing.assert_allclose(np.asarray(feats).std(-1), 1.0, atol=1e-2)  # after ln_cls
