"""Configs: variants, command-line overrides, locked keys, and errors that name the problem."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, load_config


def _run(module, *args):
  return subprocess.run([sys.executable, '-m', module, *args], cwd=REPO, capture_output=True,
                        text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS='cpu'))


@pytest.mark.parametrize('name, variant', [('coca', v) for v in
                                            ('tiny', 'small', 'base', 'large', 'giant')] +
                         [('clip', 'tiny'), ('siglip', 'tiny'), ('lit', 'tiny'), ('lit', 'base'),
                          ('finetune', 'classification'), ('finetune', 'caption@base')])
def test_variants_are_locked_config_dicts(name, variant):
  config = load_config(name, variant)
  assert config.is_locked
  with pytest.raises(AttributeError):
    config.batch_sise = 3


def test_command_line_overrides_reach_the_model():
  plain = _run('vlrep.describe', '--config=configs/coca.py:tiny')
  deeper = _run('vlrep.describe', '--config=configs/coca.py:tiny', '--config.model.vision.layers=6')
  assert plain.returncode == 0 and deeper.returncode == 0, plain.stderr + deeper.stderr
  plain_counts = json.loads(plain.stdout.strip().splitlines()[-1])
  deeper_counts = json.loads(deeper.stdout.strip().splitlines()[-1])
  # Two more pre-LN blocks of width 128, MLP 512: 4 attention projections, 2 MLP layers,
  # 2 LayerNorms.
  block = 4 * (128 * 128 + 128) + (128 * 512 + 512) + (512 * 128 + 128) + 2 * 2 * 128
  assert deeper_counts['image_encoder'] - plain_counts['image_encoder'] == 2 * block
  assert deeper_counts['text_unimodal'] == plain_counts['text_unimodal']


def test_misspelt_key_fails_and_names_the_key(tmp_path):
  result = _run('vlrep.train', '--config=configs/coca.py:tiny', '--config.batch_sise=64',
                f'--workdir={tmp_path}')
  assert result.returncode != 0
  assert 'batch_sise' in result.stderr
  assert not os.listdir(tmp_path)  # failed before writing anything


def test_unknown_variant_is_named():
  with pytest.raises(ValueError, match="'huge'"):
    load_config('coca', 'huge')


def test_parameter_group_overrides_parse_from_the_command_line():
  """Tuples of patterns as the README writes them; one run of vlrep.train with them is in
  the issue note (tests/test_param_groups.py and test_step.py check what they do)."""
  from absl import flags
  from ml_collections import config_flags
  argv = ['vlrep.train', f'--config={REPO}/configs/coca.py:tiny',
          "--config.optim.freeze=('image_encoder/.*',)",
          "--config.optim.lr_multipliers=('text_decoder/output_head/.*=0.1', 'logit_scale=2')",
          '--config.optim.layer_decay=0.75']
  values = flags.FlagValues()
  # The override flags are defined from the command line it is given (sys.argv by default).
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=values, sys_argv=argv)
  values(argv)
  optim = values.config.optim
  assert optim.freeze == ('image_encoder/.*',)
  assert optim.lr_multipliers == ('text_decoder/output_head/.*=0.1', 'logit_scale=2')
  assert optim.layer_decay == 0.75
