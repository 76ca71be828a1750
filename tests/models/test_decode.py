"""Cached decoding: agreement with full forward passes, beam search, sampling.

Everything runs jitted: eager op-by-op dispatch is slow on CPU.
"""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlrep.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from vlrep.models import decode
from vlrep.models.build import build_model, init_params
from vlrep.models.coca import CoCa

from conftest import load_config, shrink


def _setup(config, max_len, seed=3, eos_bias=1.0, vocab=None, scan=False):
  """(model, decoder, params, captioning context of 4 images)."""
  config.data.max_text_len = max_len
  config.model.scan_layers = scan
  if vocab:
    config.model.text.vocab_size = vocab
  model, decoder = build_model(config), build_model(config, decode=True)
  params = jax.jit(lambda rng: nn.unbox(init_params(model, config, rng)))(jax.random.key(seed))
  # Make EOS likely somewhere so early stopping and padding are exercised.
  head = params['text_decoder']['output_head']
  head['bias'] = head['bias'].at[EOS_ID].set(eos_bias)
  images = jnp.asarray(np.random.default_rng(0).integers(0, 255, (4, 16, 16, 3)), jnp.uint8)
  context = jax.jit(lambda p, x: model.apply({'params': p}, x, method=CoCa.encode_image)[1])(
      params, images)
  return model, decoder, params, context


@pytest.fixture(scope='module')
def tiny():
  """One setup (max_len 12) shared by the tests, so each decoding function compiles once."""
  return _setup(shrink(load_config('coca')), 12)


def _with_output_bias(params, token, bias):
  """A copy of `params` with one output bias changed (the shared fixture stays intact)."""
  params = jax.tree.map(lambda x: x, params)
  params['text_decoder'] = dict(params['text_decoder'])
  head = params['text_decoder']['output_head'] = dict(params['text_decoder']['output_head'])
  head['bias'] = head['bias'].at[token].set(bias)
  return params


def _full_logits(model):
  """Uncached next-token logits: tokens [N, L], context [N, Q, W] -> [N, L - 1, V]."""
  def forward(module, tokens, context):
    features = module.text_decoder.encode(tokens)[1]
    return module.text_decoder.caption_logits(features[:, :-1], context)
  return jax.jit(lambda params, tokens, context: model.apply(
      {'params': params}, tokens, context, method=forward))


def _masked_log_probs(logits, min_len=0):
  """Log-softmax after the masking every decoding method applies (PAD, BOS, early EOS)."""
  logits = np.array(logits, np.float64)
  logits[..., [PAD_ID, BOS_ID]] = -np.inf
  logits[..., :min_len, EOS_ID] = -np.inf  # logits[:, t] choose the token at position t + 1
  return logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1,
                                keepdims=True)) - logits.max(-1, keepdims=True)


def _check_layout(rows):
  rows = np.asarray(rows)
  assert (rows[:, 0] == BOS_ID).all()
  for row in rows:
    ends = np.flatnonzero(row == EOS_ID)
    if len(ends):
      assert (row[ends[0] + 1:] == PAD_ID).all()
      assert (row[1:ends[0]] > BOS_ID).all()
    else:
      assert (row[1:] > BOS_ID).all()


def test_cached_logits_equal_full_forward_at_every_step(tiny):
  model, decoder, params, context = tiny
  tokens = np.random.default_rng(1).integers(3, 259, (4, 10)).astype(np.int32)
  tokens[:, 0] = BOS_ID
  full = np.asarray(_full_logits(model)(params, jnp.asarray(tokens), context))

  @jax.jit
  def cached(params, tokens, context):
    cache = decode.init_cache(decoder, params, context, 10)
    cache, first = decode._step(decoder, params, cache, tokens[:, :1], context)
    def step(cache, token):
      cache, logits = decode._step(decoder, params, cache, token[:, None], None)
      return cache, logits
    _, rest = jax.lax.scan(step, cache, tokens[:, 1:-1].T)
    return jnp.concatenate([first[:, None], rest.transpose(1, 0, 2)], axis=1)

  np.testing.assert_allclose(np.asarray(cached(params, jnp.asarray(tokens), context)), full,
                             atol=2e-5, rtol=1e-4)


def _reference_greedy(model, params, context, max_len):
  """No cache: re-run the whole model on the prefix at every step."""
  batch = context.shape[0]
  tokens = np.full((batch, max_len), PAD_ID, np.int32)
  tokens[:, 0] = BOS_ID
  done = np.zeros(batch, bool)
  full = _full_logits(model)
  for t in range(1, max_len):
    logits = np.asarray(full(params, jnp.asarray(tokens), context))
    next_token = np.argmax(_masked_log_probs(logits[:, t - 1]), axis=-1)
    next_token = np.where(done, PAD_ID, next_token)
    tokens[:, t] = next_token
    done |= next_token == EOS_ID
  return tokens


