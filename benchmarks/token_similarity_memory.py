"""Per-device compiled memory of FILIP's token-wise contrastive loss against the plain one.

Compiles (never runs) value-and-grad of the softmax contrastive loss w.r.t. its embeddings
and scale, for a global batch sharded over a data=8 mesh of simulated CPU devices: the plain
loss of [B, E] vectors (`vlrep.losses.contrastive_loss`) and the token-wise loss of [B, N, E]
patch and [B, T, E] text-token embeddings (`vlrep.late_interaction.contrastive_loss`), each
'gather' and 'ring', the token-wise one unchunked and with `loss.token_similarity_chunk`
texts per slice. Prints each variant's per-device temp (scratch: products, gathered
embeddings, residuals for the backward pass), argument and peak (temp + argument + output -
alias) bytes from XLA's `compiled.memory_analysis()`, then one JSON line with the figures.
XLA:CPU's buffer assignment; accelerator compilers schedule differently, so read the ratios.

Run from the repository root:

  python benchmarks/token_similarity_memory.py [--batch=1024] [--patches=49] [--text_tokens=32]
      [--embed_dim=256] [--chunk=16]
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
from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top,wrong-import-position

from vlrep import late_interaction, losses  # pylint: disable=g-import-not-at-top,wrong-import-position
from vlrep.parallel import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from contrastive_memory import DATA_DEVICES, data_mesh, memory_sizes  # pylint: disable=g-import-not-at-top,wrong-import-position


def compiled_memory(similarity: str, impl: str, args: argparse.Namespace, chunk: int,
                    mesh: jax.sharding.Mesh) -> dict[str, int]:
  """Per-device byte counts of one variant's compiled value-and-grad."""
  rows = NamedSharding(mesh, P(sharding.BATCH_AXES))
  array = lambda *shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype, sharding=rows)
  scale = jax.ShapeDtypeStruct((), jnp.float32)
  options = dict(impl=impl, mesh=mesh, batch_axes=sharding.BATCH_AXES)
  if similarity == 'global':
    loss = lambda x, y, s: losses.contrastive_loss(x, y, s, **options)
    inputs = (array(args.batch, args.embed_dim), array(args.batch, args.embed_dim), scale)
    argnums = (0, 1, 2)
  else:
    loss = lambda x, y, m, s: late_interaction.contrastive_loss(x, y, m, s, chunk=chunk,
                                                               **options)
    inputs = (array(args.batch, args.patches, args.embed_dim),
              array(args.batch, args.text_tokens, args.embed_dim),
              array(args.batch, args.text_tokens, dtype=jnp.bool_), scale)
    argnums = (0, 1, 3)
  return memory_sizes(jax.jit(jax.value_and_grad(loss, argnums=argnums)).lower(*inputs).compile())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=1024, help='global batch')
  parser.add_argument('--patches', type=int, default=49, help='image tokens (ViT-B/32 at 224)')
  parser.add_argument('--text_tokens', type=int, default=32)
  parser.add_argument('--embed_dim', type=int, default=256)
  parser.add_argument('--chunk', type=int, default=16, help='texts per slice (token loss)')
  args = parser.parse_args()
  mesh = data_mesh()
  mib = lambda n: f'{n / 2**20:10.1f}'
  print(f'global batch {args.batch}, {args.patches} patches, {args.text_tokens} text tokens, '
        f'embed_dim {args.embed_dim}, float32 softmax loss, mesh {dict(mesh.shape)}; '
        'per-device MiB of value_and_grad, compiled only')
  print(f'{"similarity":10} {"impl":7} {"chunk":>5} {"temp":>10} {"argument":>10} {"peak":>10}')
  figures = {**vars(args), 'devices': DATA_DEVICES, 'unit': 'bytes per device',
             'peak': 'temp + argument + output - alias'}
  variants = [('global', impl, 0) for impl in losses.CONTRASTIVE_IMPLS] + [
      ('token', impl, chunk) for impl in losses.CONTRASTIVE_IMPLS for chunk in (0, args.chunk)]
  for similarity, impl, chunk in variants:
    sizes = compiled_memory(similarity, impl, args, chunk, mesh)
    print(f'{similarity:10} {impl:7} {chunk:5} {mib(sizes["temp"])} {mib(sizes["argument"])} '
          f'{mib(sizes["peak"])}')
    figures[f'{similarity}_{impl}_chunk{chunk}'] = sizes
  print(json.dumps(figures))


if __name__ == '__main__':
  main()
