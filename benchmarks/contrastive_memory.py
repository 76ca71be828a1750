"""Per-device compiled memory of the contrastive loss: gather vs ring, softmax and sigmoid.

Compiles (never runs) value-and-grad of `vlrep.losses.contrastive_loss` w.r.t. both
embeddings and the scalars for a global batch sharded over a data=8 mesh of simulated CPU
devices, and prints each variant's per-device buffer sizes from XLA's
`compiled.memory_analysis()`: temp (scratch: logits, gathered embeddings, residuals kept for
the backward pass), argument and output; peak = temp + argument + output - alias. The last
line is one JSON object with the same figures. These are XLA:CPU's buffer assignments; TPU
and GPU compilers schedule differently, so read the gather/ring ratio, not the bytes.

Run from the repository root:

  python benchmarks/contrastive_memory.py [--batch=16384] [--embed_dim=512]
"""

from __future__ import annotations

import argparse
import json
import os

# Before jax is imported: the CPU backend reads the simulated device count at start-up.
if 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=8').strip()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import ml_collections  # pylint: disable=g-import-not-at-top,wrong-import-position

from vlrep import losses  # pylint: disable=g-import-not-at-top,wrong-import-position
from vlrep.parallel import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position

DATA_DEVICES = 8


def compiled_memory(loss_type: str, impl: str, batch: int, embed_dim: int,
                    mesh: jax.sharding.Mesh) -> dict[str, int]:
  """Per-device byte counts of the compiled value-and-grad of one loss variant."""
  emb = jax.ShapeDtypeStruct((batch, embed_dim), jnp.float32,
                             sharding=sharding.batch_sharding(mesh))
  scalar = jax.ShapeDtypeStruct((), jnp.float32)

  def loss(image_emb, text_emb, logit_scale, logit_bias):
    return losses.contrastive_loss(
        image_emb, text_emb, logit_scale, logit_bias if loss_type == 'sigmoid' else None,
        loss_type=loss_type, impl=impl, mesh=mesh, batch_axes=sharding.BATCH_AXES)

  return memory_sizes(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))).lower(
      emb, emb, scalar, scalar).compile())


def memory_sizes(compiled) -> dict[str, int]:
  """Per-device temp, argument, output and alias bytes of a compiled program, and its peak."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    raise SystemExit('this backend reports no compiled memory analysis')
  sizes = {'temp': analysis.temp_size_in_bytes, 'argument': analysis.argument_size_in_bytes,
           'output': analysis.output_size_in_bytes, 'alias': analysis.alias_size_in_bytes}
  sizes['peak'] = sizes['temp'] + sizes['argument'] + sizes['output'] - sizes['alias']
  return sizes


def data_mesh() -> jax.sharding.Mesh:
  """data=DATA_DEVICES over the first simulated devices (the benchmarks' mesh)."""
  if len(jax.devices()) < DATA_DEVICES:
    raise SystemExit(f'needs {DATA_DEVICES} devices, found {len(jax.devices())}')
  return sharding.make_mesh(ml_collections.ConfigDict({'data': DATA_DEVICES, 'fsdp': 1,
                                                       'tensor': 1}),
                            jax.devices()[:DATA_DEVICES])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=16384, help='global batch')
  parser.add_argument('--embed_dim', type=int, default=512)
  args = parser.parse_args()
  mesh = data_mesh()

  mib = lambda n: f'{n / 2**20:10.1f}'
  print(f'global batch {args.batch}, embed_dim {args.embed_dim}, float32, mesh '
        f'{dict(mesh.shape)}; per-device MiB of value_and_grad, compiled only')
  print(f'{"loss":8} {"impl":7} {"temp":>10} {"argument":>10} {"output":>10} {"peak":>10}')
  figures = {'batch': args.batch, 'embed_dim': args.embed_dim, 'devices': DATA_DEVICES,
             'unit': 'bytes per device', 'peak': 'temp + argument + output - alias'}
  for loss_type in losses.CONTRASTIVE_TYPES:
    by_impl = {impl: compiled_memory(loss_type, impl, args.batch, args.embed_dim, mesh)
               for impl in losses.CONTRASTIVE_IMPLS}
    for impl, sizes in by_impl.items():
      print(f'{loss_type:8} {impl:7} {mib(sizes["temp"])} {mib(sizes["argument"])} '
            f'{mib(sizes["output"])} {mib(sizes["peak"])}')
    ratio = by_impl['gather']['peak'] / by_impl['ring']['peak']
    temp_ratio = by_impl['gather']['temp'] / by_impl['ring']['temp']
    print(f'{loss_type:8} gather/ring peak {ratio:.2f}x, temp {temp_ratio:.2f}x')
    figures[loss_type] = {**by_impl, 'gather_over_ring_peak': round(ratio, 3),
                          'gather_over_ring_temp': round(temp_ratio, 3)}
  print(json.dumps(figures))


if __name__ == '__main__':
  main()
