"""The Beam ingest (`--runner=DirectRunner`) writes exactly the local ingest's bytes: shards
and manifest, to a local folder or a bucket, from CSV rows with broken ones and from tar
shards read off a bucket.

Beam pins pillow < 13 and protobuf < 7, so these tests run in their own environment
(`.[beam]`, `.ci/run`'s second step); elsewhere they are skipped.
"""

import os
import subprocess
import sys

import pytest

beam = pytest.importorskip('apache_beam')

from conftest import REPO  # pylint: disable=g-import-not-at-top,wrong-import-position
from test_ingest import _image_bytes, _shard_bytes, _tar, _write  # pylint: disable=all
from vlrep.data import ingest, ingest_beam, ingest_output  # pylint: disable=wrong-import-position
from vlrep.runtime import paths  # pylint: disable=wrong-import-position

pytestmark = pytest.mark.beam
DIRECT = ['--runner=DirectRunner']


def _csv_input(root) -> str:
  """40 rows: valid PNG/JPEG images (some repeated with another caption) and broken rows."""
  lines = ['image,caption']
  for i in range(36):
    _write(root / f'img/{i}.png', _image_bytes('PNG' if i % 3 else 'JPEG', seed=i))
    lines.append(f'img/{i}.png,caption {i}')
    if i % 5 == 0:
      lines.append(f'img/{i}.png,"another caption of {i}"')
  _write(root / 'img/empty.png', b'')
  _write(root / 'img/cut.png', _image_bytes('PNG', seed=99)[:40])
  lines += ['img/empty.png,empty', 'img/cut.png,cut', 'img/missing.png,missing',
            'img/3.png,', 'img/4.png,caption 4']
  _write(root / 'pairs.csv', '\n'.join(lines) + '\n')
  return str(root / 'pairs.csv')


def _bucket_bytes(directory) -> dict:
  out = {}
  for name in paths.listdir(directory):
    with paths.open_file(paths.join(directory, name), 'rb') as f:
      out[name] = f.read()
  return out


@pytest.mark.parametrize('num_shards, per_shard', [(3, None), (None, 7)])
def test_beam_writes_the_local_ingest_bytes(tmp_path, monkeypatch, num_shards, per_shard):
  if per_shard:  # several shards of contiguous runs, and several rank blocks
    monkeypatch.setattr(ingest_output, 'RECORDS_PER_SHARD', per_shard)
  monkeypatch.setattr(ingest_beam, 'BLOCK', 4)
  pairs = _csv_input(tmp_path / 'in')
  local = ingest.ingest(pairs, str(tmp_path / 'local'), num_shards=num_shards, workers=1)
  beamed = ingest_beam.ingest_beam(pairs, str(tmp_path / 'beam'), num_shards=num_shards,
                                   pipeline_args=DIRECT)
  assert beamed == local and local['skipped'] and local['records'] == 36
  assert len(local['shards']) == (3 if num_shards else 6)
  assert _shard_bytes(tmp_path / 'beam') == _shard_bytes(tmp_path / 'local')


def test_beam_reads_tars_on_a_bucket_and_writes_to_a_bucket(tmp_path, bucket):
  shards = tmp_path / 'tars'
  shards.mkdir()
  for shard in range(3):
    samples = []
    for i in range(5):
      key = f'{shard:05d}{i:04d}'
      samples += [(f'{key}.jpg', _image_bytes('JPEG', seed=10 * shard + i)),
                  (f'{key}.txt', f'caption {shard} {i}'.encode()), (f'{key}.json', b'{}')]
    samples.append(('000009999.txt', b'a caption without its image'))
    _tar(shards / f'{shard:05d}.tar', samples)
    paths.upload(str(shards / f'{shard:05d}.tar'), f'{bucket}/tars/{shard:05d}.tar')
  local = ingest.ingest(str(shards / '*.tar'), str(tmp_path / 'local'), num_shards=2, workers=1)
  beamed = ingest_beam.ingest_beam(f'{bucket}/tars/{{00000..00002}}.tar', f'{bucket}/out',
                                   num_shards=2, pipeline_args=DIRECT)
  assert {k: v for k, v in beamed.items() if k != 'source'} == {
      k: v for k, v in local.items() if k != 'source'}
  assert local['records'] == 15 and local['skipped'] == {'missing_image': 3}
  written = _bucket_bytes(f'{bucket}/out')
  expected = _shard_bytes(tmp_path / 'local')
  assert written.keys() == expected.keys()
  assert all(written[name] == expected[name] for name in local['shards'])


def test_command_line_runner_flag(tmp_path):
  pairs = _csv_input(tmp_path / 'in')
  out = subprocess.run([sys.executable, '-m', 'vlrep.data.ingest', f'--input={pairs}',
                        f'--output={tmp_path / "out"}', '--num_shards=2', *DIRECT,
                        '--direct_num_workers=1'],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.startswith('wrote 36 records (')
  ingest.ingest(pairs, str(tmp_path / 'local'), num_shards=2, workers=1)
  assert _shard_bytes(tmp_path / 'out') == _shard_bytes(tmp_path / 'local')


def test_ranks_follow_input_positions_whatever_order_records_arrive_in(monkeypatch):
  """The DirectRunner happens to keep input order; other runners do not, so ranking and
  shard writing sort by position themselves."""
  counts = [((0, 0), 3), ((0, 1), 2), ((1, 0), 4)]  # valid records per block
  offsets = ingest_beam._offsets(counts[::-1])
  assert offsets == {(0, 0): 0, (0, 1): 3, (1, 0): 5, (): 9}
  monkeypatch.setattr(ingest_beam, 'BLOCK', 4)
  shuffled = [((0, 7), b'e'), ((0, 5), b'd')]  # tar 0, members 7 and 5: block (0, 1)
  assert {ingest_beam._block(p) for p, _ in shuffled} == {(0, 1)}
  ranked = list(ingest_beam._ranked(((0, 1), shuffled), offsets, 2))
  assert ranked == [(1, (3, b'd')), (0, (4, b'e'))]
  assert ingest_beam.shard_count(9, 2) == 2 and ingest_beam.shard_count(1, 2) == 1
