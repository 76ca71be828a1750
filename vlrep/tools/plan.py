"""`python -m vlrep.plan --config=... --target=TARGET`: the real train step compiled for a TPU
pod slice or GPU hosts on this CPU, and what it needs there.

TARGET is `tpu:VERSION:TOPOLOGY` (`tpu:v4:16x16x8`, `tpu:v5p:8x8x4`, `tpu:v5e:16x16`,
`tpu:v6e:16x16`; `--slices=N` for N such slices joined over DCN) or `gpu:PART:HOSTSxGPUS`
(`gpu:h100:2x8`, `gpu:h200:1x8`). JAX makes compile-only devices for the target (libtpu, from
`jax[tpu]`; the CUDA plugin with XLA's target config of the part, `vlrep/tools/gpu_targets/`); the
step is the one `vlrep.train` jits (`train.setup_step`: same config validation, mesh,
shardings, activation rules and donation), lowered for abstract arguments, so nothing is
allocated. The last line printed is one JSON object: per-device parameter, optimizer-state,
argument, scratch and peak bytes against the chip's memory; model FLOPs (`vlrep.tools.flops`) and
XLA's; XLA's roofline step time and the MFU and examples/s it implies (TPU only: XLA's GPU
compiler gives no cost analysis); the collectives of the compiled step by kind; the arrays
replicated because a dimension does not divide; the compile time.

XLA's cost analysis counts the body of a loop (a `scan_layers` stack, the microbatch scan)
once, so with loops the FLOPs and time it gives are lower bounds; `loops` says how many while
loops the step has.
"""

from __future__ import annotations

import collections
import json
import os
import re
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from vlrep import train
from vlrep.models.build import example_batch
from vlrep.tools import flops as flops_lib

GPU_TARGETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'gpu_targets')
# Memory per chip (bytes) by `device_kind` substring, first match wins. Sources: Google Cloud
# TPU system architecture pages (v4 32 GiB, v5p 95 GiB, v5e 16 GiB, v6e 32 GiB of HBM per
# chip); NVIDIA H100 SXM / H200 datasheets (80 GB, 141 GB: the device_memory_size of XLA's
# target configs in vlrep/tools/gpu_targets). Peak FLOPs: `vlrep.tools.flops.PEAK_TFLOPS`.
CHIP_MEMORY_BYTES = (
    ('TPU v6 lite', 32 << 30),
    ('TPU v5 lite', 16 << 30),
    ('TPU v5', 95 << 30),  # v5p
    ('TPU v4', 32 << 30),
    ('H200', 151_397_597_184),
    ('H100', 84_942_979_072),
)
# Per TPU version: the chip config (v4 and v5p: one megacore device per chip) and how many
# chips a host holds along each topology axis.
_TPU = {'v4': ('megacore', (2, 2, 1)), 'v5p': ('megacore', (2, 2, 1)),
        'v5e': ('default', (2, 2, 1)), 'v6e': ('default', (2, 2, 1))}
_COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all',
                'collective-permute')
_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'bf16': 2, 'f16': 2,
                's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8}


class PlanError(ValueError):
  """A target, mesh or batch that cannot work (printed as one line, exit status 1)."""


def chip_memory_bytes(device_kind: str) -> int | None:
  return next((b for name, b in CHIP_MEMORY_BYTES if name.lower() in device_kind.lower()), None)


def target_devices(target: str, slices: int = 1) -> list[jax.Device]:
  """Compile-only devices of `target` (see the module docstring for the syntax)."""
  try:
    return _target_devices(target, slices)
  except (RuntimeError, NotImplementedError) as e:  # jax's errors from libtpu / the plugin
    lines = [line for line in str(e).splitlines() if line.strip()]
    raise PlanError(f'--target={target!r}: {lines[0] if lines else type(e).__name__}') from e


