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
from vlrep.models.build import build_model, example_batch, init_params
from vlrep.step import LossConfig, compute_losses
from vlrep.tools import flops


@pytest.mark.parametrize('family', ['coca', 'cap', 'filip'])
def test_analytic_flops_match_xla_within_3_percent(family):
  """CoCa, a captioning-only model (no contrastive parts) and FILIP (token-wise similarity:
  every patch and text token projected, and compared pair by pair)."""
  config = load_config(family)  # tiny: width 128, so element-wise work is a few percent
  config.batch_size = 8
  config.loss.update(caption_chunk=0, token_similarity_chunk=0)  # no loops: XLA counts all
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


def test_a_captioner_counts_no_contrastive_parts_and_filip_counts_token_pairs():
  cap = load_config('cap', 'small')
  cap.batch_size = 4
  parts = flops.train_flops_per_step(cap)
  assert parts['contrastive_pooler'] == parts['projections'] == 0
  assert parts['contrastive_logits'] == 0 and parts['captioning_pooler'] > 0
  filip = load_config('filip', 'small')
  filip.batch_size = 4
  b, w, e, patches, tokens = 4, 256, 256, (128 // 8) ** 2, 32 + 1  # [CLS] is a token
  parts = flops.train_flops_per_step(filip)
  assert parts['contrastive_logits'] == 3 * 2 * b * b * patches * tokens * e
  assert parts['projections'] == 3 * b * 2 * (patches + tokens) * w * e
  assert parts['contrastive_pooler'] == parts['captioning_pooler'] == 0