def test_greedy_matches_uncached_reference(tiny):
  model, decoder, params, context = tiny
  got = np.asarray(decode.greedy(decoder, params, context, 12))
  np.testing.assert_array_equal(got, _reference_greedy(model, params, context, 12))
  _check_layout(got)
  assert (got == EOS_ID).any(), 'the test should exercise EOS'


def test_beam_size_one_is_greedy_and_min_len_holds(tiny):
  _, decoder, params, context = tiny
  greedy = np.asarray(decode.greedy(decoder, params, context, 12))
  beam = np.asarray(decode.beam_search(decoder, params, context, 12, beam_size=1,
                                       length_penalty=0.0))
  np.testing.assert_array_equal(beam, greedy)
  for rows in (decode.greedy(decoder, params, context, 12, min_len=5),
               decode.beam_search(decoder, params, context, 12, min_len=5)):
    rows = np.asarray(rows)
    _check_layout(rows)
    assert not (rows[:, :6] == EOS_ID).any()  # at least 5 caption tokens before EOS


@pytest.fixture(scope='module')
def tiny_vocab():
  """A vocabulary of 7 (PAD, BOS, EOS and 4 words), 4 positions after BOS, scanned layers."""
  model, decoder, params, context = _setup(shrink(load_config('coca')), 5, seed=5, vocab=7,
                                           scan=True)
  return model, decoder, params, context[:2]


@pytest.mark.parametrize('alpha,min_len', [(0.0, 0), (1.5, 1)])
def test_beam_search_finds_the_exhaustive_optimum(tiny_vocab, alpha, min_len):
  model, decoder, params, context = tiny_vocab
  max_len = 5
  words = [EOS_ID, 3, 4, 5, 6]
  rows = np.array([[BOS_ID, *s] for s in itertools.product(words, repeat=max_len - 1)],
                  np.int32)
  # A beam as wide as the most candidates of any step (64 live prefixes before the last
  # step, times 5 tokens) never drops one, so the search is exhaustive.
  got, score = decode.beam_search(decoder, params, context, max_len, beam_size=320,
                                  length_penalty=alpha, min_len=min_len, return_scores=True)
  full = _full_logits(model)
  for i in range(len(context)):
    logits = full(params, jnp.asarray(rows),
                  jnp.broadcast_to(context[i], (len(rows), *context.shape[1:])))
    log_probs = _masked_log_probs(np.asarray(logits), min_len)
    best_score, best_row = -np.inf, None
    for row, lp in zip(rows, log_probs):
      ends = np.flatnonzero(row == EOS_ID)
      n = ends[0] if len(ends) else max_len - 1  # tokens after BOS, EOS included
      score_i = lp[np.arange(n), row[1:n + 1]].sum() / ((5 + n) / 6) ** alpha
      if score_i > best_score:
        best_score, best_row = score_i, np.where(np.arange(max_len) > n, PAD_ID, row)
    np.testing.assert_array_equal(np.asarray(got)[i], best_row)
    np.testing.assert_allclose(float(score[i]), best_score, rtol=1e-4, atol=1e-4)


def _reference_beam_search(log_probs_of, beams, max_len, alpha):
  """Beam search as `decode.beam_search` documents it, on uncached log-probs, without its
  early stop (which never changes the answer): `log_probs_of(prefix)` -> masked log-probs
  [V] of the next token. Returns (best row, its score)."""
  divisor = lambda n: ((5 + n) / 6) ** alpha
  live = [([BOS_ID], 0.0)]
  pool = []
  for t in range(1, max_len):
    candidates = [(logp + lp, row, token) for row, logp in live
                  for token, lp in enumerate(log_probs_of(row)) if lp > -np.inf]
    kth = sorted((c[0] for c in candidates), reverse=True)[:beams][-1]
    pool += [(score / divisor(t), row + [EOS_ID]) for score, row, token in candidates
             if token == EOS_ID and score >= kth]
    going_on = sorted((c for c in candidates if c[2] != EOS_ID), key=lambda c: -c[0])[:beams]
    live = [(row + [token], score) for score, row, token in going_on]
    if t == max_len - 1:
      pool += [(score / divisor(t), row) for row, score in live]
    pool = sorted(pool, key=lambda p: -p[0])[:beams]
  score, row = pool[0]
  return np.array(row + [PAD_ID] * (max_len - len(row))), score


