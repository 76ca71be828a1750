"""`initialize()`: joins the multi-process run this process was launched into.

Every entry point (train, evaluate, bench) calls it first thing, before any other JAX call,
since JAX must know its peers before it creates a backend. Three cases:

* Explicit, set by our launchers (launch/local.sh) or by hand:
  `VLREP_COORDINATOR` (host:port of process 0), `VLREP_NUM_PROCESSES`, `VLREP_PROCESS_ID`.
  All three or none; `VLREP_NUM_PROCESSES=1` is a single process.
* Auto-detected: a multi-host Cloud TPU slice, or a SLURM job step with more than one task
  (`srun`); `jax.distributed.initialize()` then reads the cluster's own environment.
* Anything else: a single process, nothing to join.

Bounds, so that a lost peer is an error rather than a hang (seconds, from the env):
`VLREP_INIT_TIMEOUT_S` (default 300) for all processes to connect at start;
`VLREP_HEARTBEAT_TIMEOUT_S` (default 60) without heartbeats before the coordination service
declares a process dead; `VLREP_SHUTDOWN_TIMEOUT_S` (default 120) that an exiting process
waits at jax's shutdown barrier for the others. When one runs out, jax aborts the processes
concerned (SIGABRT, exit status 134, logging "Terminating process because the JAX
distributed service detected fatal errors"): a process that died is noticed by all others
within the heartbeat timeout, a dead coordinator (process 0) at once. An uncaught exception
exits its process at once with status 1 (`_exit_on_uncaught_exception`), which its peers
then notice the same way.

Note: once joined, jax's preemption service catches SIGTERM (it does not end the process);
a loop must poll `jax.experimental.multihost_utils.reached_preemption_sync_point(step)` to
checkpoint and stop, or be killed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import sys
import traceback
from types import TracebackType
from typing import Any

import jax
from absl import logging

EXPLICIT_VARS = ('VLREP_COORDINATOR', 'VLREP_NUM_PROCESSES', 'VLREP_PROCESS_ID')
DEFAULT_INIT_TIMEOUT_S = 300
# jax's own default is 100 s. Heartbeats come from a background thread, so long compiles
# or checkpoint writes do not delay them; 60 s stops the survivors of a dead peer within
# about a minute and still rides out short network blips.
DEFAULT_HEARTBEAT_TIMEOUT_S = 60
# jax's default is 300 s: how long a process that is done (or failed) waits for the others
# at exit. Healthy processes finish within seconds of each other.
DEFAULT_SHUTDOWN_TIMEOUT_S = 120


def _env_int(name: str, default: int = 0, minimum: int = 0) -> int:
  value = os.environ.get(name, '').strip()
  if not value:
    return default
  try:
    number = int(value)
  except ValueError:
    raise ValueError(f'{name}={value!r} is not an integer') from None
  if number < minimum:
    raise ValueError(f'{name}={number} must be >= {minimum}')
  return number


def _explicit_args() -> dict[str, Any] | None:
  """coordinator_address / num_processes / process_id from the VLREP_* env, or None."""
  present = [name for name in EXPLICIT_VARS if os.environ.get(name, '').strip()]
  if not present:
    return None
  missing = [name for name in EXPLICIT_VARS if name not in present]
  if missing:
    raise ValueError(f'{", ".join(present)} set but {", ".join(missing)} missing: a '
                     f'multi-process run needs all of {", ".join(EXPLICIT_VARS)}')
  coordinator = os.environ['VLREP_COORDINATOR'].strip()
  host, _, port = coordinator.rpartition(':')
  if not host or not port.isdigit():
    raise ValueError(f'VLREP_COORDINATOR={coordinator!r} is not host:port')
  num_processes = _env_int('VLREP_NUM_PROCESSES', minimum=1)
  process_id = _env_int('VLREP_PROCESS_ID')
  if process_id >= num_processes:
    raise ValueError(f'VLREP_PROCESS_ID={process_id} is not below '
                     f'VLREP_NUM_PROCESSES={num_processes}')
  return {'coordinator_address': coordinator, 'num_processes': num_processes,
          'process_id': process_id}


def _count(value: str | None) -> int:
  return int(value) if value and value.strip().isdigit() else 0


def _multihost_tpu() -> bool:
  """Whether this is one host of a multi-host Cloud TPU slice (or of several slices)."""
  if _count(os.environ.get('MEGASCALE_NUM_SLICES')) > 1:
    return True
  # What jax's TPU cluster detection reads on GKE (and what TPU VMs may export).
  hosts = os.environ.get('TPU_PROCESS_ADDRESSES') or os.environ.get('TPU_WORKER_HOSTNAMES')
  if hosts:
    return len([h for h in hosts.split(',') if h.strip()]) > 1
  # A GCE TPU VM keeps its worker list in the metadata server, not in the env; only jax's
  # (private) cluster code reads it. Ask it only on a TPU VM: off one, it would make a network
  # call, and import jax already found out whether this is one.
  try:
    from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
    from jax._src.clusters import cloud_tpu_cluster  # pylint: disable=g-import-not-at-top
    if not cloud_tpu_init.running_in_cloud_tpu_vm:
      return False
    gce = cloud_tpu_cluster.GceTpuCluster
    return gce.is_env_present() and gce.get_process_count() > 1
  except Exception as e:  # pylint: disable=broad-except
    # A jax that moved its internals, or no metadata server: say so, then run single-host.
    logging.warning('could not ask jax whether this TPU VM is part of a multi-host slice '
                    '(%s: %s); running as a single host', type(e).__name__, e)
    return False


def _slurm_step_tasks() -> int:
  """Tasks in this SLURM job step (0 outside `srun`): jax's SLURM detection needs a step."""
  if 'SLURM_STEP_NODELIST' not in os.environ or 'SLURM_PROCID' not in os.environ:
    return 0
  return _count(os.environ.get('SLURM_STEP_NUM_TASKS') or os.environ.get('SLURM_NTASKS'))


