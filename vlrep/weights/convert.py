"""`python -m vlrep.convert`: weights into and out of vlrep's exported-model format.

  --from=hf --input=DIR --output=OUT         a transformers CLIPModel / SiglipModel directory
                                             -> an exported vlrep model (its tokenizer files
                                             copied to OUT/tokenizer, `data.tokenizer=hf:...`)
  --to=hf --input=DIR --output=OUT           a vlrep model (exported, or a run directory)
                                             -> a transformers CLIPModel / SiglipModel directory
  --to=open_clip --input=DIR --output=OUT    a vlrep model -> OUT/open_clip_model.safetensors
                                             and OUT/open_clip_config.json (open_clip's state
                                             dict and model config)
  --open_clip_state_dict=PATH --model_cfg=CFG --output=OUT
                                             an open_clip model -> an exported vlrep model

An exported vlrep model (`Pretrained.save`: config.json + params.safetensors) is what
`vlrep.load(DIR)` reads and `config.init_from=DIR` fine-tunes. The conversions themselves
live beside it in `vlrep/weights/` (hf.py, to_hf.py, open_clip.py, to_open_clip.py); this is their
command line. A layout the target cannot express is refused with one line naming it.

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

from vlrep.runtime import paths

DIRECTIONS = ('hf', 'open_clip')


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
  cfg = json.loads(paths.read_text(path))
  # open_clip_config.json (hub checkpoints, `--to=open_clip`) nests it under 'model_cfg'.
  return cfg.get('model_cfg', cfg)


def convert(state_dict: str, model_cfg: str, output: str):
  """Converts and saves; returns the `Pretrained` model that was written to `output`."""
  paths.check(output)
  if not paths.isfile(state_dict):
    raise FileNotFoundError(f'--open_clip_state_dict={state_dict!r} not found')
  cfg = read_model_cfg(model_cfg)
  from vlrep.weights import open_clip  # pylint: disable=g-import-not-at-top
  with paths.reading_locally(state_dict) as local_state_dict:
    model = open_clip.load_open_clip(local_state_dict, cfg)
  model.save(output)
  return model


def from_hf(source: str, output: str):
  """A transformers directory -> an exported vlrep model at `output`; returns the model."""
  from vlrep.weights import hf  # pylint: disable=g-import-not-at-top
  source = os.path.expanduser(source)
  tokenizer_dir = os.path.join(os.path.abspath(output), 'tokenizer')
  if hf.has_tokenizer(source):
    hf.copy_tokenizer(source, tokenizer_dir)
  model = hf.load_hf(source, tokenizer_dir=tokenizer_dir)
  model.save(output)
  return model


def to_format(target: str, source: str, output: str) -> str:
  """A vlrep model (exported or a run) -> `target`'s format at `output`; returns `output`."""
  if target not in DIRECTIONS:
    raise ValueError(f'--to={target!r}; expected one of {DIRECTIONS}')
  from vlrep.pretrained import load  # pylint: disable=g-import-not-at-top
  model = load(os.path.expanduser(source))
  if target == 'hf':
    from vlrep.weights import to_hf  # pylint: disable=g-import-not-at-top
    return to_hf.export_hf(model.config, model.params, output)
  from vlrep.weights import to_open_clip  # pylint: disable=g-import-not-at-top
  return to_open_clip.export_open_clip(model.config, model.params, output)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  args = flags.FLAGS
  source, target = args['from'].value, args.to
  if not args.output:
    raise app.UsageError('--output is required')
  if args.open_clip_state_dict or args.model_cfg:
    if source or target or not (args.open_clip_state_dict and args.model_cfg):
      raise app.UsageError('--open_clip_state_dict and --model_cfg go together, without '
                           '--from / --to')
    model = convert(args.open_clip_state_dict, args.model_cfg, args.output)
  elif bool(source) == bool(target) or not args.input:
    raise app.UsageError('give --input and one of --from=hf, --to=hf, --to=open_clip (or '
                         '--open_clip_state_dict with --model_cfg)')
  elif any(paths.is_remote(p) for p in (args.input, args.output)):
    # transformers and open_clip directories are read and written as local files.
    raise app.UsageError('--from / --to read and write local directories only; copy a '
                         'gs:// model down first')
  elif source:
    if source != 'hf':
      raise app.UsageError(f'--from={source!r}: --from=hf, or --open_clip_state_dict with '
                           '--model_cfg for open_clip')
    model = from_hf(args.input, args.output)
  else:
    path = to_format(target, args.input, args.output)
    print(f'wrote {os.path.abspath(path)} ({target})')
    return
  count = sum(x.size for x in jax.tree.leaves(model.params))
  print(f'wrote {paths.absolute(args.output)}: {count:,} parameters; load it with '
        f'vlrep.load({args.output!r}) or fine-tune with --config.init_from={args.output}')


def define_flags() -> None:
  """Defines the command line's flags; `python -m vlrep.convert` calls it before `main`."""
  # Flags are defined only when run as a program, so tests can import this module.
  flags.DEFINE_string('from', None, "'hf': --input is a transformers CLIPModel or SiglipModel "
                      'directory to import.')
  flags.DEFINE_string('to', None, "'hf' or 'open_clip': export the vlrep model at --input.")
  flags.DEFINE_string('input', None, 'The model to convert (see --from / --to).')
  flags.DEFINE_string('open_clip_state_dict', None, 'An open_clip state dict file (as '
                      'torch.save(model.state_dict(), PATH) writes it).')
  flags.DEFINE_string('model_cfg', None, "open_clip's model config: a JSON file, or a name in "
                      "open_clip's model_configs (e.g. ViT-B-32).")
  flags.DEFINE_string('output', None, 'Directory to write to.')
