"""Tokenizers: byte layout and round trip; SentencePiece training, remapping and round trip."""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm

from conftest import REPO
from vlrep.data.tokenizer import (BOS_ID, EOS_ID, PAD_ID, ByteTokenizer, SentencePieceTokenizer,
                                  get_tokenizer, read_captions, train_sentencepiece)

# Plain lowercase words, so that SentencePiece's normalisation leaves captions unchanged.
_WORDS = ('a dog cat horse bird child woman man red blue green yellow small large old young '
          'runs sits jumps sleeps on in under near the grass table street beach river bench '
          'with ball hat umbrella two three of and').split()
_QUIET = dict(minloglevel=2)  # SentencePiece's training log is long; failures still raise


def _captions(count, seed=0):
  rng = np.random.default_rng(seed)
  return [' '.join(rng.choice(_WORDS, size=rng.integers(3, 9))) for _ in range(count)]


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('sp') / 'words.model')
  return train_sentencepiece(_captions(3000), 64, path, **_QUIET)


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


def test_unknown_tokenizer_lists_the_known_forms():
  with pytest.raises(ValueError, match='bytes, sentencepiece:PATH'):
    get_tokenizer('sentencepiece')


def test_sentencepiece_trained_on_a_list_round_trips(trained):
  tok = get_tokenizer(f'sentencepiece:{trained}')
  assert tok.vocab_size == 64 == spm.SentencePieceProcessor(model_file=trained).get_piece_size()
  assert [tok.id_to_piece(i) for i in range(4)] == ['<pad>', '<s>', '</s>', '<unk>']
  texts = _captions(20, seed=1) + ['']
  tokens = tok.encode(texts, 32)
  assert tokens.dtype == np.int32 and tokens.shape == (len(texts), 32)
  for text, row in zip(texts, tokens):
    length = 1 + int(np.argmax(row == EOS_ID))
    assert row[0] == BOS_ID and (row[length:] == PAD_ID).all()
    assert (row[1:length - 1] >= 3).all() and (row < tok.vocab_size).all()
    assert tok.decode(row) == text
  assert tok.decode(np.array([BOS_ID, *tokens[0, 1:], tok.vocab_size + 5])) == texts[0]


def test_sentencepiece_cuts_too_long_text_and_keeps_eos(trained):
  tok = get_tokenizer(f'sentencepiece:{trained}')
  text = ' '.join(_WORDS)
  full = tok.encode([text], 128)[0]
  cut = tok.encode([text], 8)[0]
  assert cut[-1] == EOS_ID and (cut[:-1] == full[:7]).all()
  assert text.startswith(tok.decode(cut)) and len(tok.decode(cut)) < len(text)


def test_sentencepiece_batches_match_single_captions(trained):
  tok = get_tokenizer(f'sentencepiece:{trained}')
  texts = _captions(100, seed=2)
  np.testing.assert_array_equal(tok.encode(texts, 24),
                                np.concatenate([tok.encode([t], 24) for t in texts]))


def test_sentencepiece_trained_on_the_synthetic_source_round_trips(tmp_path):
  captions = list(read_captions('synthetic', max_sentences=2000))
  assert len(captions) == 2000
  path = train_sentencepiece(captions, 128, str(tmp_path / 'synthetic.model'),
                             model_type='bpe', **_QUIET)
  tok = get_tokenizer(f'sentencepiece:{path}')
  # The synthetic captions use ~30 words: the vocabulary may come out below what was asked.
  assert 4 < tok.vocab_size <= 128
  texts = list(read_captions('synthetic:test', max_sentences=10))
  for text, row in zip(texts, tok.encode(texts, 48)):
    assert row[0] == BOS_ID and tok.decode(row) == text


@pytest.mark.parametrize('specials, extra', [
    (dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1), 1),  # SentencePiece's defaults
    (dict(pad_id=0, eos_id=1, unk_id=2, bos_id=-1), 1),  # T5's
    (dict(unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1), 3),
    (dict(unk_id=5, pad_id=3, bos_id=4, eos_id=0), 0),
])
def test_other_special_ids_are_remapped_to_our_layout(tmp_path, specials, extra):
  path = train_sentencepiece(_captions(1000), 100, str(tmp_path / 'other.model'),
                             **specials, **_QUIET)
  sp = spm.SentencePieceProcessor(model_file=path)
  tok = SentencePieceTokenizer(path)
  assert tok.vocab_size == sp.get_piece_size() + extra
  # Every piece but PAD, BOS and EOS has its own id from 3 on.
  specials_present = {sp.id_to_piece(i) for i in (sp.pad_id(), sp.bos_id(), sp.eos_id())
                      if i >= 0}
  ours = [tok.id_to_piece(i) for i in range(3, tok.vocab_size)]
  assert len(set(ours)) == len(ours)
  assert set(ours) == {sp.id_to_piece(i) for i in range(sp.get_piece_size())} - specials_present
  texts = _captions(10, seed=3)
  tokens = tok.encode(texts, 40)
  for text, row in zip(texts, tokens):
    length = 1 + int(np.argmax(row == EOS_ID))
    assert row[0] == BOS_ID and (row[length:] == PAD_ID).all() and (row[1:length - 1] >= 3).all()
    assert tok.decode(row) == text
    pieces = sp.encode(text, out_type=str)
    assert [tok.id_to_piece(i) for i in row[1:length - 1]] == pieces