@pytest.mark.parametrize('beams, alpha, min_len', [(2, 0.0, 0), (2, 1.5, 1), (3, 0.6, 0)])
def test_narrow_beam_search_prunes_as_documented(tiny_vocab, beams, alpha, min_len):
  """A beam of 2 or 3 over 5 words x 4 positions (625 rows) drops candidates at every step;
  the rows kept, the pool of finished ones and the answer follow the reference."""
  model, decoder, params, context = tiny_vocab
  max_len = 5
  got, score = decode.beam_search(decoder, params, context, max_len, beam_size=beams,
                                  length_penalty=alpha, min_len=min_len, return_scores=True)
  full = _full_logits(model)
  for i in range(len(context)):
    def log_probs_of(prefix):
      row = np.full((1, max_len), PAD_ID, np.int32)
      row[0, :len(prefix)] = prefix
      logits = full(params, jnp.asarray(row), context[i:i + 1])
      return _masked_log_probs(np.asarray(logits), min_len)[0, len(prefix) - 1]
    want_row, want_score = _reference_beam_search(log_probs_of, beams, max_len, alpha)
    np.testing.assert_array_equal(np.asarray(got)[i], want_row)
    np.testing.assert_allclose(float(score[i]), want_score, rtol=1e-4, atol=1e-4)


def test_decoding_pads_with_the_model_pad_id():
  """With text.pad_id=4, rows end in 4s after EOS, 4 is never generated, and 0 is an
  ordinary token that may be."""
  config = shrink(load_config('coca'))
  config.model.text.pad_id = 4
  _, decoder, params, context = _setup(config, 12, eos_bias=2.0)
  rows = np.asarray(decode.greedy(decoder, params, context, 12))
  beam = np.asarray(decode.beam_search(decoder, params, context, 12, beam_size=2))
  for row in (*rows, *beam):
    end = np.flatnonzero(row == EOS_ID)
    assert len(end), row  # the EOS bias makes every row end
    assert (row[end[0] + 1:] == 4).all() and not (row[:end[0]] == 4).any(), row


def test_decoding_past_the_model_text_length_is_refused(tiny):
  _, decoder, params, context = tiny
  with pytest.raises(ValueError, match=r'max_len=13 exceeds .* data.max_text_len=12'):
    decode.greedy(decoder, params, context, 13)


def test_sampling_limits_are_greedy(tiny):
  _, decoder, params, context = tiny
  greedy = np.asarray(decode.greedy(decoder, params, context, 12))
  rng = jax.random.key(0)
  for options in (dict(temperature=0.0), dict(top_k=1), dict(top_p=1e-6)):
    np.testing.assert_array_equal(
        np.asarray(decode.sample(decoder, params, context, 12, rng, **options)), greedy)


def test_sampling_is_seeded(tiny):
  # No EOS and a high temperature: a flat distribution, long samples.
  _, decoder, params, context = tiny
  params = _with_output_bias(params, EOS_ID, -5.0)
  run = lambda seed: np.asarray(decode.sample(decoder, params, context, 12,
                                              jax.random.key(seed), temperature=2.0))
  a, b = run(0), run(1)
  np.testing.assert_array_equal(a, run(0))
  assert (a != b).any()
  _check_layout(a)


def test_repetition_penalty_reduces_repeats(tiny):
  _, decoder, params, context = tiny
  # A word that dominates every step: without the penalty greedy repeats it.
  params = _with_output_bias(_with_output_bias(params, EOS_ID, -5.0), 100, 20.0)
  def repeats(rows):
    return np.mean([len(r[1:]) - len(set(r[1:].tolist())) for r in np.asarray(rows)])
  plain = decode.greedy(decoder, params, context, 12)
  assert (np.asarray(plain)[:, 1:] == 100).all()
  penalised = decode.greedy(decoder, params, context, 12, repetition_penalty=1e3)
  assert repeats(penalised) < repeats(plain)
  assert (np.asarray(penalised)[:, 1:] == 100).sum(axis=1).max() == 1
  sampled = decode.sample(decoder, params, context, 12, jax.random.key(0),
                          repetition_penalty=1e3)
  assert repeats(sampled) < repeats(plain)


def test_filter_logits():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  kept = lambda x: np.asarray(x > decode.NEG_INF / 2)[0].tolist()
  assert kept(decode.filter_logits(logits, top_k=2)) == [True, True, False, False]
  assert kept(decode.filter_logits(logits, top_p=0.7)) == [True, True, False, False]
  assert kept(decode.filter_logits(logits, top_p=0.85)) == [True, True, True, False]
  assert kept(decode.filter_logits(logits, top_p=0.0)) == [True, False, False, False]


def test_cache_batch_axes_with_scanned_layers(config):
  config.model.scan_layers = True
  decoder = build_model(config, decode=True)
  context = jax.ShapeDtypeStruct((5, 3, 32), jnp.float32)
  axes = decode.cache_batch_axes(decoder, context, 24)
  flat = jax.tree_util.tree_leaves_with_path(axes)
  assert {a for _, a in flat} == {1}  # scanned: [layers, batch, ...]
  assert axes['text_decoder']['position'] is None  # counters are shared by all rows
  assert axes['text_decoder']['multimodal']['self_attention']['cache_index'] is None
