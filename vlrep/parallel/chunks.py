"""Running a jitted function over host arrays in fixed-size global chunks, on any mesh.

`in_chunks` is how `Pretrained` and the evaluators feed inputs of any length to the model:
fixed chunks (the last one zero-padded) so that each function compiles once per chunk shape;
each chunk a global array split over the mesh's batch axes, each process reading (or, for
streamed evaluation images, decoding) only the rows its devices hold; every process gets the
whole output back, so results do not depend on the device or process count.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from vlrep.parallel import sharding


def to_host(x: Any) -> np.ndarray:
  """The whole of an array as numpy, on every process (a collective for global arrays)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def host_inputs(images: Any) -> Any:
  """Streamed evaluation images as they are (read in `in_chunks`), anything else as numpy."""
  return images if hasattr(images, 'take_rows') else np.asarray(images)


def _row_template(x: Any, prepare: Callable[[np.ndarray], np.ndarray]) -> tuple[tuple, Any]:
  """(shape, dtype) of one row of `x` as `prepare` makes it."""
  first = np.zeros((1, *x.row_shape), x.dtype) if hasattr(x, 'take_rows') else np.asarray(x[:1])
  first = prepare(first)
  return first.shape[1:], first.dtype


def in_chunks(fn: Callable[..., Any], inputs: Any, chunk: int,
               batch_sharding: jax.sharding.NamedSharding,
               prepare: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
  """fn over `inputs` in chunks of `chunk` rows (the last one zero-padded), concatenated.

  `inputs` is one array or sequence, or a tuple of them with the same rows (passed as
  separate arguments). A sequence with `take_rows` (`pipeline.EvalImages`) is decoded here,
  and only in the rows that this process's devices hold (`sharding.process_rows`): on a pod
  each host decodes its share of every chunk. `prepare` maps every input's rows as read.
  Each chunk becomes a global array split over the batch axes; every process gets the whole
  output back (a tuple of outputs when `fn` returns a tuple). `fn` runs (and so is traced)
  with the logical-axis rules in effect over the sharding's mesh.
  """
  inputs = inputs if isinstance(inputs, tuple) else (inputs,)
  prepare = prepare or (lambda x: x)
  mine = sharding.process_rows(batch_sharding, chunk)
  templates = [_row_template(x, prepare) for x in inputs]
  outputs = []
  for start in range(0, len(inputs[0]), chunk):
    rows = min(chunk, len(inputs[0]) - start)
    real = mine[mine < rows]  # a prefix of `mine`: the rest of this process's rows are padding
    arrays = []
    for x, (shape, dtype) in zip(inputs, templates):
      local = np.zeros((len(mine), *shape), dtype)
      if len(real):
        wanted = start + real
        local[:len(real)] = prepare(x.take_rows(wanted) if hasattr(x, 'take_rows')
                                    else np.asarray(x)[wanted])
      arrays.append(jax.make_array_from_process_local_data(batch_sharding, local,
                                                           (chunk, *shape)))
    # The model's activation constraints apply as in training (`sharding.axis_rules`).
    with sharding.axis_rules(batch_sharding.mesh):
      out = fn(*arrays)
    outputs.append(tuple(to_host(x)[:rows] for x in (out if isinstance(out, tuple) else (out,))))
  joined = tuple(np.concatenate(parts) for parts in zip(*outputs))
  return joined if isinstance(out, tuple) else joined[0]
