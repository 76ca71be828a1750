"""`python -m vlrep.evaluate`: runs `vlrep/evals/evaluate.py`, whose docstring is its --help."""

from absl import app, flags

from vlrep.evals import evaluate

if __name__ == '__main__':
  __doc__ = evaluate.__doc__  # absl's --help prints the __main__ module's docstring
  evaluate.define_flags()
  flags.adopt_module_key_flags(evaluate)  # and lists the flags key to __main__
  app.run(evaluate.main)
