"""`data.tokenizer=hf:DIR`: a Hugging Face tokenizer directory, ids as `transformers` gives them.

Rows are what `tokenizer(texts, padding='max_length', truncation=True, max_length=L)` returns
in `transformers` for the directory's tokenizer, so a model imported from `transformers`
reads the ids it was trained on (SigLIP's, for instance, end with EOS and pad with EOS = 1,
no BOS; CLIP's start with BOS). Two kinds of directory:

- `tokenizer.json` (every fast tokenizer: CLIP's, SigLIP 2's Gemma tokenizer): read with the
  `tokenizers` library, its own normalizer, pre-tokenizer, model and post-processor, with
  `transformers`' truncation and padding switched on;
- `spiece.model` with `tokenizer_class` SiglipTokenizer (SigLIP's checkpoints ship no
  tokenizer.json): SentencePiece, after the text canonicalisation `SiglipTokenizer` does
  (lowercase, ASCII punctuation removed, whitespace collapsed; special tokens split off
  first). Written here because no library carries that Python-side logic; tested for equal
  ids with `transformers.SiglipTokenizer` (tests/data/test_hf_tokenizer.py).

Unlike vlrep's own tokenizers, PAD need not be 0 and there may be no BOS (`bos_id` is then
the EOS id): such models are contrastive (no captioning), which reads neither.
"""

from __future__ import annotations

import json
import os
import re
import string
from typing import Sequence

import numpy as np

_UNDERLINE = '\u2581'  # SentencePiece's word-boundary mark
_PUNCTUATION = str.maketrans('', '', string.punctuation)


def _token_text(token) -> str | None:
  """A tokenizer_config.json token entry (a string or an AddedToken dict) -> its text."""
  return token.get('content') if isinstance(token, dict) else token


def _read_config(path: str) -> dict:
  config = {}
  for name in ('special_tokens_map.json', 'tokenizer_config.json'):
    file = os.path.join(path, name)
    if os.path.isfile(file):
      with open(file) as f:
        config.update(json.load(f))
  return config


class _FastBackend:
  """tokenizer.json through the `tokenizers` library."""

  def __init__(self, path: str, config: dict):
    del config  # the tokenizer.json holds everything this backend needs
    import tokenizers  # pylint: disable=g-import-not-at-top  (only hf: tokenizers need it)
    self._tok = tokenizers.Tokenizer.from_file(os.path.join(path, 'tokenizer.json'))
    self._tok.no_padding()
    self._tok.no_truncation()
    self.token_id = self._tok.token_to_id
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, texts: list[str], max_len: int, cut_left: bool) -> list[list[int]]:
    self._tok.enable_truncation(max_len, direction='left' if cut_left else 'right')
    return [e.ids for e in self._tok.encode_batch(texts)]

  def decode(self, ids: list[int]) -> str:
    return self._tok.decode(ids, skip_special_tokens=True)


class _SiglipBackend:
  """spiece.model with `transformers.SiglipTokenizer`'s text handling (module docstring)."""

  def __init__(self, path: str, config: dict):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    self._sp = spm.SentencePieceProcessor()
    with open(os.path.join(path, 'spiece.model'), 'rb') as f:
      proto = f.read()
    if not config.get('legacy', True):  # SentencePieceBackend: no dummy prefix then
      from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top
      model = sentencepiece_model_pb2.ModelProto.FromString(proto)
      model.normalizer_spec.add_dummy_prefix = False
      proto = model.SerializeToString()
    self._sp.LoadFromSerializedProto(proto)
    self.lower = bool(config.get('do_lower_case', True))
    self.eos = _token_text(config.get('eos_token', '</s>'))
    self.unk = _token_text(config.get('unk_token', '<unk>'))
    pad = _token_text(config.get('pad_token', '</s>'))
    self.specials = sorted({t for t in (self.eos, self.unk, pad) if t}, key=len, reverse=True)
    self._split = re.compile('(' + '|'.join(map(re.escape, self.specials)) + ')')
    self._unk_length = len(self._sp.encode(self.unk))
    self.token_id = self._sp.piece_to_id
    self.vocab_size = self._sp.get_piece_size()

  def _canonical(self, text: str) -> str:
    if self.lower:
      text = text.lower()
    return re.sub(r'\s+', ' ', text.translate(_PUNCTUATION)).strip()

  def _pieces(self, text: str) -> list[str]:
    # SiglipTokenizer prefixes the boundary mark, splits off special tokens (which strip the
    # whitespace beside them), then encodes each piece behind an UNK that it drops again.
    parts = self._split.split(_UNDERLINE + text.replace(_UNDERLINE, ' '))
    for i, part in enumerate(parts):
      if part in self.specials:
        if i + 1 < len(parts) and parts[i + 1]:
          parts[i + 1] = parts[i + 1].lstrip()
        if i > 0 and parts[i - 1]:
          parts[i - 1] = parts[i - 1].rstrip()
    pieces = []
    for part in parts:
      if part in self.specials:
        pieces.append(part)
      elif part:
        encoded = self._sp.encode(self.unk + self._canonical(part), out_type=str)
        pieces += encoded[self._unk_length:] if len(encoded) >= self._unk_length else encoded
    if len(pieces) > 1 and pieces[0] == _UNDERLINE and pieces[1] in self.specials:
      pieces = pieces[1:]
    return pieces

  def encode(self, texts: list[str], max_len: int, cut_left: bool) -> list[list[int]]:
    eos = self._sp.piece_to_id(self.eos)
    rows = []
    for text in texts:
      ids = [self._sp.piece_to_id(p) for p in self._pieces(text)]
      ids = ids[len(ids) - max_len + 1:] if cut_left and len(ids) >= max_len else \
          ids[:max_len - 1]
      rows.append(ids if ids and ids[-1] == eos else ids + [eos])
    return rows

  def decode(self, ids: list[int]) -> str:
    return self._sp.decode([i for i in ids if self._sp.id_to_piece(i) not in self.specials])


