"""Largest difference between open_clip and `vlrep.load_open_clip` on shipped model configs.

Builds open_clip models from the model config JSONs open_clip ships (random weights; the
CoCa decoder's output projection, which open_clip leaves uninitialised, drawn at the
width's scale), saves each state dict, loads it with vlrep and prints the max absolute
difference of the normalised image and text embeddings and, for CoCa, of the caption
logits, on two 224 px images and two captions. The last line is one JSON object.
Needs torch and open_clip_torch; minutes on a CPU (ViT-B sizes).

Run from the repository root:

  python benchmarks/open_clip_parity.py [--models=ViT-B-32,coca_ViT-B-32]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'tests', 'weights'))
import open_clip_shim  # noqa: E402,F401  (open_clip imports torchvision; see the module)
import open_clip  # noqa: E402
import torch  # noqa: E402

import vlrep  # noqa: E402


def parity(name: str) -> dict[str, float]:
  path = os.path.join(os.path.dirname(open_clip.__file__), 'model_configs', f'{name}.json')
  with open(path) as f:
    cfg = json.load(f)
  coca = 'multimodal_cfg' in cfg
  kwargs = {k: cfg[k] for k in ('embed_dim', 'vision_cfg', 'text_cfg', 'multimodal_cfg',
                                'quick_gelu') if k in cfg}
  torch.manual_seed(0)
  model = (open_clip.CoCa if coca else open_clip.CLIP)(**kwargs).eval()
  if coca:
    width = cfg['multimodal_cfg']['width']
    with torch.no_grad():
      torch.nn.init.normal_(model.text_decoder.text_projection, std=width ** -0.5)
  with tempfile.TemporaryDirectory() as tmp:
    torch.save(model.state_dict(), os.path.join(tmp, 'model.pt'))
    ours = vlrep.load_open_clip(os.path.join(tmp, 'model.pt'), cfg)
  ours.batch_size = 8
  size = cfg['vision_cfg'].get('image_size', 224)
  images = np.random.default_rng(0).normal(size=(2, 3, size, size)).astype(np.float32)
  tokens = open_clip.tokenize(['a photo of a cat', 'a diagram of a cell'],
                              context_length=cfg['text_cfg'].get('context_length', 77))
  nhwc = images.transpose(0, 2, 3, 1)
  with torch.no_grad():
    image_ref = model.encode_image(torch.from_numpy(images), normalize=True).numpy()
    text_ref = model.encode_text(tokens, normalize=True).numpy()
    out = {'image': float(np.abs(ours.encode_image(nhwc) - image_ref).max()),
           'text': float(np.abs(ours.encode_text(tokens.numpy()) - text_ref).max())}
    if coca:
      logits = model(torch.from_numpy(images), tokens, output_labels=False)['logits'].numpy()
      out['logits'] = float(np.abs(ours.caption_logits(nhwc, tokens.numpy()) - logits).max())
      out['max_abs_logit'] = float(np.abs(logits).max())
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--models', default='ViT-B-32,coca_ViT-B-32')
  args = parser.parse_args()
  results = {}
  for name in args.models.split(','):
    results[name] = parity(name)
    print(name, results[name], flush=True)
  print(json.dumps(results))


if __name__ == '__main__':
  main()
