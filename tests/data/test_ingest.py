"""Tests of `vlrep.data.ingest`: CSV, folder, COCO-format and webdataset-tar inputs, and every
broken row."""

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from array_record.python import array_record_module
from PIL import Image

from vlrep.data import ingest, ingest_inputs, records

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _image_bytes(fmt: str = 'PNG', size: tuple[int, int] = (8, 6), seed: int = 0) -> bytes:
  # Noise, so a JPEG is long enough to be cut in the middle of its scan data.
  pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, fmt)
  return buffer.getvalue()


def _write(path, data) -> bytes:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as file:
    file.write(data.encode() if isinstance(data, str) else data)
  return data


def _read(directory) -> list[dict]:
  """Every record of the directory's shards, shard after shard."""
  manifest = json.load(open(os.path.join(directory, 'manifest.json')))
  out = []
  for name in manifest['shards']:
    reader = array_record_module.ArrayRecordReader(os.path.join(directory, name))
    out.extend(records.decode(record) for record in reader.read_all())
    reader.close()
  return out


def _shard_bytes(directory) -> dict[str, bytes]:
  return {name: open(os.path.join(directory, name), 'rb').read()
          for name in sorted(os.listdir(directory))}


def _tar(path, samples) -> None:
  """A shard in img2dataset's layout: `key.jpg`, `key.txt`, `key.json` per sample."""
  with tarfile.open(path, 'w') as tar:
    for name, data in samples:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def test_csv_groups_captions_and_resolves_paths_from_the_csv(tmp_path):
  a = _write(tmp_path / 'data/img/a.png', _image_bytes('PNG', seed=1))
  b = _write(tmp_path / 'data/img/b.jpg', _image_bytes('JPEG', seed=2))
  _write(tmp_path / 'data/pairs.csv',
         'image,caption\nimg/a.png,a red thing\nimg/b.jpg," a blue, thing "\n'
         'img/a.png,another caption\nimg/a.png,a red thing\n')
  manifest = ingest.ingest(str(tmp_path / 'data/pairs.csv'), str(tmp_path / 'out'), workers=1)
  got = _read(tmp_path / 'out')
  assert [r['key'] for r in got] == ['img/a.png', 'img/b.jpg']
  assert got[0]['captions'] == ['a red thing', 'another caption']
  assert got[1]['captions'] == ['a blue, thing']
  assert (got[0]['image'], got[1]['image']) == (a, b)  # original bytes, not re-encoded
  assert manifest == {
      'source': str(tmp_path / 'data/pairs.csv'), 'format': 'csv', 'records': 2,
      'captions': 3, 'skipped': {}, 'dropped_captions': {'duplicate_caption': 1},
      'shards': ['data-00000-of-00001.array_record'], 'created_with': 'vlrep.data.ingest'}


def _coco(root, images, annotations, name='annotations/captions_val2017.json') -> str:
  path = os.path.join(root, name)
  _write(path, json.dumps({'info': {}, 'images': images, 'annotations': annotations}))
  return path


