"""Transforms: decode anything to RGB at the size, seeded random crops, caption choice."""

import io

import numpy as np
import pytest
from PIL import Image

from vlrep.data import transforms


def _jpeg(width, height, mode='RGB'):
  buffer = io.BytesIO()
  Image.new(mode, (width, height), 128).save(buffer, format='JPEG')
  return buffer.getvalue()


@pytest.mark.parametrize('image', [_jpeg(40, 30), _jpeg(30, 50, 'L'),
                                   np.zeros((28, 28, 1), np.uint8),
                                   np.zeros((20, 36, 4), np.uint8)])
@pytest.mark.parametrize('augment', transforms.AUGMENTS)
def test_any_image_becomes_rgb_at_the_size(image, augment):
  out = transforms.decode_image(image, 16, augment, np.random.default_rng(0))
  assert out.shape == (16, 16, 3) and out.dtype == np.uint8


def test_center_resize_keeps_the_middle():
  image = np.zeros((10, 30, 3), np.uint8)
  image[:, 10:20] = 255  # the central square is white, the sides black
  out = transforms.decode_image(image, 8)
  assert out.min() > 200


def test_right_sized_arrays_pass_through():
  image = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
  assert transforms.decode_image(image, 16) is image


def test_random_crop_depends_on_the_generator_only():
  image = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
  crop = lambda seed: transforms.decode_image(image, 16, 'random_resized_crop',
                                              np.random.default_rng(seed))
  np.testing.assert_array_equal(crop(1), crop(1))
  assert not np.array_equal(crop(1), crop(2))


def test_caption_is_sampled_among_several():
  transform = transforms.DecodeAndAugment(8, 'resize')
  example = {'image': np.zeros((8, 8, 3), np.uint8), 'captions': ['a', 'b', 'c']}
  chosen = {transform.random_map(example, np.random.default_rng(s))['caption']
            for s in range(30)}
  assert chosen == {'a', 'b', 'c'}


@pytest.mark.parametrize('data', [b'not an image', _jpeg(64, 64)[:300]])
def test_undecodable_images_raise_what_the_pipeline_skips(data):
  with pytest.raises(transforms.DECODE_ERRORS):
    transforms.decode_image(data, 16)


def test_bad_captions_and_augment_are_errors():
  with pytest.raises(ValueError):
    transforms.captions_of({'image': b''})
  with pytest.raises(ValueError, match='data.augment'):
    transforms.DecodeAndAugment(16, 'mixup')
