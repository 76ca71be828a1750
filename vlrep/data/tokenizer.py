"""Tokenizers: text <-> int32 token ids with the fixed layout the model expects.

Every tokenizer produces rows `[BOS, t_1 .. t_n, EOS, PAD ...]` of a fixed length with
PAD = 0, so that the caption loss can ignore padding by id alone and the text decoder can
append its [CLS] after the last position. vlrep's own layout has BOS = 1 and EOS = 2; a
tokenizer names its ids in `pad_id`, `bos_id` and `eos_id` (CLIP's BPE has its own).
`get_tokenizer(spec)` maps `config.data.tokenizer` to one:

  bytes               UTF-8 bytes; needs no vocabulary file and any text in any script
                      round-trips exactly. The default.
  sentencepiece:PATH  a SentencePiece model (the CoCa paper uses a 64k one). Models from
                      this module's trainer have PAD/BOS/EOS at 0/1/2 already; others (the
                      SentencePiece defaults, T5's) are remapped to that layout.
  clip_bpe[:PATH]     OpenAI CLIP's BPE, token for token open_clip's tokenizer (BOS 49406,
                      EOS 49407; `vlrep/data/clip_bpe.py`); PATH: another merges file.
  hf:DIR              a Hugging Face tokenizer directory (tokenizer.json, or SigLIP's
                      spiece.model), ids as `transformers` gives them
                      (`vlrep/data/hf_tokenizer.py`; PAD may differ from 0 there).

Run as a program, this module trains a SentencePiece model on a source's captions:

  python -m vlrep.data.tokenizer --input=SOURCE --vocab_size=N [--output=PATH]

SOURCE is a data source string as in `config.data.train` (`synthetic`, `arrayrecord:PATH`,
...) or a text file with one caption per line (`*.txt`).
"""

from __future__ import annotations

import functools
import io
import os
import time
from typing import Any, Iterable, Iterator, Protocol, Sequence

import numpy as np
import sentencepiece as spm
from absl import app, flags, logging

from vlrep.runtime import paths

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
_NUM_SPECIAL = 3
_SPECIAL_PIECES = ('<pad>', '<s>', '</s>')
# Ids of the SentencePiece models this module trains: our three specials, then UNK.
_TRAINED_UNK_ID = 3
DEFAULT_MAX_SENTENCES = 2_000_000
# Only captions are read when training, but sources draw or decode an image per example:
# a small one keeps that cheap.
_CAPTION_IMAGE_SIZE = 32
SPECS = ('bytes', 'sentencepiece:PATH', 'clip_bpe[:PATH]', 'hf:DIR')
_MIN_BATCH_ENCODE = 64


class Tokenizer(Protocol):
  """What the input pipeline, the trainer and the evaluators use of a tokenizer."""

  pad_id: int  # 0 for every tokenizer here
  bos_id: int
  eos_id: int

  @property
  def vocab_size(self) -> int:
    """Number of ids: every id that `encode` returns is below it."""

  def encode(self, texts: Sequence[str], max_len: int) -> np.ndarray:
    """int32 [len(texts), max_len] rows `[BOS, t_1 .. t_n, EOS, PAD ...]`."""

  def decode(self, tokens: Sequence[int] | np.ndarray) -> str:
    """Text of one row of ids, up to its first EOS."""


class ByteTokenizer:
  """UTF-8 bytes shifted past the special ids; vocabulary of 259 ids."""

  vocab_size = 256 + _NUM_SPECIAL
  pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID

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
      # A model's output layer may be wider than the vocabulary; such ids mean nothing.
      if _NUM_SPECIAL <= t < self.vocab_size:
        data.append(t - _NUM_SPECIAL)
    # A model can emit a cut multi-byte sequence; show it rather than fail.
    return data.decode('utf-8', errors='replace')


