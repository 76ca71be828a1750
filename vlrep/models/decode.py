"""Autoregressive caption decoding with a KV cache, inside `jax.jit`.

The decoding model is the same CoCa built with `decode=True` (`build_model(config,
decode=True)`): it shares the training model's parameters and keeps per-layer keys and
values in the `cache` collection. The first step feeds BOS with the captioning image
tokens (filling the cross-attention caches); later steps feed one token each.

Methods: `greedy`, `beam_search` and `sample` (temperature, top-k, nucleus). All return
int32 rows [B, max_len] laid out as `[BOS, ..., EOS, PAD ...]` (a row that never produced
EOS fills all `max_len` positions). Shared conventions:
- PAD and BOS are never generated: a PAD inside a caption would be masked out by the full
  forward pass (so cached and uncached decoding would disagree) and ends it when detokenised.
- `min_len` is the least number of caption tokens before EOS (BOS and EOS not counted):
  EOS is forbidden at positions 1..min_len.
- `repetition_penalty` (CTRL, Keskar et al. 2019) divides the positive logits and multiplies
  the negative ones of tokens already generated in the row; 1.0 disables it.
Every loop is a `lax.while_loop` inside one jitted function. Sizes (`max_len`, `beam_size`)
and beam search's settings are static; greedy's and sampling's settings are traced values,
so changing them does not recompile. BOS and EOS default to vlrep's layout; pass the
tokenizer's `bos_id` / `eos_id` for another (CLIP's BPE).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from vlrep.data.tokenizer import BOS_ID, EOS_ID
from vlrep.models.coca import CoCa

NEG_INF = -1e30  # finite, so that masked rows never turn log-softmax into NaN


def _cache_shapes(decoder: CoCa, caption_tokens: Any, max_len: int) -> Any:
  batch = caption_tokens.shape[0]
  tokens = jnp.zeros((batch, max_len), jnp.int32)
  return jax.eval_shape(
      lambda c: decoder.init(jax.random.key(0), tokens, c, method=CoCa.decode_step),
      caption_tokens)['cache']


def init_cache(decoder: CoCa, params: Any, caption_tokens: jax.Array, max_len: int) -> Any:
  """Zeroed caches sized for `max_len` positions and this batch."""
  del params  # the cache's shapes depend only on the module and the inputs
  if max_len > decoder.text_decoder.max_len:
    # Past it there is no position embedding (a dynamic slice would repeat the last one).
    raise ValueError(f'max_len={max_len} exceeds the text length the model was built for, '
                     f'data.max_text_len={decoder.text_decoder.max_len}')
  shapes = _cache_shapes(decoder, caption_tokens, max_len)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def cache_batch_axes(decoder: CoCa, caption_tokens: Any, max_len: int) -> Any:
  """For each cache leaf, the index of its batch axis, or None (counters, shared by all rows).

  Scanned stacks put a leading `layers` axis on their caches, so the batch axis is not
  always 0. It is found from the layout itself (the axis that changes with the batch
  size), not guessed from sizes that may coincide.
  """
  def spec(batch):
    return jax.ShapeDtypeStruct((batch, *caption_tokens.shape[1:]), caption_tokens.dtype)

  one, two = _cache_shapes(decoder, spec(1), max_len), _cache_shapes(decoder, spec(2), max_len)

  def axis(a, b):
    differ = [i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y]
    return differ[0] if differ else None
  return jax.tree.map(axis, one, two)


def _step(decoder: CoCa, params: Any, cache: Any, token: jax.Array,
          context: jax.Array | None) -> tuple[Any, jax.Array]:
  """One cached step: token [B, 1] -> (new cache, float32 logits [B, V])."""
  logits, variables = decoder.apply({'params': params, 'cache': cache}, token, context,
                                    method=CoCa.decode_step, mutable=['cache'])
  return variables['cache'], logits.astype(jnp.float32)


def process_logits(logits: jax.Array, seen: jax.Array, position: jax.Array, min_len: int,
                   repetition_penalty: float, eos_id: int, bos_id: int,
                   pad_id: int) -> jax.Array:
  """The logits every method decodes from: specials masked, min_len, repetition penalty.

  logits [N, V]; seen bool [N, V] (tokens generated so far); `position` is the index in the
  row of the token being chosen (1 for the first after BOS).
  """
  penalised = jnp.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
  logits = jnp.where(seen, penalised, logits)
  vocab = jnp.arange(logits.shape[-1])
  banned = (vocab == pad_id) | (vocab == bos_id)
  banned = banned | ((vocab == eos_id) & (position <= min_len))
  return jnp.where(banned, NEG_INF, logits)


def _mark_seen(seen: jax.Array, token: jax.Array) -> jax.Array:
  return seen | jax.nn.one_hot(token, seen.shape[-1], dtype=bool)


def _left_to_right(decoder: CoCa, params: Any, context: jax.Array, max_len: int,
                   choose: Callable[[jax.Array, jax.Array], jax.Array], min_len: int,
                   repetition_penalty: float, eos_id: int, bos_id: int) -> jax.Array:
  """One hypothesis per row: `choose(processed logits [B, V], position) -> tokens [B]`."""
  batch, pad_id = context.shape[0], decoder.text_decoder.pad_id
  cache = init_cache(decoder, params, context, max_len)
  out = jnp.full((batch, max_len), pad_id, jnp.int32).at[:, 0].set(bos_id)
  cache, logits = _step(decoder, params, cache, out[:, :1], context)
  seen = jnp.zeros(logits.shape, bool)
  done = jnp.zeros((batch,), bool)

  def cond(carry):
    t, _, _, _, _, done = carry
    return (t < max_len) & ~jnp.all(done)

  def body(carry):
    t, cache, out, logits, seen, done = carry
    logits = process_logits(logits, seen, t, min_len, repetition_penalty, eos_id, bos_id,
                            pad_id)
    token = jnp.where(done, pad_id, choose(logits, t).astype(jnp.int32))
    out = out.at[:, t].set(token)
    done = done | (token == eos_id)
    cache, logits = _step(decoder, params, cache, token[:, None], None)
    return t + 1, cache, out, logits, _mark_seen(seen, token), done

  return jax.lax.while_loop(cond, body, (1, cache, out, logits, seen, done))[2]


@functools.partial(jax.jit, static_argnames=('decoder', 'max_len', 'eos_id', 'bos_id'))
def greedy(decoder: CoCa, params: Any, caption_tokens: jax.Array, max_len: int, *,
           min_len: int | jax.Array = 0, repetition_penalty: float | jax.Array = 1.0,
           eos_id: int = EOS_ID, bos_id: int = BOS_ID) -> jax.Array:
  """Greedy decoding. caption_tokens [B, N, W] -> int32 [B, max_len] as `[BOS, ..., EOS, PAD..]`.

  Stops early once every row has produced EOS. `min_len` and `repetition_penalty` as in
  the module docstring (traced: changing them does not recompile).
  """
  return _left_to_right(decoder, params, caption_tokens, max_len,
                        lambda logits, t: jnp.argmax(logits, axis=-1), min_len,
                        repetition_penalty, eos_id, bos_id)


def filter_logits(logits: jax.Array, top_k: int | jax.Array = 0,
                  top_p: float | jax.Array = 1.0) -> jax.Array:
  """Top-k, then nucleus (top-p) filtering: removed tokens get NEG_INF. logits [N, V].

  `top_k=0` keeps all; nucleus keeps the smallest set of most likely tokens whose
  probability reaches `top_p` (always at least the most likely one). Both may be traced:
  one sort serves both, so settings do not recompile.
  """
  vocab = logits.shape[-1]
  ordered = jnp.sort(logits, axis=-1)[:, ::-1]
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
  kth = jax.lax.dynamic_slice_in_dim(ordered, k - 1, 1, axis=1)
  ordered = jnp.where(ordered < kth, NEG_INF, ordered)
  probs = jax.nn.softmax(ordered, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  kept = (mass_before < top_p) | (jnp.arange(vocab) == 0)  # the argmax always stays
  threshold = jnp.min(jnp.where(kept, ordered, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits < threshold, NEG_INF, logits)


@functools.partial(jax.jit, static_argnames=('decoder', 'max_len', 'eos_id', 'bos_id'))
def sample(decoder: CoCa, params: Any, caption_tokens: jax.Array, max_len: int,
           rng: jax.Array, *, temperature: float | jax.Array = 1.0, top_k: int | jax.Array = 0,
           top_p: float | jax.Array = 1.0, repetition_penalty: float | jax.Array = 1.0,
           min_len: int | jax.Array = 0, eos_id: int = EOS_ID,
           bos_id: int = BOS_ID) -> jax.Array:
  """Ancestral sampling with temperature, top-k and nucleus filtering -> int32 [B, max_len].

  `temperature=0` is greedy decoding (negative temperatures count as 0); `top_k=0` and
  `top_p=1` disable those filters. The same `rng` gives the same captions.
  """
  def choose(logits, t):
    greedy_token = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.maximum(temperature, 1e-6)  # unused when temperature is 0
    sampled = jax.random.categorical(jax.random.fold_in(rng, t),
                                     filter_logits(scaled, top_k, top_p), axis=-1)
    return jnp.where(temperature > 0, sampled, greedy_token)

  return _left_to_right(decoder, params, caption_tokens, max_len, choose, min_len,
                        repetition_penalty, eos_id, bos_id)


def length_penalty_divisor(length: jax.Array, alpha: float) -> jax.Array:
  """GNMT's ((5 + length) / 6) ** alpha (Wu et al. 2016); alpha = 0 gives 1 (raw log-prob)."""
  return ((5.0 + length) / 6.0) ** alpha


