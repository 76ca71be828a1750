"""Parameter counts: parts add up; coca.py:base/large/giant against the paper's Table 1;
the same per part with `model.scan_layers`."""

import pytest

from conftest import load_config, shrink
from vlrep.tools.describe import parameter_counts


@pytest.mark.parametrize('variant, image_m, text_m, total_m, tolerance', [
    # CoCa Table 1: image encoder / text decoder / total, in millions. The paper's totals are
    # image + text, without the two attentional poolers, and so are ours below.
    ('base', 86, 297, 383, 0.01),
    ('large', 303, 484, 787, 0.01),
    # Giant: the image encoder matches; our text decoder (18+18 layers, MLP 5632, 64k vocab,
    # untied head) counts 1.18B where the table rounds to 1.1B.
    ('giant', 1000, 1100, 2100, 0.08),
])
def test_paper_sizes(variant, image_m, text_m, total_m, tolerance):
  config = load_config('coca', variant)
  # Scanned stacks trace one block each: the same counts (test below), in a fraction of the time.
  config.model.scan_layers = True
  counts = parameter_counts(config)
  text = counts['text_unimodal'] + counts['text_multimodal'] + counts['heads']
  assert counts['image_encoder'] / 1e6 == pytest.approx(image_m, rel=0.015)
  assert text / 1e6 == pytest.approx(text_m, rel=tolerance)
  assert (counts['image_encoder'] + text) / 1e6 == pytest.approx(total_m, rel=tolerance)


def test_parts_sum_to_total(config):
  counts = parameter_counts(config)
  assert counts['total'] == sum(v for k, v in counts.items() if k != 'total')
  assert all(v > 0 for v in counts.values())


@pytest.mark.parametrize('name', ['coca', 'clip'])
def test_counts_do_not_depend_on_scan_layers(name):
  config = shrink(load_config(name))
  config.model.vision.layers = 2
  config.model.text.update(unimodal_layers=2, multimodal_layers=2 if name == 'coca' else 0)
  per_layer = parameter_counts(config)
  config.model.scan_layers = True
  assert parameter_counts(config) == per_layer
