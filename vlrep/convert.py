"""`python -m vlrep.convert --open_clip_state_dict=... --model_cfg=... --output=DIR`.

Converts an open_clip model (a state dict file and its model config) into an exported vlrep
model directory (`Pretrained.save`: config.json + params.safetensors), which `vlrep.load(DIR)`
reads and `config.init_from=DIR` fine-tunes. The conversion itself is
`vlrep.interop.open_clip`; this is its command line.

`--model_cfg` is a JSON file in open_clip's `model_configs/*.json` format, or the name of one
of those files (e.g. `ViT-B-32`) in the installed open_clip package, found without importing
it (which would import torch).
"""

from __future__ import annotations

import importlib.util
import json
import os

import jax
from absl import app, flags

from vlrep import paths


def read_model_cfg(spec: str) -> dict:
  """open_clip's model config: a JSON file, or a name in open_clip's model_configs/."""
  path = paths.local(spec)
  if not paths.isfile(path):
    found = importlib.util.find_spec('open_clip')
    for folder in (found.submodule_search_locations or []) if found else []:
      candidate = os.path.join(folder, 'model_configs', f'{spec}.json')
      if os.path.isfile(candidate):
        path = candidate
        break
    else:
      raise FileNotFoundError(f'--model_cfg={spec!r} is neither a JSON file nor the name of a '
                              'config in the installed open_clip package')
  return json.loads(paths.read_text(path))


def convert(state_dict: str, model_cfg: str, output: str):
  """Converts and saves; returns the `Pretrained` model that was written to `output`."""
  paths.check(output)
  if not paths.isfile(state_dict):
    raise FileNotFoundError(f'--open_clip_state_dict={state_dict!r} not found')
  cfg = read_model_cfg(model_cfg)
  from vlrep.interop import open_clip  # pylint: disable=g-import-not-at-top
  with paths.reading_locally(state_dict) as local_state_dict:
    model = open_clip.load_open_clip(local_state_dict, cfg)
  model.save(output)
  return model


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  args = flags.FLAGS
  model = convert(args.open_clip_state_dict, args.model_cfg, args.output)
  count = sum(x.size for x in jax.tree.leaves(model.params))
  print(f'wrote {paths.absolute(args.output)}: {count:,} parameters; load it with '
        f'vlrep.load({args.output!r}) or fine-tune with --config.init_from={args.output}')


if __name__ == '__main__':
  # Flags are defined only when run as a program, so tests can import this module.
  flags.DEFINE_string('open_clip_state_dict', None, 'An open_clip state dict file (as '
                      'torch.save(model.state_dict(), PATH) writes it).')
  flags.DEFINE_string('model_cfg', None, "open_clip's model config: a JSON file, or a name in "
                      "open_clip's model_configs (e.g. ViT-B-32).")
  flags.DEFINE_string('output', None, 'Directory to write the exported vlrep model to.')
  flags.mark_flags_as_required(['open_clip_state_dict', 'model_cfg', 'output'])
  app.run(main)
