"""vlrep.parallel.distributed: the env rules, a real 2-process run over loopback, and
launch/local.sh."""

import os
import socket
import subprocess
import sys
import textwrap
import time

import jax
import pytest

from vlrep.parallel import distributed

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOCAL_SH = os.path.join(REPO, 'launch', 'local.sh')
CLUSTER_VARS = ('VLREP_COORDINATOR', 'VLREP_NUM_PROCESSES', 'VLREP_PROCESS_ID',
                'VLREP_INIT_TIMEOUT_S', 'VLREP_HEARTBEAT_TIMEOUT_S', 'VLREP_SHUTDOWN_TIMEOUT_S',
                'SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_STEP_NUM_TASKS',
                'SLURM_PROCID', 'SLURM_LOCALID', 'SLURM_NODEID', 'SLURM_STEP_TASKS_PER_NODE',
                'SLURM_GPUS_ON_NODE', 'CUDA_VISIBLE_DEVICES', 'JAX_LOCAL_DEVICE_IDS',
                'TPU_WORKER_HOSTNAMES', 'TPU_PROCESS_ADDRESSES', 'MEGASCALE_NUM_SLICES')


@pytest.fixture
def calls(monkeypatch):
  """A clean cluster env, and the keyword arguments of each jax.distributed.initialize call."""
  for name in CLUSTER_VARS:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(sys, 'excepthook', sys.excepthook)  # initialize() replaces it
  recorded = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kwargs: recorded.append(kwargs))
  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: False)
  return recorded


def _set(monkeypatch, **env):
  for name, value in env.items():
    monkeypatch.setenv(name, str(value))


def test_single_process_is_a_noop(calls, monkeypatch):
  distributed.initialize()
  _set(monkeypatch, VLREP_COORDINATOR='127.0.0.1:1234', VLREP_NUM_PROCESSES=1,
       VLREP_PROCESS_ID=0)
  distributed.initialize()
  for name in distributed.EXPLICIT_VARS:
    monkeypatch.delenv(name)
  _set(monkeypatch, TPU_WORKER_HOSTNAMES='only-one-host', SLURM_JOB_ID=7,
       SLURM_STEP_NODELIST='n1', SLURM_NTASKS=1, SLURM_STEP_NUM_TASKS=1, SLURM_PROCID=0,
       SLURM_LOCALID=0)
  distributed.initialize()
  assert calls == []


@pytest.mark.parametrize('present, missing', [
    (('VLREP_COORDINATOR',), ('VLREP_NUM_PROCESSES', 'VLREP_PROCESS_ID')),
    (('VLREP_NUM_PROCESSES', 'VLREP_PROCESS_ID'), ('VLREP_COORDINATOR',)),
    (('VLREP_COORDINATOR', 'VLREP_NUM_PROCESSES'), ('VLREP_PROCESS_ID',)),
])
def test_partial_env_names_the_missing_variables(calls, monkeypatch, present, missing):
  values = {'VLREP_COORDINATOR': '10.0.0.1:1234', 'VLREP_NUM_PROCESSES': 2,
            'VLREP_PROCESS_ID': 1}
  _set(monkeypatch, **{name: values[name] for name in present})
  with pytest.raises(ValueError) as error:
    distributed.initialize()
  for name in missing:
    assert name in str(error.value)
  assert calls == []


@pytest.mark.parametrize('env, message', [
    ({'VLREP_COORDINATOR': '10.0.0.1'}, 'host:port'),
    ({'VLREP_PROCESS_ID': 2}, 'VLREP_PROCESS_ID=2'),
    ({'VLREP_NUM_PROCESSES': 'two'}, "'two'"),
    ({'VLREP_INIT_TIMEOUT_S': 0}, 'VLREP_INIT_TIMEOUT_S'),
])
def test_malformed_env_is_an_error(calls, monkeypatch, env, message):
  _set(monkeypatch, **{'VLREP_COORDINATOR': '10.0.0.1:1234', 'VLREP_NUM_PROCESSES': 2,
                       'VLREP_PROCESS_ID': 1, **env})
  with pytest.raises(ValueError, match=message):
    distributed.initialize()
  assert calls == []


