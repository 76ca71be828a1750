"""`python -m vlrep.convert`: runs `vlrep/weights/convert.py`, whose docstring is its --help."""

from absl import app, flags

from vlrep.weights import convert

if __name__ == '__main__':
  __doc__ = convert.__doc__  # absl's --help prints the __main__ module's docstring
  convert.define_flags()
  flags.adopt_module_key_flags(convert)  # and lists the flags key to __main__
  app.run(convert.main)
