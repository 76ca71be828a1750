"""data.tokenizer=hf:DIR: the ids of transformers' own tokenizer for the same directory, on a
random-unicode corpus, for SigLIP's SentencePiece tokenizer (spiece.model, no tokenizer.json),
a Gemma tokenizer.json (SigLIP 2's) and CLIP's tokenizer.json; vocab files built here."""

import pickle
import random

import numpy as np
import pytest

transformers = pytest.importorskip('transformers')

from vlrep.data import clip_bpe  # noqa: E402
from vlrep.data.tokenizer import get_tokenizer, train_sentencepiece  # noqa: E402

_ALPHABET = ('abcdefghijklmnopqrstuvwxyz' * 3 + 'ABCXYZ' + 'éüßçñÅ' + '日本語中文한국어' + '😀🐈‍⬛' +
             "'.,!?-_/()" + '0123456789' + ' ' * 12 + '\t\n\u3000\u2581')
_FRAGMENTS = ['</s>', '<unk>', '<pad>', '<s>', '<bos>', '<eos>', '<|endoftext|>', ' </s> ',
              '&amp;', "'s", "n't", 'dog', 'red cat', 'Ã©']


def corpus(count=200, seed=0):
  rng = random.Random(seed)
  texts = [''.join(rng.choice(_FRAGMENTS) if rng.random() < 0.1 else rng.choice(_ALPHABET)
                   for _ in range(rng.randint(0, 80))) for _ in range(count)]
  return texts + ['', '   ', '\n', 'A photo of a CAT.', '</s>', ' </s>x', 'word ' * 100,
                  '🙂' * 40, 'x' * 300]


def sentencepiece_model(path, **options):
  """A small unigram model over the corpus's characters (some pieces left out: UNKs)."""
  captions = [t for t in corpus(600, seed=1) if t.strip()]
  captions += ['a dog runs on the grass', 'two red cats', 'a photo of a cat'] * 100
  return train_sentencepiece(captions, 200, str(path), minloglevel=2, character_coverage=0.98,
                             **options)