def test_missing_or_corrupt_model_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match='/missing/model'):
    get_tokenizer('sentencepiece:/missing/model')
  corrupt = tmp_path / 'corrupt.model'
  corrupt.write_bytes(b'not a model')
  with pytest.raises(ValueError, match='corrupt.model'):
    get_tokenizer(f'sentencepiece:{corrupt}')


def test_sentencepiece_models_are_loaded_once_per_path(trained):
  assert get_tokenizer(f'sentencepiece:{trained}') is get_tokenizer(f'sentencepiece:{trained}')


def test_text_file_captions_are_its_non_empty_lines(tmp_path):
  path = tmp_path / 'captions.txt'
  path.write_text('a red dog\n\n  two cats  \n', encoding='utf-8')
  assert list(read_captions(str(path))) == ['a red dog', 'two cats']
  with pytest.raises(FileNotFoundError):
    read_captions(str(tmp_path / 'missing.txt'))


def test_trainer_command_line(tmp_path):
  output = tmp_path / 'cli.model'
  result = subprocess.run(
      [sys.executable, '-m', 'vlrep.data.tokenizer', '--input=synthetic', '--vocab_size=128',
       '--max_sentences=2000', f'--output={output}'],
      cwd=tmp_path, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get('PYTHONPATH', '')])))
  assert result.returncode == 0, result.stderr[-2000:]
  tok = SentencePieceTokenizer(str(output))
  assert '2000 sentences read' in result.stdout
  assert (f'--config.data.tokenizer=sentencepiece:{output} '
          f'--config.model.text.vocab_size={tok.vocab_size}') in result.stdout
  text = 'two small red circles and one large blue square'
  assert tok.decode(tok.encode([text], 32)[0]) == text


def test_sentencepiece_tokenizer_pickles(trained):
  # grain's worker processes receive the pipeline's transforms, tokenizer included, pickled.
  tok = get_tokenizer(f'sentencepiece:{trained}')
  copy = pickle.loads(pickle.dumps(tok))
  text = 'a red dog sits on the grass'
  np.testing.assert_array_equal(copy.encode([text], 16), tok.encode([text], 16))
  assert copy.vocab_size == tok.vocab_size and copy.decode(tok.encode([text], 16)[0]) == text


def test_tokenizer_files_on_a_bucket(bucket):
  """Captions read from, a SentencePiece model trained to, and models loaded from gs://; a
  transformers directory there is refused by name (transformers reads local folders only)."""
  from vlrep.data import clip_bpe  # pylint: disable=g-import-not-at-top
  from vlrep.runtime import paths  # pylint: disable=g-import-not-at-top
  paths.write_text(f'{bucket}/captions.txt', '\n'.join(_captions(500)) + '\n')
  assert list(read_captions(f'{bucket}/captions.txt')) == _captions(500)
  model = train_sentencepiece(read_captions(f'{bucket}/captions.txt'), 48,
                              f'{bucket}/sp/words.model', **_QUIET)
  assert paths.listdir(f'{bucket}/sp') == ['words.model'] and not os.path.exists('gs:')
  texts = ['a red dog runs on the grass', 'two small birds']
  remote = get_tokenizer(f'sentencepiece:{model}')
  with paths.reading_locally(model) as local:
    np.testing.assert_array_equal(remote.encode(texts, 16),
                                  SentencePieceTokenizer(local).encode(texts, 16))
  paths.upload(clip_bpe.DEFAULT_VOCAB, f'{bucket}/bpe.txt.gz')
  np.testing.assert_array_equal(get_tokenizer(f'clip_bpe:{bucket}/bpe.txt.gz').encode(texts, 16),
                                get_tokenizer('clip_bpe').encode(texts, 16))
  with pytest.raises(ValueError, match='copy it down first'):
    get_tokenizer(f'hf:{bucket}/tokenizer')
  with pytest.raises(paths.UnsupportedPathError, match='s3://'):
    get_tokenizer('sentencepiece:s3://b/words.model')
