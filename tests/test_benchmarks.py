"""The benchmark scripts that CI can afford: optimizer-state sizes, the op classifier and the
attention timer's handling of an implementation that fails and its alternative's numerics."""

import json
import os
import subprocess
import sys

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, 'benchmarks'))  # the scripts import their neighbours


def test_optimizer_memory_counts_adamw_as_two_moments_and_adafactor_below():
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, 'benchmarks')]))
  out = subprocess.run([sys.executable, 'benchmarks/optimizer_memory.py', '--variants=tiny'],
                       cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout
  tiny = json.loads(out.strip().splitlines()[-1])['tiny']
  assert tiny['param_bytes'] == 4 * tiny['parameters']  # float32 master weights
  # Two float32 moments plus step counters.
  assert 0 <= tiny['adamw_state_bytes'] - 2 * tiny['param_bytes'] <= 64
  # Adafactor: a full first moment and (partly) factored second moments.
  assert (tiny['param_bytes'] < tiny['adafactor_factor64_state_bytes']
          <= tiny['adafactor_state_bytes'] < tiny['adamw_state_bytes'])


def test_profile_step_classifies_ops():
  from profile_step import classify
  backward_fc1 = ('%ynn_fusion.4 = f32[4096,256]{1,0} fusion(...), metadata={op_name='
                  '"jit(train_step)/transpose(jvp(CoCa))/CoCa.encode_image/image_encoder/'
                  'block_3/mlp/fc1/dot_general"}')
  assert classify('ynn_fusion.4', 'f32[4096,256]{1,0}', backward_fc1) == (
      'matmul', 'backward', 'image')
  scores = 'metadata={op_name="jit(train_step)/jvp(CoCa)/CoCa.text_decoder/x"}'
  assert classify('ynn_fusion.9', 'f32[16,4,32,32]{3,2,1,0}', scores) == (
      'attention_bmm', 'forward', 'text')
  assert classify('copy_bitcast_fusion.3', 'f32[8,8]{1,0}', '')[0] == 'copy/transpose'
  assert classify('add_select_fusion', 'f32[8]{0}', '/while/body')[:3:2] == (
      'elementwise', 'loss/head')


def test_attention_speed_reports_a_failing_implementation_and_times_the_rest(monkeypatch):
  import attention_speed

  def unsupported(q, k, v, mask=None):
    raise NotImplementedError('no kernel for these shapes')

  monkeypatch.setitem(attention_speed.IMPLEMENTATIONS, 'unsupported', unsupported)
  core = attention_speed.core_times(batch=2, tokens=8, heads=2, head_dim=4)
  assert core['unsupported'] == {'error': 'NotImplementedError: no kernel for these shapes'}
  for name in ('vlrep', 'heads_major'):
    assert core[name]['forward_ms'] > 0 and core[name]['forward_backward_ms'] > 0


def test_attention_timer_compares_the_same_computation():
  """The heads-major layout it times computes vlrep's attention: values, gradients, a padding
  mask with one fully masked query row (which attends uniformly), float32 and bfloat16."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from attention_speed import heads_major
  from vlrep.models.layers import dot_product_attention
  for dtype, tol in ((jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)):
    q, k, v = (jax.random.normal(jax.random.key(i), shape, dtype)
               for i, shape in enumerate([(2, 5, 3, 4), (2, 7, 3, 4), (2, 7, 3, 4)]))
    mask = jnp.ones((2, 1, 5, 7), bool).at[0, :, :, 4:].set(False).at[1, :, 2, :].set(False)
    ours = lambda q, k, v: dot_product_attention(q, k, v, mask)
    other = lambda q, k, v: heads_major(q, k, v, mask)
    np.testing.assert_allclose(np.float32(other(q, k, v)), np.float32(ours(q, k, v)),
                               atol=tol, rtol=tol)
    loss = lambda f: lambda *qkv: jnp.sum(jnp.sin(f(*qkv).astype(jnp.float32)))
    for got, want in zip(jax.grad(loss(other), (0, 1, 2))(q, k, v),
                         jax.grad(loss(ours), (0, 1, 2))(q, k, v)):
      np.testing.assert_allclose(np.float32(got), np.float32(want), atol=5 * tol, rtol=5 * tol)
    np.testing.assert_allclose(np.float32(ours(q, k, v))[1, 2],
                               np.float32(v[1].astype(jnp.float32).mean(0)), atol=tol, rtol=tol)