def test_coco_captions_json_in_coco_layout_and_beside_its_images(tmp_path):
  """COCO's own layout (ROOT/annotations/captions_SPLIT.json, images in ROOT/SPLIT/): one
  record per image in the file's order, its captions in annotation order; an image without
  captions and captions of an id with no image are skipped and counted."""
  a, b = _image_bytes(seed=1), _image_bytes('JPEG', seed=2)
  _write(str(tmp_path / 'val2017' / '000000000139.jpg'), b)
  _write(str(tmp_path / 'val2017' / '000000000285.png'), a)
  _write(str(tmp_path / 'val2017' / '000000000632.png'), a)
  path = _coco(tmp_path, [
      {'id': 285, 'file_name': '000000000285.png', 'height': 6, 'width': 8},
      {'id': 139, 'file_name': '000000000139.jpg'},
      {'id': 632, 'file_name': '000000000632.png'}], [
      {'id': 1, 'image_id': 139, 'caption': 'A woman in a kitchen. '},
      {'id': 2, 'image_id': 285, 'caption': 'A big brown bear.'},
      {'id': 3, 'image_id': 139, 'caption': 'A room with a table.'},
      {'id': 4, 'image_id': 999, 'caption': 'No such image.'}])
  assert ingest_inputs.detect_format(path) == 'coco'
  manifest = ingest.ingest(path, str(tmp_path / 'out'), workers=1)
  got = _read(tmp_path / 'out')
  assert [(r['key'], r['captions']) for r in got] == [
      ('000000000285.png', ['A big brown bear.']),
      ('000000000139.jpg', ['A woman in a kitchen.', 'A room with a table.'])]
  assert got[0]['image'] == a and got[1]['image'] == b
  assert manifest['format'] == 'coco' and manifest['records'] == 2
  assert manifest['skipped'] == {'missing_caption': 1, 'missing_image': 1}

  # Any other name or folder: file names are relative to the JSON's directory.
  _write(str(tmp_path / 'flat' / 'x.png'), a)
  flat = _coco(tmp_path / 'flat', [{'id': 'x', 'file_name': 'x.png'}],
               [{'image_id': 'x', 'caption': 'a caption'}], name='mine.json')
  ingest.ingest(flat, str(tmp_path / 'out_flat'), workers=1)
  assert [(r['key'], r['captions']) for r in _read(tmp_path / 'out_flat')] == [
      ('x.png', ['a caption'])]

  # A file that is not COCO's layout names what it lacks.
  with pytest.raises(ValueError, match='"annotations" lists'):
    ingest.ingest(_coco(tmp_path, [], None, name='bad.json'), str(tmp_path / 'o2'))
  with pytest.raises(ValueError, match='has no "file_name"'):
    ingest.ingest(_coco(tmp_path, [{'id': 1}], [], name='bad2.json'), str(tmp_path / 'o3'))


def test_tsv_and_extra_columns(tmp_path):
  _write(tmp_path / 'a.png', _image_bytes())
  _write(tmp_path / 'pairs.tsv', 'id\tcaption\timage\n7\ta cat, sitting\ta.png\n')
  ingest.ingest(str(tmp_path / 'pairs.tsv'), str(tmp_path / 'out'), workers=1)
  assert _read(tmp_path / 'out')[0]['captions'] == ['a cat, sitting']


def test_csv_without_a_caption_column_is_a_usage_error(tmp_path):
  _write(tmp_path / 'pairs.csv', 'image,text\na.png,hello\n')
  with pytest.raises(ValueError, match="'caption'"):
    ingest.ingest(str(tmp_path / 'pairs.csv'), str(tmp_path / 'out'))


def test_folder_with_multiline_captions(tmp_path):
  root = tmp_path / 'photos'
  _write(root / 'b.jpg', _image_bytes('JPEG'))
  _write(root / 'b.txt', 'first caption\n\n  second caption  \r\n')
  _write(root / 'sub/a.png', _image_bytes('PNG'))
  _write(root / 'sub/a.txt', 'nested')
  _write(root / 'c.webp', _image_bytes('WEBP'))  # no caption file
  _write(root / 'd.txt', 'no image')
  _write(root / 'notes.json', '{}')  # neither image nor caption: ignored
  manifest = ingest.ingest(str(root), str(tmp_path / 'out'), workers=1)
  got = _read(tmp_path / 'out')
  assert [(r['key'], r['captions']) for r in got] == [
      ('b.jpg', ['first caption', 'second caption']), ('sub/a.png', ['nested'])]
  assert manifest['format'] == 'folder'
  assert manifest['skipped'] == {'missing_caption': 1, 'missing_image': 1}


