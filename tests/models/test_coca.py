"""CoCa model: output shapes, normalised embeddings, temperature init and clip, CLIP variant;
`model.remat` and `model.scan_layers` change memory and compile time, never the numbers."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config, shrink
from vlrep.data.tokenizer import EOS_ID
from vlrep.models import decode
from vlrep.models.build import build_model, example_batch, init_params
from vlrep.models.coca import CoCa, clamp_temperature
from vlrep.pretrained import Pretrained
from vlrep.step import output_head


def test_forward_shapes_and_normalised_embeddings(config):
  model = build_model(config)
  params = _init(config)
  batch = example_batch(config, batch_size=3)
  out = jax.jit(model.apply)({'params': params}, batch['images'], batch['tokens'])
  assert out['image_emb'].shape == (3, config.model.embed_dim)
  assert out['text_emb'].shape == (3, config.model.embed_dim)
  assert out['caption_logits'].shape == (3, config.data.max_text_len - 1,
                                         config.model.text.vocab_size)
  np.testing.assert_allclose(np.linalg.norm(out['image_emb'], axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(out['text_emb'], axis=-1), 1.0, rtol=1e-5)
  _, caption_tokens = model.apply({'params': params}, batch['images'], method=CoCa.encode_image)
  assert caption_tokens.shape == (3, config.model.captioning_queries, config.model.vision.width)


def test_temperature_starts_at_0_07_and_the_parameter_is_clamped_at_ln_100(config):
  model = build_model(config)
  params = _init(config)
  scale = model.apply({'params': params}, method=CoCa.logit_scale)
  assert float(scale) == pytest.approx(1 / 0.07, rel=1e-5)
  # The forward pass does not clip (its gradient would vanish past the bound); the train
  # step clamps the parameter after each update.
  params = dict(params, logit_scale=jnp.asarray(10.0))  # exp(10) >> 100
  assert float(model.apply({'params': params}, method=CoCa.logit_scale)) == pytest.approx(
      np.exp(10.0), rel=1e-5)
  clamped = clamp_temperature(params)
  assert float(clamped['logit_scale']) == pytest.approx(np.log(100.0), rel=1e-7)
  assert float(model.apply({'params': clamped}, method=CoCa.logit_scale)) == pytest.approx(
      100.0, rel=1e-5)
  below = dict(params, logit_scale=jnp.asarray(2.0))
  assert float(clamp_temperature(below)['logit_scale']) == 2.0


def test_sigmoid_loss_starts_at_siglip_temperature_and_bias(config):
  """SigLIP's init: t' = log 10 (scale 10) and b = -10; softmax models have no bias."""
  assert 'logit_bias' not in _init(config)
  config.loss.contrastive_type = 'sigmoid'
  model = build_model(config)
  params = _init(config)
  temperature = model.apply({'params': params}, method=CoCa.temperature)
  assert float(temperature['logit_scale']) == pytest.approx(10.0, rel=1e-5)
  assert float(temperature['logit_bias']) == -10.0


@pytest.mark.parametrize('scan_layers', [False, True])
def test_every_parameter_has_logical_axis_names(config, scan_layers):
  config.model.scan_layers = scan_layers
  model = build_model(config)
  boxed = jax.eval_shape(lambda: init_params(model, config, jax.random.key(0)))
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  unnamed = [x for x in leaves if not isinstance(x, nn.Partitioned)]
  assert not unnamed
  assert all(len(x.names) == len(x.value.shape) for x in leaves)
  if scan_layers:
    kernel = boxed['text_decoder']['unimodal']['mlp']['fc1']['kernel']
    assert kernel.names == ('layers', 'embed', 'mlp')


def test_clip_is_coca_without_multimodal_layers():
  config = shrink(load_config('clip'))
  model = build_model(config)
  params = _init(config)
  assert 'captioning_pooler' not in params
  assert not any(k.startswith('multimodal') for k in params['text_decoder'])
  batch = example_batch(config, batch_size=2)
  out = model.apply({'params': params}, batch['images'], batch['tokens'])
  assert 'caption_logits' not in out and out['image_emb'].shape == (2, config.model.embed_dim)
  assert config.loss.caption_weight == 0.0


def test_scanned_clip_has_no_multimodal_stack():
  config = shrink(load_config('clip'))
  config.model.scan_layers = True
  model = build_model(config)
  params = jax.eval_shape(lambda: nn.unbox(init_params(model, config, jax.random.key(0))))
  assert not any(k.startswith('multimodal') for k in params['text_decoder'])
  batch = example_batch(config, batch_size=2)
  out = jax.eval_shape(lambda p: model.apply({'params': p}, batch['images'], batch['tokens']),
                       params)
  assert 'caption_logits' not in out and out['text_emb'].shape == (2, config.model.embed_dim)


def test_parallel_pooler_reads_the_image_tokens(config):
  shapes = lambda: jax.tree.map(lambda x: x.shape, jax.eval_shape(
      lambda: init_params(build_model(config), config, jax.random.key(0))))
  cascade = shapes()
  config.model.pooler = 'parallel'
  # Same parameter shapes either way; the wiring is what differs.
  assert shapes() == cascade
  config.model.pooler = 'serial'
  with pytest.raises(ValueError, match='model.pooler'):
    build_model(config)


def _two_layer_config(**model):
  """The test config with two layers per stack, so that scanned stacks really loop."""
  config = shrink(load_config('coca'))
  config.data.max_text_len = 8
  config.model.vision.layers = 2
  config.model.text.update(unimodal_layers=2, multimodal_layers=2)
  config.model.update(model)
  return config


def _init(config, seed=0):
  # Jitted: one compile instead of op-by-op dispatch, several times faster on a CPU.
  model = build_model(config)
  return jax.jit(lambda rng: nn.unbox(init_params(model, config, rng)))(jax.random.key(seed))


def _stack_layers(params):
  """Per-layer parameters (`block_<i>`, `unimodal_<i>`, `multimodal_<i>`) -> the
  `scan_layers` layout: one `block` / `unimodal` / `multimodal` with a leading layer axis."""
  if not isinstance(params, dict):
    return params
  out, stacks = {}, {}
  for key, value in params.items():
    match = re.fullmatch(r'(block|unimodal|multimodal)_(\d+)', key)
    if match:
      stacks.setdefault(match[1], {})[int(match[2])] = value
    else:
      out[key] = _stack_layers(value)
  for name, layers in stacks.items():
    out[name] = jax.tree.map(lambda *xs: jnp.stack(xs), *(layers[i] for i in range(len(layers))))
  return out


def _params_for(config, per_layer_params):
  """Per-layer parameters in the layout of `config`'s model, checked against the shapes
  that model initialises."""
  params = _stack_layers(per_layer_params) if config.model.scan_layers else per_layer_params
  model = build_model(config)
  own = jax.eval_shape(lambda: nn.unbox(init_params(model, config, jax.random.key(0))))
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, own)
  return params


def _outputs_and_grads(config, params, batch):
  """Forward outputs and the gradient of a scalar that reads all of them."""
  model = build_model(config)
  names = ('image_emb', 'text_emb', 'caption_logits')

  def loss(params):
    out = model.apply({'params': params}, batch['images'], batch['tokens'])
    out = {k: out[k] for k in names}
    # Fixed random weights (same keys and shapes for every model), so no gradient is
    # trivially zero, as it would be for the sum of a normalised embedding.
    return sum(jnp.sum(out[k] * jax.random.normal(jax.random.key(i), out[k].shape))
               for i, k in enumerate(names)), out

  grads, out = jax.jit(jax.grad(loss, has_aux=True))(params)
  return out, grads


def _assert_close(got, want, err_msg=''):
  # Re-association (scan vs unrolled layers, recomputed vs saved activations) moves values
  # by ~1e-7 of each array's largest element, so small elements need an atol at that scale.
  # The 1e-6 floor is for key-bias gradients, zero in exact arithmetic (softmax ignores a
  # constant shift of the scores), which come out as rounding noise of ~1e-7.
  atol = 1e-5 * float(np.max(np.abs(want))) + 1e-6
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol, err_msg=err_msg)


@pytest.fixture(scope='module')
def plain():
  """The plain model's (config, params, batch, outputs, gradients) to compare against."""
  config = _two_layer_config()
  batch = example_batch(config, batch_size=2)
  batch['images'] = jax.random.randint(jax.random.key(1), batch['images'].shape, 0, 255
                                       ).astype(jnp.uint8)
  batch['tokens'] = jax.random.randint(jax.random.key(2), batch['tokens'].shape, 1, 200)
  params = _init(config)
  return config, params, batch, *_outputs_and_grads(config, params, batch)