class SentencePieceTokenizer:
  """A SentencePiece model, its ids remapped to this module's layout where they differ.

  The model's PAD, BOS and EOS pieces, those it has, take ids 0, 1 and 2; every other piece
  keeps its order and takes the next free id from 3. For models from `train_sentencepiece`
  (pad 0, bos 1, eos 2, unk 3) this is the identity. A model that lacks some of those
  pieces (SentencePiece's defaults have no PAD, T5's model no BOS) still gets all three
  ids, so `vocab_size` is its number of pieces plus the special ids it lacks.
  """

  pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID

  def __init__(self, path: str):
    self.path = path
    if not paths.isfile(path):
      raise FileNotFoundError(f'SentencePiece model file {path!r} not found')
    with paths.open_file(path, 'rb') as f:  # local or gs://
      proto = f.read()
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(proto)
    except RuntimeError as e:
      raise ValueError(f'{path!r} is not a valid SentencePiece model: {e}') from e
    num_pieces = self._sp.GetPieceSize()
    specials = {self._sp.pad_id(): PAD_ID, self._sp.bos_id(): BOS_ID,
                self._sp.eos_id(): EOS_ID}
    specials.pop(-1, None)  # -1: the model has no such piece
    others = [i for i in range(num_pieces) if i not in specials]
    self.vocab_size = _NUM_SPECIAL + len(others)
    self._to_ours = np.empty(num_pieces, np.int32)
    for piece_id, our_id in specials.items():
      self._to_ours[piece_id] = our_id
    self._to_ours[others] = np.arange(_NUM_SPECIAL, self.vocab_size, dtype=np.int32)
    self._from_ours = np.full(self.vocab_size, -1, np.int32)
    self._from_ours[self._to_ours] = np.arange(num_pieces, dtype=np.int32)

  def encode(self, texts: Sequence[str], max_len: int) -> np.ndarray:
    """Returns int32 [len(texts), max_len]; too long text is cut, keeping EOS last."""
    if max_len < 2:
      raise ValueError(f'max_len {max_len} leaves no room for BOS and EOS')
    out = np.zeros((len(texts), max_len), np.int32)
    out[:, 0] = BOS_ID
    texts = list(texts)
    if len(texts) >= _MIN_BATCH_ENCODE:
      # One call encodes the whole list on the library's own threads.
      rows = self._sp.encode(texts, out_type=int, add_bos=False, add_eos=False)
    else:
      # The list call spends ~80 us starting its thread pool, some 30 times the cost of
      # encoding one caption, which is what the input pipeline asks for.
      rows = [self._sp.encode(text, out_type=int, add_bos=False, add_eos=False)
              for text in texts]
    for row, ids in enumerate(rows):
      ids = self._to_ours[ids[:max_len - 2]]
      out[row, 1:len(ids) + 1] = ids
      out[row, len(ids) + 1] = EOS_ID
    return out

  def decode(self, tokens: Sequence[int] | np.ndarray) -> str:
    """Text of one row of ids: stops at the first EOS, drops BOS and padding."""
    ids = []
    for t in np.asarray(tokens).tolist():
      if t == EOS_ID:
        break
      # A model's output layer may be wider than the vocabulary; such ids mean nothing.
      if _NUM_SPECIAL <= t < self.vocab_size:
        ids.append(int(self._from_ours[t]))
    return self._sp.decode(ids)

  def id_to_piece(self, token: int) -> str:
    """The piece of one of our ids (`<pad>`, `<s>`, `</s>` for the specials)."""
    if not 0 <= token < self.vocab_size:
      raise IndexError(f'id {token} outside the vocabulary of {self.vocab_size}')
    if token < _NUM_SPECIAL:
      return _SPECIAL_PIECES[token]
    return self._sp.id_to_piece(int(self._from_ours[token]))

  def __repr__(self) -> str:
    return f'SentencePieceTokenizer({self.path!r}, vocab_size={self.vocab_size})'


@functools.lru_cache(maxsize=None)
def _load_sentencepiece(path: str) -> SentencePieceTokenizer:
  # The input pipeline and every evaluator ask for the tokenizer: parse the model once.
  return SentencePieceTokenizer(path)


@functools.lru_cache(maxsize=None)
def _load_hf(path: str) -> Tokenizer:
  from vlrep.data import hf_tokenizer  # pylint: disable=g-import-not-at-top
  return hf_tokenizer.HFTokenizer(path)


def get_tokenizer(spec: str) -> Tokenizer:
  """The tokenizer named by `config.data.tokenizer`: `bytes`, `sentencepiece:PATH`,
  `clip_bpe[:PATH]` or `hf:DIR`."""
  if spec == 'bytes':
    return ByteTokenizer()
  name, _, path = spec.partition(':')
  if name == 'sentencepiece' and path:
    return _load_sentencepiece(paths.local(paths.check(path)))
  if name == 'clip_bpe':
    # Imported here: only runs that use it pay for loading ftfy and the vocabulary.
    from vlrep.data import clip_bpe  # pylint: disable=g-import-not-at-top
    return clip_bpe.get(path)
  if name == 'hf' and path:
    if paths.is_remote(path):
      raise ValueError(f'data.tokenizer={spec!r}: transformers reads tokenizer directories '
                       'locally; copy it down first')
    return _load_hf(os.path.expanduser(path))
  raise ValueError(f'Unknown data.tokenizer {spec!r}; known: {", ".join(SPECS)}')


