"""The CLIP BPE tokenizer (`data.tokenizer=clip_bpe`), token for token open_clip's.

OpenAI CLIP's byte-level BPE as open_clip ships it (`open_clip.tokenize`, `SimpleTokenizer`
with its default 'lower' cleaning): ftfy fixes the text, HTML entities are unescaped twice,
whitespace is collapsed and the text lowercased; a regular expression splits it into words,
whose UTF-8 bytes are mapped to printable characters and merged by rank. Rows are
`[SOT, t_1 .. t_n, EOT, 0 ...]` with SOT = 49406, EOT = 49407 and padding 0; a text too long
for the row is cut and its last kept token replaced by EOT, as open_clip does. Note that id 0
is both padding and the token '!' (open_clip's layout, which its CoCa also masks by id 0).

`clip_bpe` reads the vocabulary shipped with vlrep (`bpe_simple_vocab_16e6.txt.gz`, the file
open_clip ships, MIT licensed: see NOTICE_clip_bpe.txt beside it); `clip_bpe:PATH` reads
another merges file (`.txt` or `.txt.gz`) in the same format.

Why the merge loop is written here: the `tokenizers` library gives the same ids (checked on
20,000 random strings with the cleaning below), but it brings ~30 MB and a hub client
(huggingface-hub, hf-xet, httpx) into vlrep's core install for the 20 lines of `_merge`; the
cleaning and splitting use the same libraries as open_clip (ftfy, regex), so their results
are open_clip's by construction. Equality with `open_clip.tokenize` is tested
(tests/data/test_clip_bpe.py).
"""

from __future__ import annotations

import functools
import gzip
import html
import os
from typing import Sequence

import ftfy
import numpy as np
import regex

from vlrep.runtime import paths

DEFAULT_VOCAB = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                             'bpe_simple_vocab_16e6.txt.gz')
CONTEXT_LENGTH = 77  # every CLIP model's text length
# The merges open_clip reads: the first line is a header, then 49152 - 256 - 2 merges.
_NUM_MERGES = 49152 - 256 - 2
_SPECIAL = ('<start_of_text>', '<end_of_text>')
_WORDS = regex.compile('|'.join(_SPECIAL) +
                       r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                       regex.IGNORECASE)
_CACHE_WORDS = 1 << 17  # distinct words whose merges are remembered


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible map of the 256 byte values to printable characters."""
  printable = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) +
               list(range(ord('®'), ord('ÿ') + 1)))
  chars = printable[:]
  extra = 0
  for b in range(256):
    if b not in printable:
      printable.append(b)
      chars.append(256 + extra)
      extra += 1
  return dict(zip(printable, map(chr, chars)))


def clean(text: str) -> str:
  """open_clip's 'lower' cleaning: ftfy, HTML entities twice, one space, lowercase."""
  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  return ' '.join(text.split()).lower()


def _read_merges(path: str) -> list[tuple[str, str]]:
  if not paths.isfile(path):
    raise FileNotFoundError(f'CLIP BPE vocabulary file {path!r} not found')
  with paths.open_file(path, 'rb') as f:  # local or gs://
    data = f.read()
  if path.endswith('.gz'):
    data = gzip.decompress(data)
  lines = data.decode('utf-8').split('\n')[1:_NUM_MERGES + 1]
  merges = []
  for number, line in enumerate(lines, start=2):
    pair = tuple(line.split())
    if len(pair) != 2:
      raise ValueError(f'{path!r} line {number} is not a BPE merge "a b": {line!r}')
    merges.append(pair)
  return merges


