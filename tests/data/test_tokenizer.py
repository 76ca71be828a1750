"""Byte tokenizer: layout, round trip, truncation."""

import numpy as np
import pytest

from vlrep.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, ByteTokenizer, get_tokenizer


def test_layout_bos_bytes_eos_pad():
  tokens = ByteTokenizer().encode(['ab'], 6)
  np.testing.assert_array_equal(tokens, [[BOS_ID, ord('a') + 3, ord('b') + 3, EOS_ID, PAD_ID,
                                          PAD_ID]])
  assert tokens.dtype == np.int32


@pytest.mark.parametrize('text', ['two red circles', 'Grüße, 世界 🙂', ''])
def test_any_text_round_trips(text):
  tok = ByteTokenizer()
  assert tok.decode(tok.encode([text], 64)[0]) == text


def test_too_long_text_is_cut_and_keeps_eos():
  tokens = ByteTokenizer().encode(['abcdefgh'], 5)
  assert tokens[0, -1] == EOS_ID and ByteTokenizer().decode(tokens[0]) == 'abc'


def test_unknown_tokenizer_is_named():
  with pytest.raises(ValueError, match="'wordpiece'"):
    get_tokenizer('wordpiece')
