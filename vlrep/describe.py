"""`python -m vlrep.describe`: runs `vlrep/tools/describe.py`, whose docstring is its --help."""

from absl import app, flags

from vlrep.tools import describe

if __name__ == '__main__':
  __doc__ = describe.__doc__  # absl's --help prints the __main__ module's docstring
  describe.define_flags()
  flags.adopt_module_key_flags(describe)  # and lists the flags key to __main__
  app.run(describe.main)