class ClipBpeTokenizer:
  """CLIP's BPE: vocabulary 49408 (256 bytes, 256 word-final bytes, 48894 merges, SOT, EOT)."""

  pad_id = 0

  def __init__(self, path: str = DEFAULT_VOCAB):
    self.path = path
    merges = _read_merges(path)
    byte_chars = list(bytes_to_unicode().values())
    pieces = byte_chars + [c + '</w>' for c in byte_chars] + [a + b for a, b in merges]
    pieces += _SPECIAL
    self._encoder = {piece: i for i, piece in enumerate(pieces)}
    self._pieces = pieces
    self._ranks = {pair: i for i, pair in enumerate(merges)}
    self._byte_of = {c: b for b, c in bytes_to_unicode().items()}
    self.bos_id, self.eos_id = self._encoder[_SPECIAL[0]], self._encoder[_SPECIAL[1]]
    self.vocab_size = len(pieces)
    self._word_ids = functools.lru_cache(maxsize=_CACHE_WORDS)(self._merge)

  def vocabulary(self) -> tuple[list[str], list[tuple[str, str]]]:
    """(every piece by id, the merges by rank): what a transformers CLIPTokenizer's
    vocab.json and merges.txt hold (`vlrep/weights/to_hf.py` writes them)."""
    return list(self._pieces), sorted(self._ranks, key=self._ranks.get)

  def __reduce__(self):
    # Grain worker processes receive the tokenizer pickled; its caches are rebuilt there.
    return _load, (self.path,)

  def _merge(self, word: str) -> tuple[int, ...]:
    """Ids of one regex-split word (already mapped byte -> character)."""
    if word in _SPECIAL:
      return (self._encoder[word],)
    parts = list(word[:-1]) + [word[-1] + '</w>']
    while len(parts) > 1:
      # The lowest-ranked adjacent pair; ranks are unique, so there are no ties.
      rank, first, second = min((self._ranks.get(pair, _NUM_MERGES), *pair)
                                for pair in zip(parts, parts[1:]))
      if rank == _NUM_MERGES:
        break
      merged, i = [], 0
      while i < len(parts):  # every occurrence, left to right, not overlapping
        if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
          merged.append(first + second)
          i += 2
        else:
          merged.append(parts[i])
          i += 1
      parts = merged
    return tuple(self._encoder[p] for p in parts)

  def encode_ids(self, text: str) -> list[int]:
    """The ids of `text` without SOT and EOT (open_clip's `SimpleTokenizer.encode`)."""
    to_char = bytes_to_unicode()
    ids = []
    for word in _WORDS.findall(clean(text)):
      ids.extend(self._word_ids(''.join(to_char[b] for b in word.encode('utf-8'))))
    return ids

  def encode(self, texts: Sequence[str], max_len: int = CONTEXT_LENGTH) -> np.ndarray:
    """int32 [len(texts), max_len]: `[SOT, ..., EOT, 0 ...]`, cut with EOT last."""
    if max_len < 1:
      raise ValueError(f'max_len must be positive, got {max_len}')
    out = np.zeros((len(texts), max_len), np.int32)
    for row, text in enumerate(texts):
      ids = [self.bos_id] + self.encode_ids(text) + [self.eos_id]
      if len(ids) > max_len:
        ids = ids[:max_len]
        ids[-1] = self.eos_id
      out[row, :len(ids)] = ids
    return out

  def decode(self, tokens: Sequence[int] | np.ndarray) -> str:
    """Text of one row of ids: stops at the first EOT, drops SOT and out-of-range ids."""
    pieces = []
    for t in np.asarray(tokens).tolist():
      if t == self.eos_id:
        break
      # A model's output layer may be wider than the vocabulary; such ids mean nothing.
      if 0 <= t < self.vocab_size and t != self.bos_id:
        pieces.append(self._pieces[t])
    data = bytes(self._byte_of[c] for c in ''.join(pieces))
    # As open_clip's decode, less the space it leaves after the last word.
    return data.decode('utf-8', errors='replace').replace('</w>', ' ').strip()

  def __repr__(self) -> str:
    return f'ClipBpeTokenizer({self.path!r}, vocab_size={self.vocab_size})'


@functools.lru_cache(maxsize=None)
def _load(path: str) -> ClipBpeTokenizer:
  # The input pipeline and every evaluator ask for the tokenizer: read the vocabulary once.
  return ClipBpeTokenizer(path)


def get(path: str = '') -> ClipBpeTokenizer:
  """The tokenizer of `clip_bpe` (path '') or `clip_bpe:PATH`."""
  return _load(paths.local(paths.check(path)) if path else DEFAULT_VOCAB)
