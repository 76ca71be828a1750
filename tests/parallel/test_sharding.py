"""Mesh construction from config and the errors it gives."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from vlrep import train
from vlrep.models.build import build_model, init_params
from vlrep.parallel import sharding
from vlrep.tools import plan


def _mesh(**sizes):
  return ml_collections.ConfigDict({'data': 1, 'fsdp': 1, 'tensor': 1, **sizes})


def test_minus_one_takes_the_rest():
  assert sharding.mesh_shape(_mesh(data=-1, tensor=2), 8) == (4, 1, 2)


@pytest.mark.parametrize('sizes, devices, message', [
    ({'data': 3}, 8, 'has 3 devices, but 8'),
    ({'data': -1, 'fsdp': 3}, 8, 'does not divide'),
    ({'data': -1, 'fsdp': -1}, 8, 'at most one -1'),
])
def test_bad_mesh_names_the_mesh(sizes, devices, message):
  with pytest.raises(ValueError, match=message):
    sharding.mesh_shape(_mesh(**sizes), devices)


def test_batch_must_divide_over_batch_axes():
  mesh = sharding.make_mesh(_mesh(data=-1))
  assert sharding.batch_size_per_process(8, mesh) == 8


def _tpu_devices(topology, slices=1):
  return plan.target_devices(f'tpu:{topology}', slices)


def _lines(array):
  """For each data index: whether its (fsdp, tensor) chips form one physical row (or column)
  of the 4x4 torus, tensor pairs being neighbours."""
  x = np.vectorize(lambda d: d.coords[0], otypes=[int])(array)
  y = np.vectorize(lambda d: d.coords[1], otypes=[int])(array)
  return [((np.ptp(x[d]) == 0 or np.ptp(y[d]) == 0) and
           (abs(np.diff(x[d], axis=-1)) + abs(np.diff(y[d], axis=-1)) == 1).all())
          for d in range(array.shape[0])]


def test_mesh_puts_tensor_and_fsdp_on_neighbouring_chips():
  devices = _tpu_devices('v5e:4x4')
  mesh = sharding.make_mesh(_mesh(data=4, fsdp=2, tensor=2), devices)
  assert all(_lines(mesh.devices))
  # jax's device order (host by host, 2x2 chips each) reshaped does not give that.
  assert not all(_lines(np.asarray(devices).reshape(4, 2, 2)))


def test_multislice_mesh_crosses_slices_only_on_the_dcn_axis():
  devices = _tpu_devices('v5e:2x2', slices=2)
  mesh = sharding.make_mesh(_mesh(data=2, fsdp=2, tensor=2, dcn_data=2), devices)
  slices = np.vectorize(lambda d: d.slice_index, otypes=[int])(mesh.devices)
  assert (slices[0] == 0).all() and (slices[1] == 1).all()
  with pytest.raises(ValueError, match='span 2 slices: set mesh.dcn_data'):
    sharding.make_mesh(_mesh(data=2, fsdp=2, tensor=2), devices)
  with pytest.raises(ValueError, match='mesh.dcn_data=3 does not divide mesh.data=2'):
    sharding.make_mesh(_mesh(data=2, fsdp=2, tensor=2, dcn_data=3), devices)


def test_configs_without_the_new_mesh_fields_still_build():
  old = _mesh(data=-1)  # a config saved before dcn_* / replicate_max_bytes
  assert sharding.mesh_option(old, 'dcn_data') == 1
  assert sharding.make_mesh(old).devices.shape == (8, 1, 1)


def test_replication_above_the_threshold_names_the_array(config):
  config.eval_every_steps = 0
  config.mesh.update(data=-1, tensor=2)  # the tiny model's 259-token vocabulary
  setup = train.setup_step(config)
  arrays = {r['array']: r for r in setup.replicated}
  embedding = "['text_decoder']['token_embed']['embedding']"
  assert any(embedding in name for name in arrays), sorted(arrays)
  entry = next(r for name, r in arrays.items() if name.endswith(f'.params{embedding}'))
  assert entry['shape'] == [259, 32] and entry['axes'] == ['tensor'] and entry['bytes'] == 259 * 32 * 4
  config.mesh.replicate_max_bytes = 259 * 32 * 4 - 1
  with pytest.raises(train.ConfigError, match=r"output_head'\]\['kernel'\] \(32, 259\): "
                     r"dimension 1 \(259\) does not divide over mesh axes tensor \(2 ways\); "
                     r"replicated, all 33,152 bytes"):
    train.setup_step(config)


def _encode_image_hlo(config, mesh, rules: bool) -> str:
  model = build_model(config)
  params = jax.eval_shape(lambda: init_params(model, config, jax.random.key(0)))
  params = nn.unbox(params)
  images = jax.ShapeDtypeStruct((16, 16, 16, 3), jnp.uint8)
  replicated = NamedSharding(mesh, PartitionSpec())

  def encode(params, images):
    if not rules:
      return model.apply({'params': params}, images, method=model.encode_image)
    with sharding.axis_rules(mesh):
      return model.apply({'params': params}, images, method=model.encode_image)
  return jax.jit(encode, in_shardings=(replicated, replicated)).lower(params, images).compile().as_text()


def test_activation_constraints_apply_under_the_rules(config):
  """The vision blocks' outputs [16 images, 4 patches, width 32] carry ('batch', 'length',
  'act_embed'): under the rules each of 8 devices computes 2 images, although every input is
  replicated; without them XLA computes all 16 on every device."""
  mesh = sharding.make_mesh(_mesh(data=-1))
  with_rules = _encode_image_hlo(config, mesh, rules=True)
  without = _encode_image_hlo(config, mesh, rules=False)
  assert re.search(r'f32\[2,4,32\]', with_rules) and not re.search(r'f32\[2,4,32\]', without)
  assert re.search(r'f32\[16,4,32\]', without)