@pytest.mark.parametrize('remat', ['full', 'minimal'])
@pytest.mark.parametrize('scan_layers', [False, True])
def test_remat_and_scan_give_the_plain_outputs_and_gradients(plain, remat, scan_layers):
  _, params, batch, want_out, want_grads = plain
  config = _two_layer_config(remat=remat, scan_layers=scan_layers)
  got_out, got_grads = _outputs_and_grads(config, _params_for(config, params), batch)
  for k, want in want_out.items():
    _assert_close(got_out[k], want, err_msg=k)
  want_grads = _stack_layers(want_grads) if scan_layers else want_grads
  jax.tree_util.tree_map_with_path(
      lambda path, got, want: _assert_close(got, want, jax.tree_util.keystr(path)),
      got_grads, want_grads)


def test_scanned_greedy_decoding_equals_per_layer_decoding(plain):
  config, params, _, _, _ = plain
  max_len = 8
  # Make EOS likely somewhere so early stopping and padding are exercised.
  head = params['text_decoder']['output_head']
  params = {**params, 'text_decoder': {**params['text_decoder'], 'output_head': {
      **head, 'bias': head['bias'].at[EOS_ID].set(0.5)}}}
  images = np.asarray(jax.random.randint(jax.random.key(4), (4, 16, 16, 3), 0, 255), np.uint8)
  # Through the public API: image encoder, captioning pooler and `decode.greedy`.
  want = Pretrained(config, params, batch_size=4).caption_ids(images, max_len)
  assert (want == EOS_ID).any()

  config = _two_layer_config(scan_layers=True)
  scanned = _params_for(config, params)
  decoder = build_model(config, decode=True)
  context = jax.ShapeDtypeStruct(
      (4, config.model.captioning_queries, config.model.vision.width), jnp.float32)
  cache = jax.eval_shape(lambda c: decode.init_cache(decoder, scanned, c, max_len), context)
  assert cache['text_decoder']['multimodal']['self_attention']['cached_key'].shape[0] == 2
  got = Pretrained(config, scanned, batch_size=4).caption_ids(images, max_len)
  np.testing.assert_array_equal(got, want)


