"""MetricWriter on a gs:// workdir: metrics.jsonl keeps every line across writers (a resumed
run), TensorBoard events land in the bucket, and tensorboardX's own GCS writer (which uploads
again from `__del__` at interpreter exit) is never used; writing imports no torch."""

import json
import os
import subprocess
import sys
import time

import pytest

from vlrep.runtime import paths
from vlrep.runtime.metrics import MetricWriter


def test_metrics_and_events_on_a_bucket(bucket, monkeypatch):
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top

  def refuse(*args, **kwargs):
    raise AssertionError("tensorboardX's GCS writer was used")
  monkeypatch.setattr(record_writer.GCSRecordWriter, '__init__', refuse)
  workdir = f'{bucket}/run'
  for steps in ((1, 2), (3,)):  # a run, then its resumption
    writer = MetricWriter(workdir)
    for step in steps:
      writer.write(step, {'train/loss': 1.0 / step, 'retrieval/i2t_r@1': 0.5})
    writer.close()
    time.sleep(1.1)  # event files are named by the second they were opened in
  lines = [json.loads(line) for line in paths.read_text(f'{workdir}/metrics.jsonl').splitlines()]
  assert [r['step'] for r in lines] == [1, 2, 3]
  assert lines[2]['train/loss'] == pytest.approx(1 / 3)
  events = paths.listdir(f'{workdir}/tensorboard')
  assert len(events) == 2 and all(e.startswith('events.out.tfevents') for e in events)
  with paths.open_file(f'{workdir}/tensorboard/{events[0]}', 'rb') as f:
    assert b'retrieval/i2t_r_1' in f.read()


def test_writing_imports_no_torch_and_leaves_it_importable(tmp_path):
  """In a fresh interpreter (this one may have torch already): the writer works without
  torch's import, and a later `import torch` (the interop code's) still succeeds."""
  code = ('import sys, importlib.util; from vlrep.runtime.metrics import MetricWriter; '
          'w = MetricWriter(sys.argv[1]); w.write(1, {"train/loss": 0.5}); w.close(); '
          'assert "torch" not in sys.modules, "torch imported"; '
          'has_torch = importlib.util.find_spec("torch") is not None; '
          'has_torch and __import__("torch"); print("torch" in sys.modules, has_torch)')
  result = subprocess.run([sys.executable, '-c', code, str(tmp_path)], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode == 0, result.stderr[-2000:]
  imported_later, installed = result.stdout.split()
  assert imported_later == installed
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(tmp_path / 'tensorboard'))