def test_webdataset_tars_in_img2dataset_layout(tmp_path):
  shards = tmp_path / 'shards'
  os.makedirs(shards)
  images = {}
  for shard in range(2):
    samples = []
    for i in range(3):
      key = f'{shard:05d}{i:04d}'
      images[key] = _image_bytes('JPEG', seed=shard * 10 + i)
      samples += [(f'{key}.jpg', images[key]), (f'{key}.txt', f'caption {key}'.encode()),
                  (f'{key}.json', json.dumps({'key': key, 'status': 'success'}).encode())]
    if shard == 1:  # a sample whose caption member is missing
      samples += [('000010099.jpg', _image_bytes('JPEG')), ('000010099.json', b'{}')]
    _tar(shards / f'{shard:05d}.tar', samples)
  for pattern in ('*.tar', '{00000..00001}.tar'):
    output = tmp_path / f'out{len(pattern)}'
    manifest = ingest.ingest(str(shards / pattern), str(output), workers=1)
    got = _read(output)
    assert [r['key'] for r in got] == sorted(images)
    assert all(r['image'] == images[r['key']] and r['captions'] == [f"caption {r['key']}"]
               for r in got)
    assert (manifest['format'], manifest['skipped']) == ('tar', {'missing_caption': 1})


def test_corrupt_and_truncated_tar_shards(tmp_path):
  good = [('k1.jpg', _image_bytes('JPEG', seed=1)), ('k1.txt', b'one'),
          ('k2.jpg', _image_bytes('JPEG', (64, 64), seed=2)), ('k2.txt', b'two')]
  _tar(tmp_path / 'a.tar', good)
  data = open(tmp_path / 'a.tar', 'rb').read()
  # Cut inside k2.jpg's data: k1 survives, k2's image member is unreadable.
  cut = data.index(b'k2.jpg') + 512 + 100
  _write(tmp_path / 'b.tar', data[:cut])
  _write(tmp_path / 'c.tar', b'this is not a tar file at all' * 40)
  manifest = ingest.ingest(str(tmp_path / '*.tar'), str(tmp_path / 'out'), workers=1)
  assert [r['key'] for r in _read(tmp_path / 'out')] == ['k1', 'k2', 'k1']
  assert manifest['skipped'] == {'corrupt_tar': 1, 'corrupt_tar_member': 1}


