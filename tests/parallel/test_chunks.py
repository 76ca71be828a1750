"""`in_chunks`: fixed-size global chunks over the batch axes, the last one padded, with the
model's logical-axis rules in effect (issue 21 item 4: evaluators, decoding and the Python API
trace the model as training does)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from conftest import mesh_of
from vlrep.models.build import build_model, init_params
from vlrep.parallel import chunks, sharding


def test_chunks_padded_and_run_under_the_rules():
  mesh = mesh_of(jax.devices()[:4], data=2, fsdp=2)
  seen = []

  def fn(x):
    seen.append((nn.get_logical_axis_rules(), dict(jax.sharding.get_abstract_mesh().shape),
                 x.shape, x.sharding.spec))
    return x * 2
  x = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)
  np.testing.assert_array_equal(chunks.in_chunks(fn, x, 4, sharding.batch_sharding(mesh)), 2 * x)
  assert len(seen) == 3  # 4 + 4 + 2 rows, the last chunk padded to 4
  for rules, abstract_mesh, shape, spec in seen:
    assert tuple(rules) == sharding.LOGICAL_RULES
    assert abstract_mesh == {'data': 2, 'fsdp': 2, 'tensor': 1}
    assert shape == (4, 3) and spec == jax.sharding.PartitionSpec(sharding.BATCH_AXES)
  assert nn.get_logical_axis_rules() == ()  # only while fn runs


def test_a_model_traced_in_chunks_carries_its_activation_constraints(config):
  """The image encoder's block outputs are constrained to ('batch', 'length', 'act_embed'):
  one sharding constraint per block when traced by `in_chunks`, none outside the rules."""
  model = build_model(config)
  params = jax.jit(lambda: nn.unbox(init_params(model, config, jax.random.key(0))))()
  encode = jax.jit(lambda p, x: model.apply({'params': p}, x, method=model.encode_image)[0])
  lowered = []

  def fn(images):
    lowered.append(encode.lower(params, images).as_text())
    return encode(params, images)
  mesh = mesh_of(data=2, fsdp=2, tensor=2)
  images = np.zeros((8, 16, 16, 3), np.uint8)
  out = chunks.in_chunks(fn, images, 8, sharding.batch_sharding(mesh))
  assert out.shape == (8, config.model.embed_dim)
  constraints = lambda text: len([line for line in text.splitlines()
                                  if 'sharding_constraint' in line or '@Sharding' in line])
  outside = encode.lower(params, jnp.zeros((8, 16, 16, 3), jnp.uint8)).as_text()
  assert constraints(outside) == 0
  assert constraints(lowered[0]) >= config.model.vision.layers
