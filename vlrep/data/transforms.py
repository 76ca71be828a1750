"""Per-example transforms: decode, resize or random-resized-crop, caption choice, tokenise.

`DecodeAndAugment` turns any source's example (encoded bytes, or an array of any size, grey
or RGB) into {image: uint8 [S, S, 3], caption: str}. It is a grain `RandomMap`: the pipeline
applies it to the global stream, so its generator is seeded by (seed, global element index)
and an augmented batch is the same for any number of processes and after a resume.
Anything that cannot be decoded raises one of `DECODE_ERRORS`; the pipeline skips it.
"""

from __future__ import annotations

import io
import math
from typing import Any

import grain
import numpy as np
from PIL import Image

from vlrep.data.tokenizer import ByteTokenizer

AUGMENTS = ('resize', 'random_resized_crop')
# What an undecodable record raises: PIL signals broken files with OSError, but some plugins
# with SyntaxError or EOFError, and oversized images with DecompressionBombError.
DECODE_ERRORS = (ValueError, OSError, SyntaxError, EOFError, Image.DecompressionBombError)
_CROP_SCALE = (0.5, 1.0)  # fraction of the image's area kept by random_resized_crop
_CROP_RATIO = (3 / 4, 4 / 3)


def to_pil(image: Any, min_side: int) -> Image.Image:
  """An RGB PIL image from encoded bytes or a uint8 array ([H, W], [H, W, 1|3|4])."""
  if isinstance(image, (bytes, bytearray, memoryview)):
    pil = Image.open(io.BytesIO(image))
    # JPEG can decode at 1/2, 1/4, 1/8 scale for almost nothing; keep >= min_side pixels.
    pil.draft('RGB', (min_side, min_side))
  else:
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
      array = array[..., 0]
    pil = Image.fromarray(array.astype(np.uint8, copy=False))
  return pil.convert('RGB')


def center_resize(pil: Image.Image, size: int) -> np.ndarray:
  """Shorter side to `size`, then the central square: uint8 [size, size, 3]."""
  w, h = pil.size
  side = min(w, h)
  box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
  return np.asarray(pil.resize((size, size), Image.BILINEAR, box=box))


def random_resized_crop(pil: Image.Image, size: int, rng: np.random.Generator) -> np.ndarray:
  """A random box of 50-100% of the area and aspect 3/4-4/3, resized to `size`."""
  w, h = pil.size
  for _ in range(10):
    area = w * h * rng.uniform(*_CROP_SCALE)
    ratio = math.exp(rng.uniform(math.log(_CROP_RATIO[0]), math.log(_CROP_RATIO[1])))
    cw, ch = math.sqrt(area * ratio), math.sqrt(area / ratio)
    if cw <= w and ch <= h:
      left, top = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
      return np.asarray(pil.resize((size, size), Image.BILINEAR,
                                   box=(left, top, left + cw, top + ch)))
  return center_resize(pil, size)


def captions_of(example: dict[str, Any]) -> list[str]:
  """Every caption of a source example (sources return `caption` or `captions`)."""
  captions = example.get('captions') or [example.get('caption')]
  if not captions or not all(isinstance(c, str) for c in captions):
    raise ValueError(f'example has no caption: {sorted(example)}')
  return captions


def label_of(example: dict[str, Any], label_key: str) -> np.ndarray:
  """The label of one source example: int32 [] or multi-hot [C]; KeyError naming the key."""
  if label_key not in example:
    raise KeyError(f'data.label_key={label_key!r} is not a field of the training examples '
                   f'(fields: {sorted(k for k in example if k != "image")})')
  label = np.asarray(example[label_key])
  return label.astype(np.int32) if label.ndim == 0 else label.astype(bool)



def decode_image(image: Any, size: int, augment: str = 'resize',
                 rng: np.random.Generator | None = None) -> np.ndarray:
  """uint8 [size, size, 3] from any source's image; `rng` is needed for random crops."""
  if augment not in AUGMENTS:
    raise ValueError(f'data.augment={augment!r}; expected one of {AUGMENTS}')
  if (augment == 'resize' and isinstance(image, np.ndarray) and image.dtype == np.uint8
      and image.shape == (size, size, 3)):
    return image  # the synthetic set is drawn at the right size already
  if augment == 'resize':
    return center_resize(to_pil(image, size), size)
  # Decode big enough that the smallest crop still has `size` pixels a side.
  return random_resized_crop(to_pil(image, math.ceil(size / math.sqrt(_CROP_SCALE[0]))), size,
                             rng)


class DecodeAndAugment(grain.transforms.RandomMap):
  """source example -> {image: uint8 [S, S, 3], caption: one of its captions, at random}
  (and, with `label_key`, `label`: that field of the example, `label_of`).

  With `frames` > 0 the example is a video clip and `image` its `frames` uniformly sampled
  frames, uint8 [frames, S, S, 3] (`vlrep.data.video.decode_frames`), center-resized.
  """

  def __init__(self, image_size: int, augment: str, label_key: str = '', frames: int = 0):
    if augment not in AUGMENTS:
      raise ValueError(f'data.augment={augment!r}; expected one of {AUGMENTS}')
    if frames and augment != 'resize':  # a crop drawn per frame would jitter the clip
      raise ValueError(f"data.augment={augment!r} with data.frames={frames}: video clips are "
                       "only resized (data.augment='resize')")
    self.image_size, self.augment, self.label_key = image_size, augment, label_key
    self.frames = frames

  def random_map(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    captions = captions_of(example)
    caption = captions[rng.integers(len(captions))] if len(captions) > 1 else captions[0]
    if self.frames:
      from vlrep.data import video  # pylint: disable=g-import-not-at-top (it imports this)
      if 'frames' not in example:
        raise TypeError(f'data.frames={self.frames} needs a video source (examples with '
                        f'frames), got an example with {sorted(example)}')
      out = {'image': video.decode_frames(example['frames'], self.frames, self.image_size),
             'caption': caption}
    elif 'image' not in example:
      raise TypeError(f'a video example ({sorted(example)}) needs data.frames > 0')
    else:
      out = {'image': decode_image(example['image'], self.image_size, self.augment, rng),
             'caption': caption}
    if self.label_key:
      out['label'] = label_of(example, self.label_key)
    return out


class Tokenize(grain.transforms.Map):
  """{image, caption} -> {images: uint8 [H, W, 3], tokens: int32 [L] padded to L}."""

  def __init__(self, tokenizer: ByteTokenizer, max_len: int):
    self._tokenizer, self._max_len = tokenizer, max_len

  def map(self, example: dict[str, Any]) -> dict[str, Any]:
    tokens = self._tokenizer.encode([example['caption']], self._max_len)[0]
    out = {'images': example['image'], 'tokens': tokens}
    for key in ('label', 'skipped'):
      if key in example:
        out[key] = example[key]
    return out