def _expand_tasks_per_node(spec: str) -> list[int]:
  """SLURM's compressed per-node task counts, e.g. '2(x3),1' -> [2, 2, 2, 1]."""
  counts = []
  for part in spec.split(','):
    match = re.fullmatch(r'\s*(\d+)(?:\(x(\d+)\))?\s*', part)
    if not match:
      return []
    counts += [int(match.group(1))] * int(match.group(2) or 1)
  return counts


def _slurm_local_device_ids() -> list[int] | None:
  """All of this node's GPUs when SLURM runs one task on it; None leaves jax's default.

  jax's SLURM detection restricts each process to one GPU (index SLURM_LOCALID), which is
  right for one task per GPU but would leave 7 of 8 GPUs idle with one task per node.
  """
  if os.environ.get('JAX_LOCAL_DEVICE_IDS'):
    return None  # The user's choice; jax reads it.
  per_node = _expand_tasks_per_node(os.environ.get('SLURM_STEP_TASKS_PER_NODE', ''))
  node = _count(os.environ.get('SLURM_NODEID'))
  if node >= len(per_node) or per_node[node] != 1:
    return None
  gpus = _count(os.environ.get('SLURM_GPUS_ON_NODE'))
  if not gpus and os.environ.get('CUDA_VISIBLE_DEVICES'):
    gpus = len(os.environ['CUDA_VISIBLE_DEVICES'].split(','))
  return list(range(gpus)) if gpus > 1 else None


def _accelerator_installed() -> bool:
  """Whether a TPU or GPU PJRT plugin is installed (checked without starting a backend)."""
  if importlib.util.find_spec('libtpu') is not None:
    return True
  try:
    return bool(importlib.metadata.entry_points(group='jax_plugins'))
  except Exception:  # pylint: disable=broad-except
    return False


def _cpu_platform() -> bool:
  platforms = jax.config.jax_platforms or os.environ.get('JAX_PLATFORMS', '')
  if platforms:
    return {p.strip() for p in platforms.split(',') if p.strip()} == {'cpu'}
  return not _accelerator_installed()


def _join(**kwargs: Any) -> None:
  if _cpu_platform() and 'JAX_CPU_COLLECTIVES_IMPLEMENTATION' not in os.environ:
    # Without a CPU collectives implementation, cross-process computations on CPU fail
    # (older jax had none by default; this one defaults to gloo, which we make explicit).
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
      **kwargs,
      initialization_timeout=_env_int('VLREP_INIT_TIMEOUT_S', DEFAULT_INIT_TIMEOUT_S, 1),
      heartbeat_timeout_seconds=_env_int('VLREP_HEARTBEAT_TIMEOUT_S',
                                         DEFAULT_HEARTBEAT_TIMEOUT_S, 1),
      shutdown_timeout_seconds=_env_int('VLREP_SHUTDOWN_TIMEOUT_S',
                                        DEFAULT_SHUTDOWN_TIMEOUT_S, 1))
  sys.excepthook = _exit_on_uncaught_exception


def _exit_on_uncaught_exception(kind: type[BaseException], value: BaseException,
                                tb: TracebackType | None) -> None:
  """Prints the traceback and exits now, skipping jax's shutdown barrier.

  Otherwise the failed process would wait at that barrier for peers that are stuck in a
  collective waiting for it, until the shutdown timeout aborts them all (status 134,
  minutes later, the real status lost). Exiting now reports status 1 to the launcher, and
  the peers stop within the heartbeat timeout (at once if this is the coordinator). Other
  exit handlers (e.g. an unfinished async checkpoint) are skipped: the run failed anyway.
  """
  traceback.print_exception(kind, value, tb)
  logging.flush()
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except Exception:  # pylint: disable=broad-except
      pass
  os._exit(130 if issubclass(kind, KeyboardInterrupt) else 1)


def initialize() -> None:
  """Joins the multi-process run this process was launched into; a no-op for a single process.

  Raises:
    ValueError: on a partial or malformed VLREP_* environment.
  """
  if jax.distributed.is_initialized():
    return  # e.g. evaluate called from within a training process
  explicit = _explicit_args()
  if explicit is not None:
    how = 'VLREP_* env'
    if explicit['num_processes'] > 1:
      _join(**explicit)
  elif _multihost_tpu():
    how = 'TPU slice'
    _join()
  elif (tasks := _slurm_step_tasks()) > 1:
    how = f'SLURM step of {tasks} tasks'
    _join(local_device_ids=_slurm_local_device_ids())
  else:
    how = 'no cluster found'
  logging.info('process %d of %d (%s): %d local / %d global devices (%s)',
               jax.process_index(), jax.process_count(), how, jax.local_device_count(),
               jax.device_count(), jax.default_backend())
