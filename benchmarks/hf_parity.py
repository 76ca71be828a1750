"""Largest difference between transformers and vlrep at full size, both ways (and on to open_clip).

Builds transformers' default-config CLIPModel (ViT-B/32) and SiglipModel (base, patch 16,
224 px) with random weights, saves each with save_pretrained, imports it with
`vlrep.load_hf`, and prints the max absolute difference of the normalised image and text
embeddings on two 224 px images and two captions; then exports the vlrep model back with
`--to=hf`'s function, loads it with `from_pretrained` and reports whether every weight came
back bit for bit and the embeddings' difference; for CLIP it also exports to open_clip
(`--to=open_clip`) and compares open_clip's embeddings with transformers'. The last line is
one JSON object. Needs torch, transformers and open_clip_torch; minutes on a CPU.

Run from the repository root:

  python benchmarks/hf_parity.py [--models=clip,siglip]
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
import torch  # noqa: E402
import transformers  # noqa: E402

import vlrep  # noqa: E402
from vlrep.data.tokenizer import train_sentencepiece  # noqa: E402
from vlrep.weights import to_hf, to_open_clip  # noqa: E402

TEXTS = ['a photo of a cat', 'a diagram of a cell']


def _build(kind: str, path: str):
  torch.manual_seed(0)
  if kind == 'clip':
    to_hf.write_clip_tokenizer(path)
    model = transformers.CLIPModel(transformers.CLIPConfig())
  else:  # SigLIP's tokenizer is a SentencePiece model: a small one does for the ids here
    words = 'a photo of the cat diagram cell dog'.split()
    captions = [' '.join(np.random.default_rng(i).choice(words, 6)) for i in range(300)]
    sp = train_sentencepiece(captions, 30, os.path.join(path, 'sp.model'), minloglevel=2,
                             pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    transformers.SiglipTokenizer(vocab_file=sp).save_pretrained(path)
    model = transformers.SiglipModel(transformers.SiglipConfig())
  model.eval().save_pretrained(path)
  return model, transformers.AutoTokenizer.from_pretrained(path)


def _embeddings(model, tokenizer, images, length):
  ids = tokenizer(TEXTS, padding='max_length', truncation=True, max_length=length,
                  return_tensors='pt')['input_ids']
  with torch.no_grad():
    text = model.get_text_features(input_ids=ids).pooler_output
    image = model.get_image_features(pixel_values=torch.from_numpy(images)).pooler_output
  norm = lambda x: torch.nn.functional.normalize(x, dim=-1).numpy()
  return ids.numpy(), norm(text), norm(image)


def parity(kind: str) -> dict:
  images = np.random.default_rng(0).normal(size=(2, 3, 224, 224)).astype(np.float32)
  nhwc = images.transpose(0, 2, 3, 1)
  diff = lambda a, b: float(np.abs(np.asarray(a) - b).max())
  with tempfile.TemporaryDirectory() as tmp:
    model, tokenizer = _build(kind, os.path.join(tmp, 'hf'))
    ours = vlrep.load_hf(os.path.join(tmp, 'hf'))
    ours.batch_size = 8
    ids, text, image = _embeddings(model, tokenizer, images, ours.config.data.max_text_len)
    out = {'parameters': sum(p.numel() for p in model.parameters()),
           'from_hf_image': diff(ours.encode_image(nhwc), image),
           'from_hf_text': diff(ours.encode_text(ids), text)}
    back = to_hf.export_hf(ours.config, ours.params, os.path.join(tmp, 'back'))
    again = type(model).from_pretrained(back).eval()
    want = model.state_dict()
    out['to_hf_bit_identical'] = all(torch.equal(v, want[k]) for k, v in again.state_dict().items())
    _, text2, image2 = _embeddings(again, tokenizer, images, ours.config.data.max_text_len)
    out['to_hf_image'], out['to_hf_text'] = diff(ours.encode_image(nhwc), image2), \
        diff(ours.encode_text(ids), text2)
    if kind == 'clip':
      import open_clip  # pylint: disable=g-import-not-at-top
      ours.config.data.tokenizer = 'clip_bpe'  # the same BPE; open_clip has its own
      path = to_open_clip.export_open_clip(ours.config, ours.params, os.path.join(tmp, 'oc'))
      oc = open_clip.create_model(f'local-dir:{path}').eval()
      with torch.no_grad():
        out['to_open_clip_image'] = diff(oc.encode_image(torch.from_numpy(images),
                                                         normalize=True), image)
        out['to_open_clip_text'] = diff(oc.encode_text(torch.from_numpy(ids), normalize=True),
                                        text)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--models', default='clip,siglip')
  args = parser.parse_args()
  results = {}
  for kind in args.models.split(','):
    results[kind] = parity(kind)
    print(kind, results[kind], flush=True)
  print(json.dumps(results))


if __name__ == '__main__':
  main()