def test_unknown_remat_is_named(config):
  config.model.remat = 'some'
  with pytest.raises(ValueError, match="model.remat='some'.*'none', 'full', 'minimal'"):
    build_model(config)


def test_default_layout_has_no_layout_option_parameters(config):
  """The interop options default to the paper's layout: no new parameters, same shapes."""
  params = jax.eval_shape(lambda: nn.unbox(init_params(build_model(config), config,
                                                       jax.random.key(0))))
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  for new in ("['ls_", 'ln_pre', 'ln_query', 'cross_mlp', 'ln_cross_context', 'image_pooled_norm',
              "['image_encoder']['cls_embed']"):
    assert not [p for p in paths if new in p], new
  assert params['text_decoder']['pos_embed'].shape[0] == config.data.max_text_len + 1
  assert 'bias' in params['text_decoder']['output_head']
  assert 'bias' in params['image_encoder']['patch_embed']


def test_single_pooler_layout(config):
  """open_clip's CoCa pooling: one pooler; the mean of all queries but the first is the
  contrastive vector ('avg'), those queries are the caption tokens. (Numbers: tests/weights.)"""
  config.model.update(pooler='single', image_pool='avg')
  config.model.vision.class_token = True
  model = build_model(config)
  images = jnp.zeros((2, 16, 16, 3), jnp.uint8)
  params = jax.eval_shape(lambda: nn.unbox(init_params(model, config, jax.random.key(0))))
  assert 'contrastive_pooler' not in params and 'captioning_pooler' in params
  emb, caption_tokens = jax.eval_shape(lambda p, x: model.apply(
      {'params': p}, x, method=CoCa.encode_image), params, images)
  assert emb.shape == (2, config.model.embed_dim)
  assert caption_tokens.shape == (2, config.model.captioning_queries - 1,
                                  config.model.vision.width)