@functools.partial(jax.jit, static_argnames=('decoder', 'max_len', 'beam_size',
                                             'length_penalty', 'min_len', 'eos_id', 'bos_id',
                                             'repetition_penalty', 'return_scores'))
def beam_search(decoder: CoCa, params: Any, caption_tokens: jax.Array, max_len: int, *,
                beam_size: int = 4, length_penalty: float = 0.6, min_len: int = 0,
                eos_id: int = EOS_ID, repetition_penalty: float = 1.0,
                return_scores: bool = False,
                bos_id: int = BOS_ID) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Beam search -> the best row per image, int32 [B, max_len] (and its score [B]).

  A hypothesis scores sum(log p(token)) / ((5 + n) / 6) ** length_penalty, with n the number
  of tokens after BOS, EOS included; log p is the log-softmax of `process_logits`.
  `length_penalty=0` ranks by raw log-probability (then beam_size=1 is greedy decoding);
  it must be >= 0. Hypotheses are those ending with EOS, and rows that reach `max_len`
  without it. A hypothesis whose EOS continuation ranks among the `beam_size` best
  continuations leaves the beam for a pool of the `beam_size` best finished ones; the
  search stops when no live beam can still beat the best of them (exact for alpha >= 0,
  since log-probs only fall and the divisor only grows), else at `max_len`.
  """
  if beam_size < 1 or length_penalty < 0:
    raise ValueError(f'need beam_size >= 1 and length_penalty >= 0, got {beam_size}, '
                     f'{length_penalty}')
  context = caption_tokens
  batch, beams = context.shape[0], beam_size
  rows = batch * beams
  cache = init_cache(decoder, params, context, max_len)
  first = jnp.full((batch, 1), bos_id, jnp.int32)
  cache, logits = _step(decoder, params, cache, first, context)  # image once, then tiled
  vocab = logits.shape[-1]
  # Beam b of image i is row i * beams + b of the tiled cache.
  axes = cache_batch_axes(decoder, context, max_len)
  tile = lambda x, a: x if a is None else jnp.repeat(x, beams, axis=a)
  cache = jax.tree.map(tile, cache, axes)
  logits = jnp.repeat(logits, beams, axis=0)
  # The cross-attention keys/values of the image are the same in all of its beams, so
  # reordering beams need not move them (they are most of the cache early on).
  reorder = jax.tree_util.tree_map_with_path(
      lambda path, a: a is not None and not str(getattr(path[-1], 'key', '')).startswith(
          'context_'),
      axes, is_leaf=lambda x: x is None)

  pad_id = decoder.text_decoder.pad_id
  seqs = jnp.full((batch, beams, max_len), pad_id, jnp.int32).at[..., 0].set(bos_id)
  # Only beam 0 is live at first, so the first expansion yields distinct tokens.
  logp = jnp.tile(jnp.where(jnp.arange(beams) == 0, 0.0, NEG_INF), (batch, 1))
  seen = jnp.zeros((rows, vocab), bool)
  pool_seqs, pool_scores = seqs, jnp.full((batch, beams), NEG_INF)
  best_possible = length_penalty_divisor(max_len - 1, length_penalty)

  def merge_into_pool(pool_seqs, pool_scores, new_seqs, new_scores):
    scores = jnp.concatenate([pool_scores, new_scores], axis=1)
    scores, keep = jax.lax.top_k(scores, beams)
    seqs = jnp.concatenate([pool_seqs, new_seqs], axis=1)
    return jnp.take_along_axis(seqs, keep[..., None], axis=1), scores

  def cond(carry):
    t, _, _, _, logp, _, _, pool_scores = carry
    # log-probs are <= 0 and the divisor grows with length, so a live beam's final score is
    # at most its log-prob over the divisor of the longest length.
    bound = jnp.max(logp, axis=1) / best_possible
    return (t < max_len) & ~jnp.all(jnp.max(pool_scores, axis=1) >= bound)

  def body(carry):
    t, cache, logits, seqs, logp, seen, pool_seqs, pool_scores = carry
    logits = process_logits(logits, seen, t, min_len, repetition_penalty, eos_id, bos_id,
                            pad_id)
    token_logp = jax.nn.log_softmax(logits, axis=-1).reshape(batch, beams, vocab)
    candidates = logp[..., None] + token_logp
    divisor = length_penalty_divisor(t.astype(jnp.float32), length_penalty)
    # Beams that end here join the pool if their ending ranks among the `beams` best
    # continuations of this image (as in the usual 2k-candidate scheme): with beam size 1
    # only an argmax EOS ends the hypothesis, as in greedy decoding.
    kth = jax.lax.top_k(candidates.reshape(batch, beams * vocab), beams)[0][:, -1:]
    ending = candidates[..., eos_id]
    ended = seqs.at[..., t].set(eos_id)
    pool_seqs, pool_scores = merge_into_pool(
        pool_seqs, pool_scores, ended, jnp.where(ending >= kth, ending / divisor, NEG_INF))
    # The best continuations that do not end stay live.
    candidates = candidates.at[..., eos_id].set(NEG_INF).reshape(batch, beams * vocab)
    logp, index = jax.lax.top_k(candidates, beams)
    parent, token = index // vocab, (index % vocab).astype(jnp.int32)
    seqs = jnp.take_along_axis(seqs, parent[..., None], axis=1).at[..., t].set(token)
    flat = (jnp.arange(batch)[:, None] * beams + parent).reshape(rows)
    gather = lambda x, a, move: jnp.take(x, flat, axis=a) if move else x
    cache = jax.tree.map(gather, cache, axes, reorder)
    seen = _mark_seen(seen[flat], token.reshape(rows))
    # Rows that fill max_len without EOS are hypotheses too.
    last = t == max_len - 1
    pool_seqs, pool_scores = merge_into_pool(pool_seqs, pool_scores, seqs,
                                             jnp.where(last, logp / divisor, NEG_INF))
    cache, logits = _step(decoder, params, cache, token.reshape(rows, 1), None)
    return t + 1, cache, logits, seqs, logp, seen, pool_seqs, pool_scores

  carry = (jnp.int32(1), cache, logits, seqs, logp, seen, pool_seqs, pool_scores)
  *_, pool_seqs, pool_scores = jax.lax.while_loop(cond, body, carry)
  best = jnp.argmax(pool_scores, axis=1)
  out = jnp.take_along_axis(pool_seqs, best[:, None, None], axis=1)[:, 0]
  if return_scores:
    return out, jnp.take_along_axis(pool_scores, best[:, None], axis=1)[:, 0]
  return out
