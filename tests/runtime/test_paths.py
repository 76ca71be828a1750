"""vlrep.runtime.paths: local paths as plain files, gs:// through a loopback GCS server, every other
scheme refused by name; and the object-store traps each workaround exists for."""

import json
import os
import time
import warnings

import pytest

from vlrep.runtime import paths


@pytest.mark.parametrize('path', ['s3://bkt/run', 'http://host/x', 'hdfs://nn/data', 'GS://b'])
def test_other_schemes_are_refused_by_name(path):
  with pytest.raises(paths.UnsupportedPathError, match=f'{path.split(":")[0]}:// paths are not'):
    paths.check(path)
  with pytest.raises(paths.UnsupportedPathError):
    paths.exists(path)


def test_local_paths_are_plain_files(tmp_path):
  folder = str(tmp_path / 'a')
  assert not paths.is_remote(folder) and paths.absolute('x') == os.path.abspath('x')
  paths.makedirs(folder)
  paths.write_text(paths.join(folder, 'f.json'), '{"a": 1}')
  assert json.load(open(os.path.join(folder, 'f.json'))) == {'a': 1}
  assert paths.listdir(folder) == ['f.json']  # no leftover partial file
  assert paths.glob(paths.join(folder, '*.json')) == [os.path.join(folder, 'f.json')]
  mirror = paths.Mirror(folder)
  assert mirror.folder == folder  # written in place, as before


def test_gs_files_round_trip(bucket, tmp_path):
  run = f'{bucket}/run'
  assert paths.is_remote(run) and paths.absolute(run + '/') == run
  assert paths.listdir(run) == [] and not paths.exists(run)
  paths.write_text(f'{run}/config.json', 'x' * 10)
  paths.write_text(f'{run}/sub/a.array_record', 'a')
  paths.write_text(f'{run}/sub/b.array_record', 'b')
  assert paths.read_text(f'{run}/config.json') == 'x' * 10
  assert paths.isdir(run) and paths.isfile(f'{run}/config.json')
  assert paths.listdir(run) == ['config.json', 'sub']
  assert paths.glob(f'{run}/*/*.array_record') == [f'{run}/sub/a.array_record',
                                                    f'{run}/sub/b.array_record']
  with paths.writing_locally(f'{run}/big.bin') as local:
    assert not local.startswith('gs:')
    open(local, 'wb').write(os.urandom(1000))
  with paths.reading_locally(f'{run}/big.bin') as local:
    assert os.path.getsize(local) == 1000
  paths.rmtree(f'{run}/sub')
  assert paths.listdir(run) == ['big.bin', 'config.json']


def test_gcsfs_append_overwrites_so_the_mirror_rewrites(bucket):
  """The trap: gcsfs's 'a' mode warns and replaces the object. Mirror keeps every line."""
  import gcsfs  # pylint: disable=g-import-not-at-top
  fs = gcsfs.GCSFileSystem()
  path = f'{bucket}/trap.txt'
  with fs.open(path, 'w') as f:
    f.write('first\n')
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    with fs.open(path, 'a') as f:
      f.write('second\n')
  assert fs.cat(path) == b'second\n'  # the first line is gone
  with pytest.raises(ValueError, match='no append mode'):
    paths.open_file(path, 'a')

  run = f'{bucket}/run'
  for lines in (['1', '2'], ['3']):  # two runs of the same workdir (a resume)
    mirror = paths.Mirror(run, interval_s=3600)
    with open(mirror.fetch('metrics.jsonl'), 'a') as f:
      for line in lines:
        f.write(line + '\n')
        f.flush()
        mirror.sync()  # the first sync uploads; later ones wait for interval_s ...
    assert paths.read_text(f'{run}/metrics.jsonl').endswith(lines[0] + '\n')
    mirror.close()  # ... and close uploads what is pending
    assert not os.path.exists(mirror.folder)
  assert paths.read_text(f'{run}/metrics.jsonl') == '1\n2\n3\n'

  mirror = paths.Mirror(f'{bucket}/timed', interval_s=0.5)
  with open(mirror.fetch('log'), 'a') as f:
    for line in ('a', 'b'):
      f.write(line + '\n')
      f.flush()
      mirror.sync()
  assert paths.read_text(f'{bucket}/timed/log') == 'a\n'  # 'b' waits for the interval ...
  time.sleep(1.5)
  assert paths.read_text(f'{bucket}/timed/log') == 'a\nb\n'  # ... then goes up by itself
  mirror.close()


def test_array_record_traps(bucket, tmp_path):
  """ArrayRecordWriter cannot write gs:// (hence writing_locally); the reader reads gs://."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  with pytest.raises(RuntimeError, match='Failed to create the file header'):
    writer = array_record_module.ArrayRecordWriter(f'{bucket}/x.array_record', 'group_size:1')
    writer.write(b'record')
    writer.close()
  with paths.writing_locally(f'{bucket}/x.array_record') as local:
    writer = array_record_module.ArrayRecordWriter(local, 'group_size:1')
    for i in range(3):
      writer.write(b'record %d' % i)
    writer.close()
  reader = array_record_module.ArrayRecordReader(f'{bucket}/x.array_record')
  assert reader.num_records() == 3 and reader.read([2]) == [b'record 2']


def test_every_entry_point_refuses_other_schemes(config, tmp_path):
  import vlrep  # pylint: disable=g-import-not-at-top
  from vlrep import train  # pylint: disable=g-import-not-at-top
  from vlrep.data import ingest, sources  # pylint: disable=g-import-not-at-top
  with pytest.raises(train.ConfigError, match='s3:// paths are not supported'):
    train.train_and_evaluate(config, 's3://bkt/run')
  config.data.train = 'arrayrecord:s3://bkt/data'
  with pytest.raises(train.ConfigError, match='s3:// paths are not supported'):
    train.train_and_evaluate(config, str(tmp_path))
  with pytest.raises(paths.UnsupportedPathError, match='http://'):
    sources.make_source('arrayrecord:http://host/data', 16)
  with pytest.raises(paths.UnsupportedPathError, match='s3://'):
    vlrep.load('s3://bkt/export')
  (tmp_path / 'in').mkdir()
  with pytest.raises(paths.UnsupportedPathError, match='s3://'):
    ingest.ingest(str(tmp_path / 'in'), 's3://bkt/data')
  assert not os.path.exists('s3:')  # never rewritten to a local folder


def test_listings_see_what_other_clients_wrote(bucket, gcs_server):
  """gcsfs caches listings; a path listed once must still show objects written since by
  another process or host (here: a plain upload through the server's JSON API)."""
  import urllib.request  # pylint: disable=g-import-not-at-top
  paths.write_text(f'{bucket}/ckpt/2/commit_success.txt', 'ok')
  assert paths.listdir(f'{bucket}/ckpt') == ['2'] and not paths.exists(f'{bucket}/ckpt/4')
  name = bucket[len('gs://'):]
  request = urllib.request.Request(
      f'{gcs_server.url}/upload/storage/v1/b/{name}/o?uploadType=media&name=ckpt/4/x',
      data=b'x', method='POST', headers={'Content-Type': 'application/octet-stream'})
  urllib.request.urlopen(request, timeout=10).close()
  assert paths.listdir(f'{bucket}/ckpt') == ['2', '4'] and paths.exists(f'{bucket}/ckpt/4/x')
