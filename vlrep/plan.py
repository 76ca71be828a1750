"""`python -m vlrep.plan`: runs `vlrep/tools/plan.py`, whose docstring is its --help."""

import functools

from absl import app, flags

from vlrep import train
from vlrep.tools import plan

if __name__ == '__main__':
  __doc__ = plan.__doc__  # absl's --help prints the __main__ module's docstring
  plan.define_flags()
  flags.adopt_module_key_flags(plan)  # and lists the flags key to __main__
  app.run(plan.main, flags_parser=functools.partial(train.parse_flags, program='vlrep.plan'))
