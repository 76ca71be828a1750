"""Analytic model FLOPs against XLA's own count (`cost_analysis`) and against hand counts.

XLA counts differently in two ways, both accounted for below: it counts causal attention in
full (the masked half is computed, then discarded), and it counts element-wise work
(LayerNorm, GELU, softmax, residual sums, the losses) that model FLOPs leave out. The test
uses the unchunked caption loss because XLA counts a loop body once, not per iteration.
"""

import flax.linen as nn
import jax
import pytest

from conftest import load_config
from vlrep.models.coca import build_model
from vlrep.step import LossConfig, compute_losses, example_batch, init_params
from vlrep.tools import flops


def test_analytic_flops_match_xla_within_3_percent():
  config = load_config('coca')  # tiny: width 128, so element-wise work is a few percent
  config.batch_size = 8
  config.loss.caption_chunk = 0
  model = build_model(config)
  params = jax.eval_shape(lambda: nn.unbox(init_params(model, config, jax.random.key(0))))
  batch = jax.eval_shape(lambda: example_batch(config, config.batch_size))
  loss_config = LossConfig.from_config(config.loss)
  loss = lambda p, b: compute_losses(model, p, b, loss_config)[0]
  xla_forward = jax.jit(loss).lower(params, batch).cost_analysis()['flops']
  xla_train = jax.jit(jax.grad(loss)).lower(params, batch).cost_analysis()['flops']

  full = flops.forward_flops(config, causal_half=False)['total']
  assert xla_forward == pytest.approx(full, rel=0.03)
  # Backward = two forwards: the train step's model FLOPs are three forwards.
  assert xla_train == pytest.approx(3 * full, rel=0.03)
  half = flops.train_flops_per_step(config)
  assert half['total'] == 3 * flops.forward_flops(config)['total'] < 3 * full


def test_components_by_hand():
  config = load_config('coca', 'small')
  config.batch_size = 4
  b, w, e = 4, 256, 256
  length, vocab, queries, patches = 32, 32_000, 64, (128 // 8) ** 2
  parts = flops.train_flops_per_step(config)
  assert parts['lm_head'] == 3 * 2 * b * (length - 1) * w * vocab
  assert parts['contrastive_logits'] == 3 * 2 * b * b * e
  # Cascade: the contrastive pooler's one query reads the captioning pooler's 64 tokens.
  assert parts['contrastive_pooler'] == 3 * b * (2 * w * w * (2 + 2 * queries) + 4 * queries * w)
  # One unimodal layer over L + 1 = 33 tokens, causal: 33 * 34 / 2 query-key pairs.
  t = length + 1
  layer = 2 * w * w * 4 * t + 4 * (t * (t + 1) // 2) * w + 4 * t * w * 1024
  assert parts['text_unimodal'] == 3 * b * 3 * layer
  assert parts['total'] == sum(v for k, v in parts.items() if k != 'total')
  clip = load_config('clip', 'small')
  clip.batch_size = 4
  clip_parts = flops.train_flops_per_step(clip)
  assert clip_parts['lm_head'] == clip_parts['text_multimodal'] == 0
  assert clip_parts['image_encoder'] == parts['image_encoder']
  # CLIP's contrastive pooler reads all patches.
  assert clip_parts['contrastive_pooler'] == 3 * b * (
      2 * w * w * (2 + 2 * patches) + 4 * patches * w)