def test_explicit_env_joins_with_bounded_timeouts(calls, monkeypatch):
  _set(monkeypatch, VLREP_COORDINATOR='10.0.0.1:1234', VLREP_NUM_PROCESSES=4,
       VLREP_PROCESS_ID=3, VLREP_HEARTBEAT_TIMEOUT_S=30)
  distributed.initialize()
  assert calls == [{'coordinator_address': '10.0.0.1:1234', 'num_processes': 4,
                    'process_id': 3, 'initialization_timeout': 300,
                    'heartbeat_timeout_seconds': 30, 'shutdown_timeout_seconds': 120}]


def test_multihost_tpu_is_auto_detected(calls, monkeypatch):
  _set(monkeypatch, TPU_WORKER_HOSTNAMES='t1w0,t1w1,t1w2,t1w3')
  distributed.initialize()
  assert len(calls) == 1 and 'coordinator_address' not in calls[0]


def test_slurm_one_task_per_node_keeps_all_gpus(calls, monkeypatch):
  _set(monkeypatch, SLURM_JOB_ID=77, SLURM_STEP_NODELIST='gpu[01-02]', SLURM_NTASKS=2,
       SLURM_STEP_NUM_TASKS=2, SLURM_PROCID=1, SLURM_LOCALID=0, SLURM_NODEID=1,
       SLURM_STEP_TASKS_PER_NODE='1(x2)', SLURM_GPUS_ON_NODE=8)
  distributed.initialize()
  assert len(calls) == 1 and 'coordinator_address' not in calls[0]
  assert calls[0]['local_device_ids'] == list(range(8))
  # One task per GPU: jax's own default (GPU number SLURM_LOCALID) is right.
  _set(monkeypatch, SLURM_NTASKS=16, SLURM_STEP_NUM_TASKS=16, SLURM_STEP_TASKS_PER_NODE='8(x2)')
  distributed.initialize()
  assert calls[1]['local_device_ids'] is None


def test_slurm_batch_script_outside_srun_is_single_process(calls, monkeypatch):
  _set(monkeypatch, SLURM_JOB_ID=77, SLURM_NTASKS=2, SLURM_PROCID=0, SLURM_LOCALID=0)
  distributed.initialize()
  assert calls == []


def test_expand_tasks_per_node():
  assert distributed._expand_tasks_per_node('2(x3),1') == [2, 2, 2, 1]
  assert distributed._expand_tasks_per_node('4') == [4]
  assert distributed._expand_tasks_per_node('garbage') == []


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


_PROGRAM = textwrap.dedent('''
    import os, sys
    from vlrep.parallel import distributed
    distributed.initialize()
    import jax, jax.numpy as jnp, numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    pid = jax.process_index()
    mesh = Mesh(np.array(jax.devices()), ('d',))
    local = np.array([10.0 * pid + 1, 10.0 * pid + 2], np.float32)
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P('d')), local, (4,))
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
    ids = multihost_utils.process_allgather(np.int32(pid))
    # One write: unbuffered (PYTHONUNBUFFERED), print writes each argument on its own, and
    # gloo's log lines on the shared stream could land between them.
    sys.stdout.write(f'RESULT {jax.process_count()} {jax.device_count()} '
                     f'{jax.local_device_count()} {float(total)} {ids.tolist()}\\n')
    sys.stdout.flush()
    if os.environ.get('FAIL_PROCESS') == str(pid):
      raise RuntimeError('process %d fails on purpose' % pid)
    if os.environ.get('FAIL_PROCESS'):
      while True:  # blocks in a collective the failed process never joins
        jax.block_until_ready(jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x))
''')


