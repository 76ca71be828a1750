"""Mesh construction from config and the errors it gives."""

import ml_collections
import pytest

from vlrep import sharding


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
