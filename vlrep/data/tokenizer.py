"""Tokenizers: text <-> int32 token ids with the fixed layout the model expects.

Every tokenizer produces rows `[BOS, t_1 .. t_n, EOS, PAD ...]` of a fixed length, with
PAD = 0, so that the caption loss can ignore padding by id alone and the text decoder can
append its [CLS] after the last position. The default, `bytes`, needs no vocabulary file:
it maps UTF-8 bytes to ids, so any text in any script round-trips exactly. Later
tokenizers (SentencePiece, CLIP BPE) plug in behind `get_tokenizer(spec)`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
_NUM_SPECIAL = 3


class ByteTokenizer:
  """UTF-8 bytes shifted past the special ids; vocabulary of 259 ids."""

  vocab_size = 256 + _NUM_SPECIAL

  def encode(self, texts: Sequence[str], max_len: int) -> np.ndarray:
    """Returns int32 [len(texts), max_len]; too long text is cut, keeping EOS last."""
    out = np.zeros((len(texts), max_len), np.int32)
    for row, text in enumerate(texts):
      ids = np.frombuffer(text.encode('utf-8'), np.uint8).astype(np.int32)
      ids = np.concatenate([[BOS_ID], ids[:max_len - 2] + _NUM_SPECIAL, [EOS_ID]])
      out[row, :len(ids)] = ids
    return out

  def decode(self, tokens: Sequence[int] | np.ndarray) -> str:
    """Text of one row of ids: stops at the first EOS, drops BOS and padding."""
    data = bytearray()
    for t in np.asarray(tokens).tolist():
      if t == EOS_ID:
        break
      if t >= _NUM_SPECIAL:
        data.append(t - _NUM_SPECIAL)
    # A model can emit a cut multi-byte sequence; show it rather than fail.
    return data.decode('utf-8', errors='replace')


def get_tokenizer(spec: str) -> ByteTokenizer:
  """The tokenizer named by `config.data.tokenizer`."""
  if spec == 'bytes':
    return ByteTokenizer()
  raise ValueError(f'Unknown data.tokenizer {spec!r}; known: bytes')