def train_sentencepiece(captions: Iterable[str], vocab_size: int, output: str,
                        **options: Any) -> str:
  """Trains a SentencePiece model on `captions`, writes it to `output` and returns `output`.

  The model has PAD, BOS, EOS and UNK at ids 0 to 3, so `SentencePieceTokenizer` uses its
  ids unchanged. `vocab_size` is an upper bound: a corpus with fewer distinct pieces gives
  a smaller model (read the size back with `SentencePieceTokenizer(output).vocab_size`).
  Captions stream into the trainer, which keeps a random `input_sentence_size` of them.

  Args:
    captions: the training text, one caption per item.
    vocab_size: the number of pieces wanted, specials included.
    output: path of the model file to write.
    **options: SentencePiece trainer options (`model_type`, `character_coverage`,
      `input_sentence_size`, `minloglevel`, ...); they override the defaults here.

  Returns:
    `output`.
  """
  settings = dict(
      model_type='unigram',
      character_coverage=0.9995,
      pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=_TRAINED_UNK_ID,
      input_sentence_size=DEFAULT_MAX_SENTENCES,
      shuffle_input_sentence=True,
      # A small corpus (the synthetic captions have ~40 pieces) may not fill the vocabulary;
      # a smaller model beats failing, and the size is reported.
      hard_vocab_limit=False,
      num_threads=os.cpu_count() or 1,
  )
  settings.update(options)
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=(c for c in captions if c),
                                 model_writer=model, vocab_size=int(vocab_size), **settings)
  paths.check(output)  # before a local folder named 'scheme:' could be made
  if not paths.is_remote(output):
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  # Written whole (a local file renamed, or one object): a reader never sees half a model.
  with paths.writing_locally(output) as partial:
    with open(partial, 'wb') as f:
      f.write(model.getvalue())
  return output


def _make_source(spec: str) -> Any:
  # Imported here, not at the top: the input pipeline imports this module.
  from vlrep.data import sources  # pylint: disable=g-import-not-at-top
  return sources.make_source(spec, _CAPTION_IMAGE_SIZE)


def read_captions(source: str, max_sentences: int = DEFAULT_MAX_SENTENCES) -> Iterator[str]:
  """Captions of a data source string (as in `config.data.train`) or of a `.txt` file.

  A source gives at most `max_sentences` captions, from examples spread evenly over it (a
  prefix of a sorted or sharded source could miss much of its vocabulary). A text file,
  one caption per line, is read whole: the trainer samples `input_sentence_size` of its
  lines. The source or file is opened here, so a bad one fails before training starts.

  Args:
    source: a data source string, or the path of a text file ending in `.txt`.
    max_sentences: the most captions to read from a data source.

  Returns:
    An iterator over the captions.
  """
  if source.endswith('.txt'):
    f = paths.open_file(source, 'r', encoding='utf-8')  # local or gs://

    def lines() -> Iterator[str]:
      with f:
        for line in f:
          if line := line.strip():
            yield line

    return lines()

  data = _make_source(source)

  def captions() -> Iterator[str]:
    size = len(data)
    count = min(size, max_sentences)
    read = 0
    for k in range(count):
      example = data[k * size // count]
      texts = example.get('captions')
      if texts is None or not len(texts):
        texts = [example['caption']]
      for text in texts:
        yield text.decode('utf-8') if isinstance(text, bytes) else str(text)
        read += 1
        if read >= max_sentences:
          return

  return captions()


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  args = flags.FLAGS
  output = args.output or f'tokenizer_{args.vocab_size}.model'
  captions = read_captions(args.input, args.max_sentences)
  read = 0

  def counted() -> Iterator[str]:
    nonlocal read
    for text in captions:
      read += 1
      if read % 100_000 == 0:
        logging.info('Read %d captions', read)
      yield text

  start = time.time()
  train_sentencepiece(counted(), args.vocab_size, output, model_type=args.model_type,
                      character_coverage=args.character_coverage,
                      input_sentence_size=args.max_sentences)
  seconds = time.time() - start
  vocab_size = SentencePieceTokenizer(output).vocab_size
  path = paths.absolute(output)
  print(path)
  print(f'vocab_size {vocab_size} (asked for {args.vocab_size}), {read} sentences read, '
        f'{seconds:.1f} s')
  print(f'Train with: --config.data.tokenizer=sentencepiece:{path} '
        f'--config.model.text.vocab_size={vocab_size}')


if __name__ == '__main__':
  # Flags are defined only when run as a program: other modules import this one.
  flags.DEFINE_string('input', None, 'Data source string (synthetic, arrayrecord:PATH, '
                      'tfds:...) or a .txt file with one caption per line.')
  flags.DEFINE_integer('vocab_size', None, 'Vocabulary size (an upper bound when the '
                       'captions have fewer distinct pieces).', lower_bound=8)
  flags.DEFINE_string('output', None, 'Model file to write; default tokenizer_<N>.model '
                      'in the current directory.')
  flags.DEFINE_integer('max_sentences', DEFAULT_MAX_SENTENCES, 'At most this many '
                       'captions train the model.', lower_bound=1)
  flags.DEFINE_enum('model_type', 'unigram', ['unigram', 'bpe'], 'SentencePiece model type.')
  flags.DEFINE_float('character_coverage', 0.9995, 'Share of characters the vocabulary '
                     'covers; rarer ones become UNK. 1.0 for small alphabets.')
  flags.mark_flags_as_required(['input', 'vocab_size'])
  app.run(main)