def test_every_broken_row_is_skipped_and_counted(tmp_path):
  jpeg = _image_bytes('JPEG', (64, 64))
  _write(tmp_path / 'good.png', _image_bytes())
  _write(tmp_path / 'empty.jpg', b'')
  _write(tmp_path / 'text.jpg', 'just some text, not an image')
  _write(tmp_path / 'truncated.jpg', jpeg[:len(jpeg) // 2])
  _write(tmp_path / 'huge.png', _image_bytes('PNG', (100, 60)))
  _write(tmp_path / 'other.png', _image_bytes(seed=3))
  _write(tmp_path / 'latin1.png', _image_bytes(seed=4))
  _write(tmp_path / 'netpbm.png', _image_bytes('PPM'))  # decodable, but not a web format
  rows = (b'image,caption\ngood.png,fine\nmissing.png,gone\nempty.jpg,empty\n'
          b'text.jpg,text\ntruncated.jpg,cut\nhuge.png,big\nother.png,  \n'
          b'latin1.png,caf\xe9\ngood.png,\xff\xfe\nnetpbm.png,ppm\n')
  _write(tmp_path / 'pairs.csv', rows)
  manifest = ingest.ingest(str(tmp_path / 'pairs.csv'), str(tmp_path / 'out'), workers=1,
                           max_pixels=5000)
  assert [(r['key'], r['captions']) for r in _read(tmp_path / 'out')] == [('good.png', ['fine'])]
  reasons = {'missing_image': 1, 'empty_image': 1, 'not_an_image': 1, 'truncated_image': 1,
             'image_too_large': 1, 'empty_caption': 1, 'bad_caption_encoding': 1,
             'unsupported_format': 1}
  assert manifest['skipped'] == reasons
  assert manifest['dropped_captions'] == {'bad_caption_encoding': 1}
  line = ingest.summary_line(manifest, 'out')
  assert line.startswith('wrote 1 records (1 captions) to 1 shards in out; skipped 8: ')
  assert all(f'{reason}=1' in line for reason in reasons)


def test_tar_members_over_max_image_bytes_are_not_read(tmp_path):
  small, big = _image_bytes('PNG', (4, 4)), _image_bytes('PNG', (64, 64))
  _tar(tmp_path / 'a.tar', [('a.png', small), ('a.txt', b'a'), ('b.png', big), ('b.txt', b'b'),
                            ('c.txt', b'no image'), ('d.png', small), ('d.txt', b'')])
  manifest = ingest.ingest(str(tmp_path / 'a.tar'), str(tmp_path / 'out'), workers=1,
                           max_image_bytes=len(small) + 1)
  assert [r['key'] for r in _read(tmp_path / 'out')] == ['a']
  assert manifest['skipped'] == {'image_too_large': 1, 'missing_image': 1, 'empty_caption': 1}


def test_broken_caption_files(tmp_path):
  _write(tmp_path / 'in/a.png', _image_bytes())
  _write(tmp_path / 'in/a.txt', 'ok')
  _write(tmp_path / 'in/b.png', _image_bytes())
  _write(tmp_path / 'in/b.txt', b'\n  \n')
  _write(tmp_path / 'in/c.png', _image_bytes())
  _write(tmp_path / 'in/c.txt', b'\xc3\x28 invalid utf-8')
  manifest = ingest.ingest(str(tmp_path / 'in'), str(tmp_path / 'out'), workers=1)
  assert manifest['skipped'] == {'empty_caption': 1, 'bad_caption_encoding': 1}


def test_nothing_valid_is_an_error_and_leaves_no_shards(tmp_path):
  _write(tmp_path / 'pairs.csv', 'image,caption\nmissing.png,x\n')
  with pytest.raises(ingest.NoValidRecordsError, match='missing_image=1'):
    ingest.ingest(str(tmp_path / 'pairs.csv'), str(tmp_path / 'out'), workers=1)
  assert os.listdir(tmp_path / 'out') == []


def test_output_is_stable_and_parallel_matches_serial(tmp_path):
  lines = ['image,caption']
  for i in range(40):
    _write(tmp_path / f'{i}.png', _image_bytes(seed=i) if i % 7 else b'broken')
    lines.append(f'{i}.png,caption {i}')
  _write(tmp_path / 'pairs.csv', '\n'.join(lines) + '\n')
  serial = ingest.ingest(str(tmp_path / 'pairs.csv'), str(tmp_path / 'a'), workers=1)
  parallel = ingest.ingest(str(tmp_path / 'pairs.csv'), str(tmp_path / 'b'), workers=2)
  assert serial == parallel and serial['skipped'] == {'not_an_image': 6}
  assert _shard_bytes(tmp_path / 'a') == _shard_bytes(tmp_path / 'b')


def test_num_shards_deals_records_round_robin(tmp_path):
  for i in range(3):
    _write(tmp_path / f'in/{i}.png', _image_bytes(seed=i))
    _write(tmp_path / f'in/{i}.txt', f'{i}')
  manifest = ingest.ingest(str(tmp_path / 'in'), str(tmp_path / 'out'), num_shards=2,
                           workers=1)
  assert manifest['shards'] == ['data-00000-of-00002.array_record',
                                'data-00001-of-00002.array_record']
  assert [r['key'] for r in _read(tmp_path / 'out')] == ['0.png', '2.png', '1.png']


def test_refuses_a_non_empty_output_unless_overwrite(tmp_path):
  _write(tmp_path / 'in/a.png', _image_bytes())
  _write(tmp_path / 'in/a.txt', 'a')
  _write(tmp_path / 'out/keep.me', 'user file')
  with pytest.raises(FileExistsError, match='--overwrite'):
    ingest.ingest(str(tmp_path / 'in'), str(tmp_path / 'out'))
  ingest.ingest(str(tmp_path / 'in'), str(tmp_path / 'out'), workers=1, overwrite=True)
  ingest.ingest(str(tmp_path / 'in'), str(tmp_path / 'out'), workers=1, overwrite=True)
  assert sorted(os.listdir(tmp_path / 'out')) == [
      'data-00000-of-00001.array_record', 'keep.me', 'manifest.json']


def test_max_side_downscales_to_jpeg(tmp_path):
  _write(tmp_path / 'in/wide.png', _image_bytes('PNG', (64, 32)))
  _write(tmp_path / 'in/wide.txt', 'wide')
  _write(tmp_path / 'in/small.png', small := _image_bytes('PNG', (8, 8)))
  _write(tmp_path / 'in/small.txt', 'small')
  ingest.ingest(str(tmp_path / 'in'), str(tmp_path / 'out'), workers=1, max_side=16)
  small_record, wide_record = _read(tmp_path / 'out')
  assert small_record['image'] == small
  wide = Image.open(io.BytesIO(wide_record['image']))
  assert (wide.format, wide.size) == ('JPEG', (16, 8))


def test_expand_braces():
  assert ingest_inputs.expand_braces('s/{008..010}.tar') == ['s/008.tar', 's/009.tar', 's/010.tar']
  assert ingest_inputs.expand_braces('{a,b}-{1..2}') == ['a-1', 'a-2', 'b-1', 'b-2']
  assert ingest_inputs.expand_braces('x{y}.tar') == ['x{y}.tar']


def test_cli(tmp_path):
  _write(tmp_path / 'a.png', _image_bytes())
  _write(tmp_path / 'pairs.csv', 'image,caption\na.png,hello\nmissing.png,x\n')
  command = [sys.executable, '-m', 'vlrep.data.ingest', f'--input={tmp_path / "pairs.csv"}',
             f'--output={tmp_path / "out"}', '--workers=2']
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == (f'wrote 1 records (1 captions) to 1 shards in '
                                   f'{tmp_path / "out"}; skipped 1: missing_image=1')
  assert 'ingested 1, skipped 1' in result.stderr
  # The same output directory again: refused, with one line and a non-zero status.
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
  assert result.returncode != 0 and '--overwrite' in result.stderr
  assert [r['captions'] for r in _read(tmp_path / 'out')] == [['hello']]


def _img2dataset_shard(folder) -> None:
  """One shard as img2dataset writes it: `00000.tar` (successes only) and `00000.parquet`
  (every row, with its status); one sample's caption is only in the table."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  os.makedirs(folder, exist_ok=True)
  _tar(os.path.join(folder, '00000.tar'), [
      ('000000000.jpg', _image_bytes('JPEG', seed=1)), ('000000000.txt', b'two red circles'),
      ('000000000.json', b'{}'), ('000000002.png', _image_bytes('PNG', seed=2)),
      ('000000002.json', b'{}')])
  pq.write_table(pa.table({
      'key': ['000000000', '000000001', '000000002', '000000003'],
      'caption': ['two red circles', 'never downloaded', 'a blue cross', None],
      'status': ['success', 'failed_to_download', 'success', 'failed_to_resize']}),
      os.path.join(folder, '00000.parquet'))


def test_img2dataset_parquet_and_tar_layout_locally_and_on_a_bucket(tmp_path, bucket):
  from vlrep.runtime import paths  # pylint: disable=g-import-not-at-top
  _img2dataset_shard(tmp_path / 'shards')
  manifest = ingest.ingest(str(tmp_path / 'shards/*.tar'), str(tmp_path / 'out'), workers=1)
  assert manifest['records'] == 2
  assert manifest['skipped'] == {'failed_to_download': 1, 'failed_to_resize': 1}
  assert [r['captions'] for r in _read(tmp_path / 'out')] == [['two red circles'],
                                                               ['a blue cross']]
  for name in ('00000.tar', '00000.parquet'):
    paths.upload(str(tmp_path / 'shards' / name), f'{bucket}/shards/{name}')
  remote = ingest.ingest(f'{bucket}/shards/*.tar', str(tmp_path / 'from_bucket'), workers=1)
  assert {k: v for k, v in remote.items() if k != 'source'} == {
      k: v for k, v in manifest.items() if k != 'source'}
  assert _shard_bytes(tmp_path / 'from_bucket').keys() == _shard_bytes(tmp_path / 'out').keys()
  for name in manifest['shards']:
    assert _shard_bytes(tmp_path / 'from_bucket')[name] == _shard_bytes(tmp_path / 'out')[name]
