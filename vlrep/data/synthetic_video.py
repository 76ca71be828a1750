"""The embedded video-caption data set: one shape of one colour moving left, right, up or down,
or standing still, over a clip of frames ("a red circle moving left").

Drawn with the image set's shapes, colours and renderer (`vlrep.data.synthetic.draw`). Example
`i` of a split comes from a generator seeded by (split, i) alone, as in the image set, so it
is the same everywhere, at any resolution. Every frame of a clip has the same background,
shape, size and colour; only the position changes, by the same step each frame. The image
wraps around like a torus, so the shape's position in any one frame is uniform over the image
whatever its motion: a single frame carries no information about motion at all, which is
read from several frames or not at all. The shape moves `_TRAVEL` of the image side over the
clip. Examples are
{'frames': uint8 [FRAMES, S, S, 3], 'caption': str, 'labels/motion', 'labels/moving',
'labels/colour', 'labels/shape': int class indices into `ZERO_SHOT_TASKS`}.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vlrep.data import synthetic

MOTIONS = {'moving left': (-1, 0), 'moving right': (1, 0), 'moving up': (0, -1),
           'moving down': (0, 1), 'standing still': (0, 0)}
FRAMES = 8  # frames stored per clip; evaluations sample T of them uniformly
SPLIT_SIZES = {'train': 10_000_000, 'test': 10_000}
_SPLIT_IDS = {'train': 2, 'test': 3}  # not the image set's, so no clip repeats its images
_RADIUS = 0.13  # of the image side, +-10%
_TRAVEL = 0.45  # distance covered from the first frame to the last

ZERO_SHOT_TASKS = {
    'motion': (tuple(MOTIONS), ('a shape {}', '{}')),
    'moving': (('moving', 'standing still'), ('a shape {}', '{}')),
    'colour': (tuple(synthetic.COLOURS), ('a {} shape',)),
    'shape': (synthetic.SHAPES, ('a {}',)),
}


def _clip(rng: np.random.Generator, image_size: int,
          frames: int) -> tuple[np.ndarray, dict[str, str]]:
  colour = list(synthetic.COLOURS)[rng.integers(len(synthetic.COLOURS))]
  shape = synthetic.SHAPES[rng.integers(len(synthetic.SHAPES))]
  motion = list(MOTIONS)[rng.integers(len(MOTIONS))]
  r = _RADIUS * rng.uniform(0.9, 1.1)
  step = np.asarray(MOTIONS[motion], np.float64) * _TRAVEL / max(frames - 1, 1)
  start = rng.uniform(0, 1, size=2)
  background = rng.uniform(15, 60, size=3)
  rgb = np.clip(np.asarray(synthetic.COLOURS[colour], np.float32) + rng.uniform(-18, 18, 3),
                0, 255)
  # The image wraps around (a shape leaving at one edge enters at the other): every frame's
  # position is uniform over the image, for a moving shape as for a still one.
  wraps = [(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1)]
  clip = []
  for t in range(frames):
    x, y = (start + step * t) % 1
    clip.append(synthetic.draw([(x + dx, y + dy) for dx, dy in wraps], [r] * 9, [rgb] * 9,
                               [shape] * 9, background, rng, image_size))
  return np.stack(clip), {'colour': colour, 'shape': shape, 'motion': motion}


def caption(attributes: dict[str, str]) -> str:
  """'a red circle moving left', 'a blue cross standing still'."""
  return f"a {attributes['colour']} {attributes['shape']} {attributes['motion']}"


def labels(attributes: dict[str, str]) -> dict[str, np.ndarray]:
  """int32 class indices of every zero-shot task."""
  moving = 'standing still' if attributes['motion'] == 'standing still' else 'moving'
  values = {**attributes, 'moving': moving}
  return {f'labels/{task}': np.int32(names.index(values[task]))
          for task, (names, _) in ZERO_SHOT_TASKS.items()}


class SyntheticMotion:
  """Random-access source (grain's protocol) of one split: `synthetic_video[:train|test]`."""

  zero_shot_tasks = ZERO_SHOT_TASKS

  def __init__(self, split: str = 'train', image_size: int = 64, frames: int = FRAMES):
    if split not in SPLIT_SIZES:
      raise ValueError(f'Unknown synthetic_video split {split!r}; known: {sorted(SPLIT_SIZES)}')
    self.split, self.image_size, self.frames = split, image_size, frames

  def __len__(self) -> int:
    return SPLIT_SIZES[self.split]

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < len(self):
      raise IndexError(index)
    rng = np.random.default_rng([_SPLIT_IDS[self.split], int(index)])
    video, attributes = _clip(rng, self.image_size, self.frames)
    return {'frames': video, 'caption': caption(attributes), **labels(attributes)}

  def __repr__(self) -> str:
    return f'SyntheticMotion(split={self.split!r}, image_size={self.image_size})'
