"""CLIP BPE: open_clip's ids token for token, its truncation, vocabulary files, pipeline use."""

import gzip
import importlib.util
import os
import pickle
import random

import numpy as np
import pytest

from vlrep.data import clip_bpe
from vlrep.data.tokenizer import get_tokenizer


def _open_clip_tokenizer():
  """open_clip's own tokenizer module, loaded from its file: it needs torch, ftfy and regex
  but not the rest of open_clip (whose package import pulls in torchvision)."""
  found = importlib.util.find_spec('open_clip')
  if found is None or importlib.util.find_spec('torch') is None:
    if os.environ.get('CI'):  # CI installs both (the README's test command): never skip there
      raise ImportError('open_clip_torch and torch are needed for the parity tests')
    pytest.skip('open_clip_torch or torch not installed')
  path = os.path.join(found.submodule_search_locations[0], 'tokenizer.py')
  spec = importlib.util.spec_from_file_location('open_clip_tokenizer', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _corpus(count=300, seed=0):
  rng = random.Random(seed)
  alphabet = ('abcdefghijklmnopqrstuvwxyz' * 3 + 'ABCXYZ' + 'éüßçñÅ' + '日本語中文한국어' + '😀🐈‍⬛' +
              "'.,!?-_/()" + '0123456789' + ' ' * 12 + '\t\n')
  fragments = ['&amp;', '&lt;', '&gt;', '&quot;', '&#39;', '&amp;amp;', "'s", "'ll", "n't",
               '<start_of_text>', '<END_OF_TEXT>', 'Ã©', 'â€™']
  texts = []
  for _ in range(count):
    pieces = [rng.choice(fragments) if rng.random() < 0.1 else rng.choice(alphabet)
              for _ in range(rng.randint(0, 120))]
    texts.append(''.join(pieces))
  return texts + ['', '   ', '\n', 'A photo of a CAT.', 'two red circles and one blue cross',
                  'word ' * 100, 'supercalifragilisticexpialidocious ' * 10, '🙂' * 40,
                  'x' * 300, '12345678901234567890']


def test_ids_equal_open_clip_tokenize():
  reference = _open_clip_tokenizer()
  ours = get_tokenizer('clip_bpe')
  texts = _corpus()
  for length in (77, 8, 2):
    want = reference.tokenize(texts, context_length=length).numpy()
    got = ours.encode(texts, length)
    assert got.dtype == np.int32
    differ = np.flatnonzero((want != got).any(axis=1))
    assert not len(differ), [(texts[i], want[i].tolist(), got[i].tolist()) for i in differ[:3]]
  # The corpus does reach the cut at 77 and at 8, where EOT is the last token.
  cut = ours.encode(texts, 8)
  assert (cut[:, -1] == ours.eos_id).sum() > len(texts) // 2
  assert (ours.encode(texts, 77)[:, -1] == ours.eos_id).sum() >= 5


def test_layout_specials_and_decode():
  tok = get_tokenizer('clip_bpe')
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (49408, 0, 49406, 49407)
  # Ids as open_clip 3.3.0 gives them (a fixed reference that needs no torch).
  np.testing.assert_array_equal(tok.encode(['a photo of a cat.', 'Two RED circles &amp; a café!'],
                                           12),
                                [[49406, 320, 1125, 539, 320, 2368, 269, 49407, 0, 0, 0, 0],
                                 [49406, 1237, 736, 19411, 261, 320, 15304, 256, 49407, 0, 0, 0]])
  np.testing.assert_array_equal(tok.encode(['a photo of a cat.'], 4), [[49406, 320, 1125, 49407]])
  np.testing.assert_array_equal(tok.encode([''], 3), [[49406, 49407, 0]])
  row = tok.encode(['Two RED circles &amp; a café!'], 77)[0]
  assert tok.decode(row) == 'two red circles & a café !'  # cleaned: lowercase, entities
  assert tok.decode([49406, 320, 2368, 49407, 1125]) == 'a cat'  # stops at EOT
  assert tok.decode([49406, 320, 60000]) == 'a'  # ids past the vocabulary mean nothing
  assert get_tokenizer('clip_bpe') is tok  # the vocabulary is read once
  again = pickle.loads(pickle.dumps(tok))  # grain worker processes get it pickled
  np.testing.assert_array_equal(again.encode(['a cat'], 5), tok.encode(['a cat'], 5))


def test_vocabulary_from_a_path(tmp_path):
  plain = tmp_path / 'vocab.txt'
  with gzip.open(clip_bpe.DEFAULT_VOCAB) as f:
    plain.write_bytes(f.read())
  tok = get_tokenizer(f'clip_bpe:{plain}')
  assert tok.path == str(plain)
  texts = ['a photo of a cat', 'deux chats noirs, 日本']
  np.testing.assert_array_equal(tok.encode(texts, 16), get_tokenizer('clip_bpe').encode(texts, 16))
  with pytest.raises(FileNotFoundError, match='missing.txt.gz'):
    get_tokenizer(f'clip_bpe:{tmp_path}/missing.txt.gz')
  broken = tmp_path / 'broken.txt'
  broken.write_text('#version: 0.2\ni n\nthree words here\n')
  with pytest.raises(ValueError, match='line 3 is not a BPE merge'):
    get_tokenizer(f'clip_bpe:{broken}')


def test_pipeline_tokenizes_captions_with_it(config):
  from vlrep.data import pipeline
  config.data.tokenizer = 'clip_bpe'
  config.model.text.vocab_size = 49408
  batch = next(iter(pipeline.train_dataset(config, 0, 1)))
  tokens = batch['tokens']
  assert tokens.shape == (config.batch_size, config.data.max_text_len)
  assert (tokens[:, 0] == 49406).all() and ((tokens == 49407).sum(axis=1) == 1).all()
  tok = get_tokenizer('clip_bpe')
  for row in tokens:  # synthetic captions are plain lowercase words: they round-trip
    np.testing.assert_array_equal(tok.encode([tok.decode(row)], len(row))[0], row)