class HFTokenizer:
  """A transformers tokenizer directory (module docstring): `encode`, `decode`, the ids."""

  def __init__(self, path: str):
    self.path = path
    if not os.path.isdir(path):
      raise FileNotFoundError(f'data.tokenizer=hf:{path}: no such directory')
    config = _read_config(path)
    if os.path.isfile(os.path.join(path, 'tokenizer.json')):
      self._backend = _FastBackend(path, config)
    elif os.path.isfile(os.path.join(path, 'spiece.model')):
      kind = config.get('tokenizer_class', 'SiglipTokenizer')
      if kind != 'SiglipTokenizer':
        raise NotImplementedError(f'data.tokenizer=hf:{path}: tokenizer_class={kind!r} without '
                                  'a tokenizer.json; only SiglipTokenizer is read from '
                                  'spiece.model')
      self._backend = _SiglipBackend(path, config)
    else:
      raise FileNotFoundError(f'data.tokenizer=hf:{path}: neither tokenizer.json nor '
                              'spiece.model there')
    ids = {}
    for name in ('pad', 'bos', 'eos'):
      text = _token_text(config.get(f'{name}_token'))
      ids[name] = None if text is None else self._backend.token_id(text)
    if ids['pad'] is None:
      raise ValueError(f'data.tokenizer=hf:{path}: the tokenizer has no pad_token, so it '
                       "cannot pad to max_length as padding='max_length' needs")
    self.pad_id = ids['pad']
    self.eos_id = ids['eos'] if ids['eos'] is not None else self.pad_id
    self.bos_id = ids['bos'] if ids['bos'] is not None else self.eos_id
    self.vocab_size = self._backend.vocab_size
    self._left = config.get('padding_side', 'right') == 'left'
    self._cut_left = config.get('truncation_side', 'right') == 'left'

  def encode(self, texts: Sequence[str], max_len: int) -> np.ndarray:
    """int32 [len(texts), max_len]: transformers' ids, truncated and padded to max_len."""
    out = np.full((len(texts), max_len), self.pad_id, np.int32)
    for row, ids in enumerate(self._backend.encode(list(texts), max_len, self._cut_left)):
      ids = ids[:max_len]
      if self._left:
        out[row, max_len - len(ids):] = ids
      else:
        out[row, :len(ids)] = ids
    return out

  def decode(self, tokens: Sequence[int] | np.ndarray) -> str:
    """Text of one row of ids, up to its first EOS, special tokens dropped."""
    ids = []
    for t in np.asarray(tokens).tolist():
      if t == self.eos_id:
        break
      if 0 <= t < self.vocab_size:
        ids.append(int(t))
    return self._backend.decode(ids)

  def __reduce__(self):
    # Grain worker processes receive the tokenizer pickled: they read the directory again.
    return HFTokenizer, (self.path,)

  def __repr__(self) -> str:
    return f'HFTokenizer({self.path!r}, vocab_size={self.vocab_size})'
