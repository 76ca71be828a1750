"""Video data: the moving-shapes set, uniform frame sampling, video records, `ingest --video`
of frame folders and video files (PyAV), read back as T sampled frames."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, load_config, shrink
from vlrep.data import ingest, ingest_video, records, sources, synthetic_video, video


def _centre(frame: np.ndarray) -> np.ndarray:
  """(x, y) of the bright pixels (the shape on its dark background) as angles on the
  wrapped-around image: their circular means."""
  ys, xs = np.nonzero(frame.max(axis=-1) > 100)
  angle = lambda v: np.angle(np.mean(np.exp(2j * np.pi * (v + 0.5) / frame.shape[0])))
  return np.array([angle(xs), angle(ys)])


def test_moving_shapes_are_deterministic_and_move_as_captioned():
  test = synthetic_video.SyntheticMotion('test', 32)
  again = synthetic_video.SyntheticMotion('test', 32)
  seen = set()
  for i in range(30):
    example = test[i]
    np.testing.assert_array_equal(example['frames'], again[i]['frames'])
    assert example['frames'].shape == (synthetic_video.FRAMES, 32, 32, 3)
    motion_names = synthetic_video.ZERO_SHOT_TASKS['motion'][0]
    motion = motion_names[example['labels/motion']]
    colour = synthetic_video.ZERO_SHOT_TASKS['colour'][0][example['labels/colour']]
    shape = synthetic_video.ZERO_SHOT_TASKS['shape'][0][example['labels/shape']]
    assert example['caption'] == f'a {colour} {shape} {motion}'
    assert example['labels/moving'] == (motion == 'standing still')
    path = np.stack([_centre(f) for f in example['frames']])
    # Each step in image sides (+x right, +y down), wrapped into [-1/2, 1/2).
    steps = (np.diff(path, axis=0) / (2 * np.pi) + 0.5) % 1 - 0.5
    want = np.array(synthetic_video.MOTIONS[motion]) * synthetic_video._TRAVEL / (
        synthetic_video.FRAMES - 1)
    np.testing.assert_allclose(steps, np.broadcast_to(want, steps.shape), atol=0.02,
                               err_msg=example['caption'])
    seen.add(motion)
  assert seen == set(synthetic_video.MOTIONS)
  assert not np.array_equal(synthetic_video.SyntheticMotion('train', 32)[0]['frames'],
                            test[0]['frames'])
  assert isinstance(sources.make_source('synthetic_video:test', 16), synthetic_video.SyntheticMotion)


def test_frames_are_sampled_uniformly():
  np.testing.assert_array_equal(video.sample_indices(8, 4), [1, 3, 5, 7])
  np.testing.assert_array_equal(video.sample_indices(10, 4), [1, 3, 6, 8])
  np.testing.assert_array_equal(video.sample_indices(3, 5), [0, 0, 1, 2, 2])  # repeats
  np.testing.assert_array_equal(video.sample_indices(5, 1), [2])
  with pytest.raises(ValueError, match='cannot sample'):
    video.sample_indices(0, 2)


def test_video_records_round_trip_and_corrupt_ones_are_refused():
  value = records.decode(records.encode_video('k', [b'a', b'bc'], ['a cap']))
  assert value == {'key': 'k', 'frames': [b'a', b'bc'], 'captions': ['a cap']}
  with pytest.raises(ValueError, match='no frames'):
    records.encode_video('k', [], ['a cap'])
  import msgpack
  for bad in ({'key': 'k', 'frames': [], 'captions': ['c']},
              {'key': 'k', 'frames': ['not bytes'], 'captions': ['c']}):
    with pytest.raises(ValueError, match='corrupt record'):
      records.decode(msgpack.packb(bad, use_bin_type=True))


def _write_mp4(path: str, levels: list[int], side: int = 32) -> None:
  """A video file whose frame i is flat grey `levels[i]` (FFmpeg's mpeg4 encoder)."""
  import av
  with av.open(path, 'w') as container:
    stream = container.add_stream('mpeg4', rate=10)
    stream.width = stream.height = side
    stream.pix_fmt = 'yuv420p'
    for level in levels:
      frame = av.VideoFrame.from_ndarray(np.full((side, side, 3), level, np.uint8), 'rgb24')
      for packet in stream.encode(frame):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def _clips(root) -> None:
  """A frame folder (6 PNG frames, frame i flat grey 20 * i), an mp4 (10 frames, grey 25 * i),
  and broken clips: garbage named .mp4, an empty folder, a clip without caption, a caption
  without clip."""
  os.makedirs(root / 'a_frames')
  for i in range(6):
    Image.fromarray(np.full((24, 24, 3), 20 * i, np.uint8)).save(root / 'a_frames' / f'{i:03d}.png')
  (root / 'a_frames.txt').write_text('a grey fade\n')
  _write_mp4(str(root / 'b_video.mp4'), [25 * i for i in range(10)])
  (root / 'b_video.txt').write_text('a brighter fade\nanother caption\n')
  (root / 'c_broken.mp4').write_bytes(b'\x00\x00\x00\x18ftypmp42 this is no video')
  (root / 'c_broken.txt').write_text('broken\n')
  os.makedirs(root / 'd_empty')
  (root / 'd_empty.txt').write_text('nothing\n')
  _write_mp4(str(root / 'e_uncaptioned.mp4'), [0, 100])
  (root / 'f_orphan.txt').write_text('no clip\n')


def test_ingest_video_cli_writes_records_read_back_as_uniform_frames(tmp_path):
  _clips(tmp_path / 'clips')
  out = tmp_path / 'records'
  run = subprocess.run(
      [sys.executable, '-m', 'vlrep.data.ingest', '--video', f'--input={tmp_path / "clips"}',
       f'--output={out}', '--max_frames=4'],
      cwd=REPO, capture_output=True, text=True, env={**os.environ, 'PYTHONPATH': REPO})
  assert run.returncode == 0, run.stderr
  manifest = json.loads((out / 'manifest.json').read_text())
  assert manifest['records'] == 2 and manifest['captions'] == 3
  assert manifest['skipped'] == {'missing_caption': 1, 'missing_clip': 1, 'no_frames': 1,
                                 'unreadable_video': 1}
  assert 'skipped 4' in run.stdout
  source = sources.make_source(f'arrayrecord:{out}', 16)
  assert [source[i]['key'] for i in range(2)] == ['a_frames', 'b_video.mp4']
  # Stored: 4 of each clip's frames, spread uniformly (folder 0, 2, 3, 5; video 1, 3, 6, 8).
  assert [len(source[i]['frames']) for i in range(2)] == [4, 4]
  config = shrink(load_config('coca'))
  got = video.video_examples(config, f'arrayrecord:{out}', 0, 0, frames=2)
  assert got['videos'].shape == (2, 2, 16, 16, 3)
  assert got['references'] == [['a grey fade'], ['a brighter fade', 'another caption']]
  # Read: 2 of the 4 stored frames, the 2nd and 4th: folder frames 2 and 5, video 3 and 8.
  levels = got['videos'].reshape(2, 2, -1).mean(-1)
  np.testing.assert_array_equal(levels[0], [40, 100])  # PNG: lossless
  np.testing.assert_allclose(levels[1], [75, 200], atol=4)  # mpeg4: lossy


def test_ingest_video_errors(tmp_path):
  os.makedirs(tmp_path / 'clips')
  (tmp_path / 'clips' / 'x.txt').write_text('orphan\n')
  with pytest.raises(ingest.NoValidRecordsError, match='missing_clip=1'):
    ingest_video.ingest_video(str(tmp_path / 'clips'), str(tmp_path / 'out'))
  with pytest.raises(ValueError, match='folder of clips'):
    ingest_video.ingest_video(str(tmp_path / 'clips' / 'x.txt'), str(tmp_path / 'out2'))
  config = shrink(load_config('coca'))
  with pytest.raises(TypeError, match='holds images, not videos'):
    video.video_examples(config, 'synthetic:test', 2, 0, frames=2)