def _target_devices(target: str, slices: int) -> list[jax.Device]:
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  # Compile-only: no TPU is opened, so several planners (test workers) may load libtpu at once,
  # and there is no metadata server to ask.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
  parts = target.split(':')
  if len(parts) != 3 or parts[0] not in ('tpu', 'gpu'):
    raise PlanError(f'--target={target!r}: expected tpu:VERSION:TOPOLOGY (e.g. tpu:v5p:8x8x4) '
                    'or gpu:PART:HOSTSxGPUS (e.g. gpu:h200:1x8)')
  kind, part, shape = parts
  try:
    dims = tuple(int(d) for d in shape.split('x'))
  except ValueError:
    raise PlanError(f'--target={target!r}: topology {shape!r} is not like 4x4x4') from None
  if slices < 1:
    raise PlanError(f'--slices must be >= 1, got {slices}')
  if kind == 'tpu':
    if part not in _TPU:
      raise PlanError(f'--target={target!r}: TPU version {part!r}; known: {sorted(_TPU)}')
    chip_config, host_bounds = _TPU[part]
    # Wraparound links exist along full-length axes of 4 or more chips (a torus).
    return topologies.get_topology_desc(
        platform='tpu', topology_name=f'{part}:{shape}', chip_config_name=chip_config,
        chips_per_host_bounds=host_bounds, num_slices=slices,
        wrap=tuple(d >= 4 for d in dims) + (False,) * (3 - len(dims))).devices
  spec = os.path.join(GPU_TARGETS, f'{part}.txtpb')
  if not os.path.exists(spec):
    known = sorted(f[:-len('.txtpb')] for f in os.listdir(GPU_TARGETS) if f.endswith('.txtpb'))
    raise PlanError(f'--target={target!r}: GPU part {part!r}; known: {known}')
  if len(dims) != 2 or slices != 1:
    raise PlanError(f'--target={target!r}: GPU targets are HOSTSxGPUS (hosts are the slow '
                    'links: mesh.dcn_data / dcn_fsdp), without --slices')
  with open(spec) as f:
    return topologies.get_topology_desc(platform='cuda', topology=f'1x{dims[0]}x{dims[1]}',
                                        target_config=f.read()).devices


def _per_device_bytes(abstract: Any, shardings: Any) -> int:
  """Bytes of one device's shards of a tree of ShapeDtypeStructs under `shardings`."""
  leaves = zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings))
  return int(sum(np.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                 for x, s in leaves))


def _shape_bytes(shape: str, largest: bool = False) -> int:
  """Bytes of an HLO result shape such as `bf16[8,128]{1,0}` or a tuple of them (summed, or
  the `largest`: an async start's tuple holds its operand, result and context)."""
  sizes = [_DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(',') if d]))
           for dtype, dims in re.findall(r'\b([a-z]+\d*)\[([\d,]*)\]', shape)
           if dtype in _DTYPE_BYTES]
  return (max(sizes) if largest else sum(sizes)) if sizes else 0


def collectives(hlo: str) -> tuple[dict[str, dict[str, int]], int]:
  """({kind: {count, bytes, in_loop}}, while loops) of a compiled (partitioned) HLO module.

  An async pair (`all-gather-start` / `-done`) counts once; bytes are the op's result per
  device; `in_loop` counts the ops inside a while loop's body (they run once per iteration:
  per layer of a scanned stack, per microbatch, per caption slice).
  """
  bodies, calls, ops = set(), collections.defaultdict(set), []
  computation = None
  for line in hlo.splitlines():
    header = re.match(r'^(?:ENTRY )?%?([\w.\-]+) .*\{$', line)
    if header and not line.startswith(' '):
      computation = header.group(1)
      continue
    for key, name in re.findall(r'\b(body|condition|to_apply|calls|branch_computations)='
                                r'\{?%?([\w.\-]+)', line):
      (bodies if key == 'body' else calls[computation]).add(name)
      if key == 'body':
        calls[computation].add(name)
    match = re.match(r'^\s*(?:ROOT )?%?[\w.\-]+ = (.+?) ([a-z\-]+)\(', line)
    if match:
      op, started = match.group(2), match.group(2).endswith('-start')
      op = op[:-len('-start')] if started else op
      if op in _COLLECTIVES:
        ops.append((computation, op, _shape_bytes(match.group(1), largest=started)))
  in_loop = set()
  frontier = list(bodies)
  while frontier:  # everything a loop body calls runs in the loop too
    name = frontier.pop()
    if name not in in_loop:
      in_loop.add(name)
      frontier.extend(calls.get(name, ()))
  result: dict[str, dict[str, int]] = {}
  for computation, op, nbytes in ops:
    entry = result.setdefault(op, {'count': 0, 'bytes': 0, 'in_loop': 0})
    entry['count'] += 1
    entry['bytes'] += nbytes
    entry['in_loop'] += computation in in_loop
  return result, len(bodies)


def _figure(x: float | None) -> float | None:
  return None if x is None else float(f'{x:.4g}')


