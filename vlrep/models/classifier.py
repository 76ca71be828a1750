"""The classification head fine-tuning trains (`loss.kind='classification'`).

Built into `CoCa` only when the loss asks for it (`model.num_classes` outputs), so that every
other run's parameter tree is what it was. `pool='embedding'` puts a linear layer on the
image embedding that contrastive and probe evaluations read (open_clip's and FLYP's
fine-tuning head); `pool='attn'` gives the head an attentional pooler of its own over the
image encoder's output tokens (big_vision's MAP head, an attentive probe trained end to end),
which also serves models with no contrastive embedding. The linear layer starts at zero, as
big_vision's fine-tuning heads do, so the first logits are all 0 and the first loss is
log(num_classes) whatever the pretrained features.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlrep.models.layers import DEFAULT_LN_EPS, AttentionalPooler, Dtype, logical

POOLS = ('embedding', 'attn')


class ClassifierHead(nn.Module):
  """(image embedding [B, E], encoder tokens [B, N, W]) -> float32 logits [B, num_classes]."""
  num_classes: int
  pool: str = 'embedding'
  num_heads: int = 1
  dtype: Dtype = jnp.float32
  ln_eps: float = DEFAULT_LN_EPS

  @nn.compact
  def __call__(self, embedding: jax.Array | None, tokens: jax.Array) -> jax.Array:
    if self.pool == 'attn':
      features = AttentionalPooler(1, self.num_heads, self.dtype, ln_eps=self.ln_eps,
                                   name='pooler')(tokens)[:, 0]
    else:
      features = embedding
    head = nn.Dense(self.num_classes, dtype=jnp.float32, name='head',
                    kernel_init=logical(nn.initializers.zeros, 'embed', None),
                    bias_init=logical(nn.initializers.zeros, None))
    return head(features.astype(jnp.float32))