def _run_two_processes(timeout: float, **env: str) -> list[subprocess.CompletedProcess]:
  port = _free_port()
  procs = []
  for i in range(2):
    process_env = dict(os.environ, JAX_PLATFORMS='cpu',
                       XLA_FLAGS='--xla_force_host_platform_device_count=2',
                       VLREP_COORDINATOR=f'127.0.0.1:{port}', VLREP_NUM_PROCESSES='2',
                       VLREP_PROCESS_ID=str(i), VLREP_INIT_TIMEOUT_S='60', **env)
    procs.append(subprocess.Popen([sys.executable, '-c', _PROGRAM], env=process_env, cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  results = []
  try:
    for p in procs:
      out, _ = p.communicate(timeout=timeout)
      results.append(subprocess.CompletedProcess(p.args, p.returncode, out))
  finally:
    for p in procs:
      p.kill()
  return results


def test_two_processes_over_loopback():
  for i, result in enumerate(_run_two_processes(timeout=90)):
    lines = [line for line in result.stdout.splitlines() if line.startswith('RESULT')]
    assert result.returncode == 0 and lines, f'process {i}:\n{result.stdout[-3000:]}'
    # 2 processes, 4 devices, 2 local; sum of [1, 2, 11, 12]; the gathered process ids.
    assert lines[0] == 'RESULT 2 4 2 26.0 [0, 1]'


def test_a_failed_process_stops_its_peer():
  start = time.time()
  survivor, failed = _run_two_processes(timeout=90, FAIL_PROCESS='1',
                                        VLREP_HEARTBEAT_TIMEOUT_S='3')
  # The failure exits at once with its own status; jax aborts the peer stuck in a collective
  # once the failed process misses its heartbeats.
  assert failed.returncode == 1, failed.stdout[-3000:]
  assert 'fails on purpose' in failed.stdout
  assert survivor.returncode not in (0, None), survivor.stdout[-3000:]
  assert 'detected fatal errors' in survivor.stdout
  assert time.time() - start < 60


def _local_sh(*args: str, timeout: float = 30, **env: str) -> subprocess.CompletedProcess:
  return subprocess.run(['bash', LOCAL_SH, *args], env=dict(os.environ, **env), cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize('args, message', [
    (('--devices_per_process=2',), '--processes'),
    (('--processes=2',), '--devices_per_process'),
    (('--processes=0', '--devices_per_process=2'), '--processes'),
    (('--processes=2', '--devices_per_process=2', '--config=x'), "unknown argument '--config=x'"),
])
def test_local_sh_usage_errors(args, message):
  result = _local_sh(*args)
  assert result.returncode == 2
  assert 'usage: bash launch/local.sh' in result.stderr and message in result.stderr


@pytest.fixture
def fake_python(tmp_path):
  """A stand-in interpreter: `-m vlrep.train ARGS` prints its env; process 1 fails if asked."""
  path = tmp_path / 'python'
  path.write_text(textwrap.dedent(f'''\
      #!/usr/bin/env bash
      if [[ $1 != -m ]]; then exec {sys.executable} "$@"; fi
      shift 2
      echo "id=$VLREP_PROCESS_ID of $VLREP_NUM_PROCESSES at $VLREP_COORDINATOR" \\
        "platforms=$JAX_PLATFORMS xla=$XLA_FLAGS args=$*"
      echo "to stderr" >&2
      if [[ $VLREP_PROCESS_ID == 1 && -n ${{FAIL:-}} ]]; then exit 3; fi
      if [[ -n ${{FAIL:-}} ]]; then sleep 60; fi
      '''))
  path.chmod(0o755)
  return str(path)


def test_local_sh_runs_and_prefixes_every_process(fake_python):
  result = _local_sh('--processes=2', '--devices_per_process=3', '--port=4321', '--',
                     '--config=configs/coca.py:tiny', '--workdir=/tmp/w x',
                     PYTHON=fake_python, XLA_FLAGS='--xla_dump_to=/tmp/d')
  assert result.returncode == 0, result.stderr
  for i in range(2):
    assert (f'[p{i}] id={i} of 2 at 127.0.0.1:4321 platforms=cpu '
            'xla=--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=3 '
            'args=--config=configs/coca.py:tiny --workdir=/tmp/w x') in result.stdout
    assert f'[p{i}] to stderr' in result.stdout


def test_local_sh_failure_kills_the_rest_and_returns_its_status(fake_python):
  start = time.time()
  result = _local_sh('--processes=2', '--devices_per_process=1', '--grace_s=1',
                     PYTHON=fake_python, FAIL='1')
  assert result.returncode == 3, result.stderr
  assert 'process 1 exited with status 3' in result.stderr
  assert time.time() - start < 20  # process 0 (sleeping 60 s) was killed
