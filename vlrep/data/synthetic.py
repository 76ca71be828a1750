"""The embedded image-caption data set: procedurally drawn shapes with compositional captions.

Example `i` of a split is drawn from a random generator seeded by (split, i) alone, so it is
the same on every machine and at any resolution, needs no download, and the `test` split
never shares an example with `train`. An image holds one or two groups of objects; a group
has one shape, colour, size and count ("two small red circles and one large blue square").
Training captions sometimes name only some attributes ("red shapes and a blue shape",
"circles and a square"), as web alt-text does; this is what lets zero-shot prompts that name a
single attribute make sense. Held-out examples carry the full caption; every example carries
multi-hot attribute labels (zero-shot evaluation; classification fine-tuning reads the
training split's, `data.label_key`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

COLOURS = {
    'red': (220, 45, 45), 'green': (45, 190, 70), 'blue': (55, 95, 235),
    'yellow': (235, 215, 45), 'purple': (160, 70, 210), 'white': (235, 235, 235),
}
SHAPES = ('circle', 'square', 'triangle', 'cross')
PLURALS = {'circle': 'circles', 'square': 'squares', 'triangle': 'triangles',
           'cross': 'crosses', 'shape': 'shapes'}
SIZES = {'small': 0.09, 'large': 0.15}  # radius as a fraction of the image side
COUNTS = ('one', 'two', 'three')
SPLIT_SIZES = {'train': 10_000_000, 'test': 10_000}
_SPLIT_IDS = {'train': 0, 'test': 1}
_SUPERSAMPLE = 2  # draws at 2x and averages, so edges are anti-aliased
_FULL_CAPTION_PROB = 0.75

# Zero-shot tasks on this data: class names x templates; each prompt names one attribute.
ZERO_SHOT_TASKS = {
    'colour': (tuple(COLOURS), ('{} shapes', 'a {} shape')),
    'shape': (SHAPES, ('a {}', '{}')),
    'count': (('one shape', 'two shapes', 'three shapes'), ('{}',)),
}


def _group_phrase(group: dict[str, Any], count: bool, size: bool, colour: bool,
                  shape: bool) -> str:
  n = group['count']
  noun = group['shape'] if shape else 'shape'
  words = [COUNTS[n - 1]] if count else ([] if n > 1 else ['a'])
  words += [group['size']] if size else []
  words += [group['colour']] if colour else []
  words.append(PLURALS[noun] if n > 1 else noun)
  return ' '.join(words)


def caption(groups: list[dict[str, Any]], count: bool = True, size: bool = True,
            colour: bool = True, shape: bool = True) -> str:
  """The caption naming the chosen attributes of every group, joined by 'and'."""
  return ' and '.join(_group_phrase(g, count, size, colour, shape) for g in groups)


def _inside(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
  """Boolean mask of the points (dx, dy) from the centre that lie inside the shape."""
  if shape == 'circle':
    return dx**2 + dy**2 <= r**2
  if shape == 'square':  # side chosen so its area is close to the circle's
    return (np.abs(dx) <= 0.88 * r) & (np.abs(dy) <= 0.88 * r)
  if shape == 'triangle':  # pointing up, apex at -r, base at +0.8r
    depth = (dy + r) / (1.8 * r)
    return (dy <= 0.8 * r) & (depth >= 0) & (np.abs(dx) <= depth * 1.1 * r)
  if shape == 'cross':
    arm = r / 2.8
    return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
  raise ValueError(shape)


def _sample_groups(rng: np.random.Generator) -> list[dict[str, Any]]:
  num_groups = 1 + int(rng.random() < 0.5)
  groups, used = [], set()
  while len(groups) < num_groups:
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    if (shape, colour) in used:
      continue
    used.add((shape, colour))
    size = 'small' if rng.random() < 0.5 else 'large'
    groups.append(dict(shape=shape, colour=colour, size=size,
                       count=int(rng.integers(1, len(COUNTS) + 1))))
  return groups


def _place(rng: np.random.Generator, radii: list[float]) -> list[tuple[float, float]] | None:
  """Centres (x, y) in [0, 1] for non-overlapping objects, or None if they did not fit."""
  centres: list[tuple[float, float]] = []
  for r in radii:
    for _ in range(200):
      x, y = rng.uniform(r + 0.02, 1 - r - 0.02, size=2)
      if all((x - cx)**2 + (y - cy)**2 > (r + cr + 0.03)**2
             for (cx, cy), cr in zip(centres, radii)):
        centres.append((x, y))
        break
    else:
      return None
  return centres


def render(groups: list[dict[str, Any]], rng: np.random.Generator, image_size: int) -> np.ndarray:
  """Draws the groups onto a noisy dark background; returns uint8 [H, W, 3]."""
  while True:
    radii = [SIZES[g['size']] * rng.uniform(0.9, 1.1) for g in groups for _ in range(g['count'])]
    centres = _place(rng, radii)
    if centres is not None:
      break
  background = rng.uniform(15, 60, size=3)
  colours = [np.clip(np.asarray(COLOURS[g['colour']], np.float32) + rng.uniform(-18, 18, size=3),
                     0, 255) for g in groups for _ in range(g['count'])]
  shapes = [g['shape'] for g in groups for _ in range(g['count'])]
  return draw(centres, radii, colours, shapes, background, rng, image_size)


def draw(centres: list[tuple[float, float]], radii: list[float], colours: list[np.ndarray],
         shapes: list[str], background: np.ndarray, rng: np.random.Generator,
         image_size: int) -> np.ndarray:
  """Objects (centre and radius in [0, 1], RGB colour, shape) on a flat background plus
  pixel noise from `rng`; uint8 [H, W, 3]. The moving-shapes video set draws its frames so."""
  side = image_size * _SUPERSAMPLE
  canvas = np.broadcast_to(background, (side, side, 3)).astype(np.float32)
  coords = (np.arange(side, dtype=np.float32) + 0.5) / side
  for (cx, cy), r, colour, shape in zip(centres, radii, colours, shapes):
    lo_x, hi_x = np.searchsorted(coords, [cx - r, cx + r])
    lo_y, hi_y = np.searchsorted(coords, [cy - r, cy + r])
    dx = coords[lo_x:hi_x][None, :] - cx
    dy = coords[lo_y:hi_y][:, None] - cy
    canvas[lo_y:hi_y, lo_x:hi_x][_inside(shape, dx, dy, r)] = colour
  # Box-filter down to image_size with strided adds rather than a reshape and .mean(): the
  # renderer is on the demo's input path, and this is the cheaper of the two
  # (benchmarks/RESULTS.md, "Input speed").
  image = sum(canvas[dy::_SUPERSAMPLE, dx::_SUPERSAMPLE]
              for dy in range(_SUPERSAMPLE) for dx in range(_SUPERSAMPLE)) / _SUPERSAMPLE**2
  image += rng.normal(0, 4, size=image.shape).astype(np.float32)
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def multi_hot_labels(groups: list[dict[str, Any]]) -> dict[str, np.ndarray]:
  """For each zero-shot task, which of its classes the image shows (a group may match)."""
  present = {
      'colour': {g['colour'] for g in groups},
      'shape': {g['shape'] for g in groups},
      'count': {ZERO_SHOT_TASKS['count'][0][g['count'] - 1] for g in groups},
  }
  return {task: np.array([name in present[task] for name in names], bool)
          for task, (names, _) in ZERO_SHOT_TASKS.items()}


class SyntheticShapes:
  """Random-access source (grain's `RandomAccessDataSource` protocol) of one split.

  Returns dicts with `image` (uint8 [S, S, 3]), `caption` (str) and `labels/<task>`
  multi-hot arrays (drawn from no random numbers: images and captions are as they were
  before the training split had labels). Training captions mix full and partial descriptions;
  test captions are always full.
  """

  zero_shot_tasks = ZERO_SHOT_TASKS

  def __init__(self, split: str = 'train', image_size: int = 64):
    if split not in SPLIT_SIZES:
      raise ValueError(f'Unknown synthetic split {split!r}; known: {sorted(SPLIT_SIZES)}')
    self.split, self.image_size = split, image_size

  def __len__(self) -> int:
    return SPLIT_SIZES[self.split]

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < len(self):
      raise IndexError(index)
    rng = np.random.default_rng([_SPLIT_IDS[self.split], int(index)])
    groups = _sample_groups(rng)
    image = render(groups, rng, self.image_size)
    if self.split == 'train' and rng.random() >= _FULL_CAPTION_PROB:
      text = caption(groups, *(rng.random(4) < 0.5))
    else:
      text = caption(groups)
    return {'image': image, 'caption': text,
            **{f'labels/{k}': v for k, v in multi_hot_labels(groups).items()}}

  def __repr__(self) -> str:
    return f'SyntheticShapes(split={self.split!r}, image_size={self.image_size})'