def test_mismatched_pooler_and_image_pool_are_named(config):
  config.model.image_pool = 'tok'  # with the default 'cascade' poolers
  with pytest.raises(ValueError, match='model.image_pool'):
    build_model(config)


def test_layout_option_parameters_have_logical_axis_names(config):
  config.model.update(text_projection_bias=True, pooler='single', image_pool='tok',
                      pooler_query_norm=True, pooled_norm=True)
  config.model.vision.update(class_token=True, ln_pre=True, layer_scale=0.1)
  config.model.text.update(multimodal_layout='split', multimodal_layer_scale=0.1,
                           layer_scale=0.1)
  model = build_model(config)
  boxed = jax.eval_shape(lambda: init_params(model, config, jax.random.key(0)))
  leaves = jax.tree_util.tree_leaves_with_path(
      boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert not [jax.tree_util.keystr(p) for p, leaf in leaves
              if not isinstance(leaf, nn.Partitioned)]
  assert len(leaves) > 100


def test_caption_features_and_bfloat16_compute(config):
  """`caption_features` + the output head (`step.output_head`) is `caption_logits`;
  `model.dtype=bfloat16` computes the same outputs to bfloat16 precision from the same
  float32 parameters, with the output head's logits accumulated and returned in float32."""
  params = _init(config)
  batch = example_batch(config, batch_size=2)
  batch['tokens'] = batch['tokens'].at[:, :5].set(jnp.arange(3, 8))
  images = np.random.default_rng(0).integers(0, 256, batch['images'].shape, np.uint8)

  def forward(dtype):
    config.model.dtype = dtype
    model = build_model(config)
    def apply(params):
      out = model.apply({'params': params}, images, batch['tokens'])
      features = model.apply({'params': params}, images, batch['tokens'],
                             caption_features=True)['caption_features']
      head, head_params = output_head(model, params)
      return out, head(head_params, features)
    return jax.jit(apply)(params)

  out, head_logits = forward('float32')
  np.testing.assert_allclose(head_logits, out['caption_logits'], rtol=1e-5, atol=1e-5)
  out_bf16, bf16_head_logits = forward('bfloat16')
  for name in ('image_emb', 'text_emb', 'caption_logits'):
    assert out_bf16[name].dtype == jnp.float32, name  # what the losses read stays float32
  # Measured here: 0.012, 0.0025 and 0.018 (logits up to 1.7); errors of the bfloat16
  # layers themselves, which a bug of any size would exceed.
  for name, atol in (('image_emb', 0.03), ('text_emb', 0.01), ('caption_logits', 0.05)):
    np.testing.assert_allclose(out_bf16[name], out[name], atol=atol, err_msg=name)
  np.testing.assert_allclose(bf16_head_logits, out_bf16["caption_logits"], rtol=1e-6, atol=1e-6)
  for dtype in ('int8', 'float16'):  # float16 would need loss scaling
    with pytest.raises(ValueError, match='model.dtype'):
      forward(dtype)
  config.model.update(dtype='float32', param_dtype='bfloat16')
  bf16_params = jax.eval_shape(lambda: init_params(build_model(config), config, jax.random.key(0)))
  assert {x.dtype for x in jax.tree.leaves(nn.unbox(bf16_params))} == {jnp.dtype('bfloat16')}
