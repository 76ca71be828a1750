"""`python -m vlrep.bench`: runs `vlrep/tools/bench.py`, whose docstring is its --help."""

from absl import app, flags

from vlrep.tools import bench

if __name__ == '__main__':
  __doc__ = bench.__doc__  # absl's --help prints the __main__ module's docstring
  bench.define_flags()
  flags.adopt_module_key_flags(bench)  # and lists the flags key to __main__
  app.run(bench.main)