def plan(config: ml_collections.ConfigDict, target: str, slices: int = 1) -> dict[str, Any]:
  """Compiles `vlrep.train`'s step of `config` for `target`; returns the figures (JSON)."""
  devices = target_devices(target, slices)
  try:
    setup = train.setup_step(config, devices)
  except train.ConfigError as e:
    raise PlanError(str(e)) from e
  shapes = jax.eval_shape(lambda: example_batch(config, config.batch_size))
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=setup.batch_sharding)
           for k, v in shapes.items()}
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       setup.abstract_state, setup.state_shardings)
  start = time.perf_counter()
  compiled = setup.train_step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start

  kind, count = devices[0].device_kind, len(devices)
  memory = compiled.memory_analysis()
  argument = int(memory.argument_size_in_bytes)
  temp = int(memory.temp_size_in_bytes)
  output, alias = int(memory.output_size_in_bytes), int(memory.alias_size_in_bytes)
  peak = int(getattr(memory, 'peak_memory_in_bytes', 0) or 0) or argument + output - alias + temp
  device_memory = chip_memory_bytes(kind)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost['flops']) * count if cost and 'flops' in cost else None
  step_s = float(cost['optimal_seconds']) if cost and 'optimal_seconds' in cost else None
  step_s = step_s if step_s is not None and step_s > 0 else None
  model_flops = flops_lib.train_flops_per_step(config)['total']
  per_chip_peak = flops_lib.table_peak_tflops(kind)
  mfu = (model_flops / step_s / (per_chip_peak * 1e12 * count)
         if step_s and per_chip_peak else None)
  found, loops = collectives(compiled.as_text())
  return {
      'target': target, 'slices': slices, 'device_kind': kind,
      'device_count': count, 'mesh': dict(setup.mesh.shape),
      'batch_size': config.batch_size, 'microbatches': int(config.microbatches),
      'remat': config.model.remat, 'scan_layers': bool(config.model.scan_layers),
      'param_bytes': _per_device_bytes(state.params, setup.state_shardings.params),
      'opt_state_bytes': _per_device_bytes(state.opt_state, setup.state_shardings.opt_state),
      'argument_bytes': argument, 'output_bytes': output, 'alias_bytes': alias,
      'temp_bytes': temp,
      'peak_bytes': peak, 'device_memory_bytes': device_memory,
      'fits': None if device_memory is None else peak <= device_memory,
      'model_flops_per_step': model_flops, 'xla_flops_per_step': xla_flops,
      'estimated_step_s': _figure(step_s), 'estimated_mfu': _figure(mfu),
      'estimated_examples_per_s': _figure(config.batch_size / step_s) if step_s else None,
      'peak_tflops_per_chip': per_chip_peak, 'loops': loops, 'collectives': found,
      'replicated': setup.replicated, 'compile_s': _figure(compile_s)}


def _summary(r: dict[str, Any]) -> str:
  gib = lambda b: 'n/a' if b is None else f'{b / 2**30:.1f} GiB'
  line = (f'{r["device_count"]} x {r["device_kind"]}, mesh {r["mesh"]}: peak {gib(r["peak_bytes"])}'
          f' of {gib(r["device_memory_bytes"])} per device ({"fits" if r["fits"] else "does NOT fit"})'
          f', compiled in {r["compile_s"]:.0f} s')
  if r['estimated_step_s']:
    line += (f'; XLA estimate {r["estimated_step_s"]:.3g} s/step, '
             f'{r["estimated_examples_per_s"]:,.0f} examples/s, MFU {r["estimated_mfu"]:.1%}')
  return line


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Compile-only devices need no accelerator here; the CPU stays the default backend (the
  # CUDA plugin would otherwise look for a GPU and fail).
  jax.config.update('jax_platforms', 'cpu')
  try:
    result = plan(flags.FLAGS.config, flags.FLAGS.target, flags.FLAGS.slices)
  except PlanError as e:
    train._fail(str(e), 'vlrep.plan')  # pylint: disable=protected-access
  print(_summary(result))
  print(json.dumps(result))


def define_flags() -> None:
  """Defines the command line's flags; `python -m vlrep.plan` calls it before `main`."""
  config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/coca.py:giant.',
                                  lock_config=True)
  flags.DEFINE_string('target', None, 'tpu:VERSION:TOPOLOGY or gpu:PART:HOSTSxGPUS.')
  flags.DEFINE_integer('slices', 1, 'TPU slices joined over DCN (multislice).')
  flags.mark_flags_as_required(['config', 'target'])