@pytest.fixture(scope='module')
def siglip_dir(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('siglip_tok')
  # SigLIP's layout: pad 0 unused, EOS 1 (also its pad token), UNK 2; no BOS.
  model = sentencepiece_model(tmp / 'sp.model', pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
  tok = transformers.SiglipTokenizer(vocab_file=model)
  tok.save_pretrained(tmp / 'dir')
  return str(tmp / 'dir')


def gemma_tokenizer(tmp):
  """A tokenizer.json tokenizer as SigLIP 2's Gemma one is: SentencePiece pieces (a unigram
  model here), BOS first, padded on the left."""
  import sentencepiece as spm
  import tokenizers
  from tokenizers import decoders, models, normalizers, pre_tokenizers, processors
  sp = spm.SentencePieceProcessor(model_file=sentencepiece_model(
      tmp / 'sp.model', pad_id=0, eos_id=1, bos_id=2, unk_id=3))
  pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
  backend = tokenizers.Tokenizer(models.Unigram(pieces, unk_id=3))
  backend.normalizer = normalizers.Replace(' ', '\u2581')
  backend.pre_tokenizer = pre_tokenizers.Split(' ', 'merged_with_previous')
  backend.decoder = decoders.Replace('\u2581', ' ')
  backend.post_processor = processors.TemplateProcessing(single='<s> $A', special_tokens=[('<s>', 2)])
  backend.add_special_tokens(['<pad>', '</s>', '<s>', '<unk>'])
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, bos_token='<s>', eos_token='</s>', pad_token='<pad>',
      unk_token='<unk>', padding_side='left')


@pytest.fixture(scope='module')
def gemma_dir(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('gemma_tok')
  gemma_tokenizer(tmp).save_pretrained(tmp / 'dir')
  return str(tmp / 'dir')


def clip_files(directory, pad_token='<|endoftext|>'):
  """CLIP's tokenizer files (vocab.json, merges.txt) from vlrep's own CLIP BPE vocabulary."""
  from vlrep.weights import to_hf
  to_hf.write_clip_tokenizer(directory, pad_token=pad_token)
  return str(directory)


def _check_equal(directory, lengths, texts=None):
  ours = get_tokenizer(f'hf:{directory}')
  theirs = transformers.AutoTokenizer.from_pretrained(directory)
  texts = corpus() if texts is None else texts
  for length in lengths:
    want = np.asarray(theirs(texts, padding='max_length', truncation=True,
                             max_length=length)['input_ids'])
    got = ours.encode(texts, length)
    assert got.dtype == np.int32 and got.shape == want.shape
    differ = np.flatnonzero((want != got).any(axis=1))
    assert not len(differ), [(texts[i], want[i].tolist(), got[i].tolist()) for i in differ[:3]]
  return ours, theirs


@pytest.mark.filterwarnings('ignore:This sequence already has')
def test_siglip_sentencepiece_ids_equal_transformers(siglip_dir):
  ours, theirs = _check_equal(siglip_dir, (64, 8, 2))
  assert (ours.pad_id, ours.eos_id) == (theirs.pad_token_id, theirs.eos_token_id) == (1, 1)
  # The corpus reaches the unknown pieces and the cut.
  tokens = ours.encode(corpus(), 8)
  assert (tokens == theirs.unk_token_id).any() and (tokens[:, -1] == 1).sum() > 50
  assert ours.decode(ours.encode(['two red cats'], 16)[0]) == 'two red cats'
  again = pickle.loads(pickle.dumps(ours))  # as grain hands it to worker processes
  np.testing.assert_array_equal(again.encode(corpus()[:20], 8), tokens[:20])


def test_gemma_tokenizer_json_ids_equal_transformers(gemma_dir):
  ours, theirs = _check_equal(gemma_dir, (64, 8))
  assert ours.pad_id == theirs.pad_token_id and ours.bos_id == theirs.bos_token_id


@pytest.mark.parametrize('pad_token', ['!', '<|endoftext|>'])
def test_clip_tokenizer_json_ids_equal_transformers(tmp_path, pad_token):
  directory = clip_files(tmp_path, pad_token)
  theirs = transformers.AutoTokenizer.from_pretrained(directory)
  theirs.save_pretrained(tmp_path / 'fast')  # writes tokenizer.json
  ours, _ = _check_equal(str(tmp_path / 'fast'), (77, 8))
  assert (ours.bos_id, ours.eos_id) == (49406, 49407)


def test_clip_tokenizer_files_match_vlrep_clip_bpe_on_plain_text(tmp_path):
  """vlrep's clip_bpe (open_clip's cleaning: ftfy, HTML entities) and transformers'
  CLIPTokenizer agree where neither cleaning changes the text, but for the padding (0 in
  vlrep, EOT there), which a CLIP text tower never reads."""
  theirs = transformers.AutoTokenizer.from_pretrained(clip_files(tmp_path))
  texts = ['a photo of a cat', 'Two RED circles, one blue cross!', '', 'word ' * 100,
           'naïve café 日本語 😀', "it's 12:30"]
  want = np.asarray(theirs(texts, padding='max_length', truncation=True, max_length=16)['input_ids'])
  ours = get_tokenizer('clip_bpe').encode(texts, 16)
  after_eot = np.cumsum(ours == 49407, axis=1) - (ours == 49407) > 0
  assert after_eot.sum() > 30
  np.testing.assert_array_equal(np.where(after_eot, 49407, ours), want)


def test_bad_directories_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match='neither tokenizer.json nor spiece.model'):
    get_tokenizer(f'hf:{tmp_path}')
  (tmp_path / 'spiece.model').write_bytes(b'')
  (tmp_path / 'tokenizer_config.json').write_text('{"tokenizer_class": "T5Tokenizer"}')
  with pytest.raises(NotImplementedError, match="tokenizer_class='T5Tokenizer'"):
    get_tokenizer(f'hf:{tmp_path}')
