"""Export: Pretrained.save writes one directory that vlrep.load reads on any device count."""

import json
import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
import safetensors.numpy

import vlrep
from vlrep.models.build import build_model, init_params
from vlrep.parallel import sharding
from vlrep.pretrained import Pretrained
from vlrep.weights import export


def _mesh(devices, **axes):
  return sharding.make_mesh(ml_collections.ConfigDict({**dict(data=-1, fsdp=1, tensor=1), **axes}),
                            devices)


def test_saved_on_8_devices_loads_on_1_and_4(config, tmp_path):
  # Parameters sharded FSDP-style over 4 of 8 devices, so saving has to gather them.
  mesh = _mesh(jax.devices(), fsdp=4)
  abstract = export.abstract_params(config, mesh)
  shardings = jax.tree.map(lambda x: x.sharding, abstract)
  model = build_model(config)
  params = jax.jit(lambda: nn.unbox(init_params(model, config, jax.random.key(3))),
                   out_shardings=shardings)()
  original = Pretrained(config, params, batch_size=8, mesh=mesh)
  path = original.save(str(tmp_path / 'export'))
  assert sorted(os.listdir(path)) == ['config.json', 'params.safetensors']
  # A plain file of named tensors: readable without vlrep or JAX.
  arrays = safetensors.numpy.load_file(os.path.join(path, 'params.safetensors'))
  np.testing.assert_array_equal(arrays['text_projection/kernel'],
                                np.asarray(params['text_projection']['kernel']))
  assert len(arrays) == len(jax.tree.leaves(params))

  images = np.random.default_rng(0).integers(0, 255, (5, 16, 16, 3)).astype(np.uint8)
  texts = ['two red circles', 'a blue square', 'three small green crosses']
  want_image, want_text = original.encode_image(images), original.encode_text(texts)
  for devices in (jax.devices()[:1], jax.devices()[4:]):
    loaded = vlrep.load(path, mesh=_mesh(devices))
    assert json.loads(loaded.config.to_json()) == json.loads(config.to_json())
    jax.tree.map(np.testing.assert_array_equal, loaded.params, jax.device_get(params))
    assert {d for x in jax.tree.leaves(loaded.params) for d in x.devices()} == set(devices)
    np.testing.assert_allclose(loaded.encode_image(images), want_image, atol=2e-6)
    np.testing.assert_allclose(loaded.encode_text(texts), want_text, atol=2e-6)

  with pytest.raises(ValueError, match='exported model, which has no steps'):
    vlrep.load(path, step=2)
  with pytest.raises(FileNotFoundError, match='neither a vlrep run directory nor an exported'):
    vlrep.load(str(tmp_path / 'nothing'))


def test_mismatch_names_every_array_and_both_shapes(config):
  abstract = export.abstract_params(config, _mesh(jax.devices()[:1]))
  named = {k: np.zeros(x.shape, x.dtype) for k, x in export.named_arrays(abstract).items()}
  named['text_projection/kernel'] = np.zeros((32, 8), np.float32)
  del named['logit_scale']
  named['extra/kernel'] = np.zeros((2, 2), np.float32)
  with pytest.raises(ValueError) as error:
    export.place(named, abstract, 'SOURCE')
  message = str(error.value)
  assert '(3 arrays)' in message
  assert 'text_projection/kernel: (32, 8) in SOURCE, (32, 16) in the config' in message
  assert 'logit_scale: not in SOURCE (the config has ())' in message
  assert 'extra/kernel: in SOURCE (2, 2) but not in the config' in message
