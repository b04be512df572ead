"""Beam search through the model's KV cache, with GNMT length normalization.

The search maximizes `log p(y | prompt) / lp(len(y))` with `lp(n) = ((5 + n) / 6) ** alpha`
(Wu et al., 2016), where y either ends with its first EOS (which counts in its length) or runs
for all `max_new_tokens` tokens without one (a truncated hypothesis).

Each step ranks the `beam_size * V` one-token extensions of the live beams and keeps the best
`beam_size`. Those ending in EOS move to a separate list of finished hypotheses (their beam slot
is then dead for the rest of the search); the others stay live. With `beam_size = 1` this is
exactly greedy decoding, and with `beam_size >= V ** (max_new_tokens - 1)` it is exhaustive.
The prompt is prefilled once and its cache repeated for the beams; after each step every cache
leaf is gathered by the surviving beams' parents. The `lax.while_loop` stops early once no live
beam can beat the best finished hypothesis of its prompt.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsi.models.lm import LanguageModel, Params
from jaxsi.sampling import mask_padded_vocab, num_real_tokens


class BeamSearchOutput(NamedTuple):
  """The best hypothesis of each prompt.

  Attributes:
    tokens: [B, T] int32; `pad_id` after the first EOS.
    mask: [B, T] int32; 1 on tokens up to and including the first EOS.
    scores: [B] float32; log-probability divided by ((5 + length) / 6) ** length_penalty.
  """
  tokens: jax.Array
  mask: jax.Array
  scores: jax.Array


def length_normalizer(length: jax.Array | int, alpha: jax.Array | float) -> jax.Array:
  """GNMT's length penalty ((5 + length) / 6) ** alpha; a hypothesis scores logp / this."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def _gather_beams(tree: Any, flat_index_R: jax.Array) -> Any:
  """Picks rows `flat_index_R` of every leaf (leaves have the B * K rows first)."""
  return jax.tree.map(lambda x: jnp.take(x, flat_index_R, axis=0), tree)


def beam_search(lm: LanguageModel, params: Params, prompt: jax.Array, prompt_mask: jax.Array, *,
                beam_size: int, max_new_tokens: int, eos_id: int, length_penalty: float = 0.6,
                pad_id: int = 0) -> BeamSearchOutput:
  """Finds a high-scoring continuation of each prompt by beam search.

  A pure function; jit it with `beam_size`, `max_new_tokens`, `eos_id` and `pad_id` static.

  Args:
    lm: the language model.
    params: its parameters.
    prompt: [B, S] int32, left-padded.
    prompt_mask: [B, S], 1 on real prompt tokens.
    beam_size: K, live hypotheses per prompt (static).
    max_new_tokens: T, the longest hypothesis (static).
    eos_id: end-of-sequence id, in [0, V).
    length_penalty: alpha of the GNMT normalizer (may be traced); 0 ranks by plain
      log-probability.
    pad_id: id written after EOS.

  Returns:
    `BeamSearchOutput` (tokens [B, T], mask [B, T], scores [B]).
  """
  for name, value, low in (("beam_size", beam_size, 1), ("max_new_tokens", max_new_tokens, 1),
                           ("pad_id", pad_id, 0)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
      raise ValueError(f"{name}={value!r} must be a Python int >= {low}.")
  vocab = lm.vocab_size
  if isinstance(eos_id, bool) or not isinstance(eos_id, (int, np.integer)) \
      or not 0 <= eos_id < vocab:
    raise ValueError(f"eos_id={eos_id!r} must be an int in [0, vocab_size={vocab}).")
  if not isinstance(length_penalty, jax.core.Tracer) and (
      np.shape(length_penalty) != () or not np.isfinite(length_penalty)):
    raise ValueError(f"length_penalty={length_penalty!r} must be a finite scalar.")
  prompt, prompt_mask = jnp.asarray(prompt), jnp.asarray(prompt_mask)
  if prompt.ndim != 2 or prompt_mask.shape != prompt.shape:
    raise ValueError(f"prompt {tuple(prompt.shape)} and prompt_mask {tuple(prompt_mask.shape)} "
                     "must have the same [B, S] shape.")
  batch, k, steps = prompt.shape[0], beam_size, max_new_tokens
  alpha = jnp.asarray(length_penalty, jnp.float32)
  num_real = num_real_tokens(lm)
  neg_inf = jnp.float32(-jnp.inf)
  # Flat row of beam j of prompt b is b * K + j; `base_Bx1` turns beam indices into rows.
  base_Bx1 = (jnp.arange(batch, dtype=jnp.int32) * k)[:, None]
  slot_T = jnp.arange(steps, dtype=jnp.int32)

  logits_BxV, cache = lm.prefill(params, prompt, prompt_mask, steps)
  cache = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), cache)
  logits_RxV = jnp.repeat(logits_BxV, k, axis=0)  # R = B * K rows

  def merge(score_a, seq_a, score_b, seq_b):
    """The K best of two [B, K] score lists and their [B, K, T] sequences."""
    scores_Bx2K = jnp.concatenate([score_a, score_b], axis=1)
    seqs_Bx2KxT = jnp.concatenate([seq_a, seq_b], axis=1)
    best_BxK, index_BxK = jax.lax.top_k(scores_Bx2K, k)
    return best_BxK, jnp.take_along_axis(seqs_Bx2KxT, index_BxK[:, :, None], axis=1)

  def select(step, logits_RxV, state):
    """Extends the live beams by one token (slot `step`) and updates the finished list."""
    alive_seq_BxKxT, alive_logp_BxK, fin_seq_BxKxT, fin_score_BxK = state
    logprobs_BxKxV = jax.nn.log_softmax(mask_padded_vocab(logits_RxV, num_real), axis=-1)
    logprobs_BxKxV = logprobs_BxKxV.reshape(batch, k, vocab)
    candidates_BxKV = (alive_logp_BxK[:, :, None] + logprobs_BxKxV).reshape(batch, k * vocab)
    # top_k breaks ties by the lower index, which keeps the search deterministic.
    top_logp_BxK, top_index_BxK = jax.lax.top_k(candidates_BxKV, k)
    parent_BxK = top_index_BxK // vocab
    token_BxK = (top_index_BxK % vocab).astype(jnp.int32)
    seq_BxKxT = jnp.take_along_axis(alive_seq_BxKxT, parent_BxK[:, :, None], axis=1)
    seq_BxKxT = jax.lax.dynamic_update_index_in_dim(seq_BxKxT, token_BxK, step, axis=2)
    ends_BxK = token_BxK == eos_id
    # EOS hypotheses compete with the finished ones on length-normalized scores.
    new_score_BxK = jnp.where(ends_BxK, top_logp_BxK / length_normalizer(step + 1, alpha),
                              neg_inf)
    fin_score_BxK, fin_seq_BxKxT = merge(fin_score_BxK, fin_seq_BxKxT, new_score_BxK, seq_BxKxT)
    alive_logp_BxK = jnp.where(ends_BxK, neg_inf, top_logp_BxK)
    return (seq_BxKxT, alive_logp_BxK, fin_seq_BxKxT, fin_score_BxK), parent_BxK, token_BxK

  def can_improve(step, state):
    """Per prompt: might a live beam still beat the best finished hypothesis?"""
    _, alive_logp_BxK, _, fin_score_BxK = state
    # Log-probabilities only fall as a hypothesis grows, and the normalizer is monotonic in the
    # length, so a live beam's best possible score uses the normalizer's larger end.
    largest_norm = jnp.maximum(length_normalizer(step + 1, alpha),
                               length_normalizer(steps, alpha))
    bound_B = jnp.max(alive_logp_BxK, axis=1) / largest_norm
    return bound_B > jnp.max(fin_score_BxK, axis=1)

  initial = (jnp.full((batch, k, steps), pad_id, jnp.int32),
             jnp.zeros((batch, k), jnp.float32).at[:, 1:].set(neg_inf),  # one live beam at first
             jnp.full((batch, k, steps), pad_id, jnp.int32),
             jnp.full((batch, k), neg_inf))
  state, _, token_BxK = select(0, logits_RxV, initial)
  # All beams of a prompt share the prefill cache, so slot 0 needs no gather.

  def keep_going(carry):
    step, state = carry[0], carry[1]
    return (step < steps) & jnp.any(can_improve(step, state))

  def body(carry):
    step, state, token_R, cache = carry
    prev = step - 1
    visible_RxT = jnp.broadcast_to(slot_T <= prev, (batch * k, steps))
    logits_RxV, cache = lm.decode_step(params, cache, token_R, prev,
                                       jnp.full((batch * k,), prev, jnp.int32), visible_RxT)
    state, parent_BxK, token_BxK = select(step, logits_RxV, state)
    cache = _gather_beams(cache, (base_Bx1 + parent_BxK).reshape(-1))
    return step + 1, state, token_BxK.reshape(-1), cache

  step, state, _, _ = jax.lax.while_loop(
      keep_going, body, (jnp.int32(1), state, token_BxK.reshape(-1), cache))
  alive_seq_BxKxT, alive_logp_BxK, fin_seq_BxKxT, fin_score_BxK = state
  # Beams still live after all T steps are truncated hypotheses of length T.
  truncated_score_BxK = jnp.where(step >= steps,
                                  alive_logp_BxK / length_normalizer(steps, alpha), neg_inf)
  scores_BxK, seqs_BxKxT = merge(fin_score_BxK, fin_seq_BxKxT, truncated_score_BxK,
                                  alive_seq_BxKxT)
  tokens_BxT = seqs_BxKxT[:, 0]
  is_eos_BxT = tokens_BxT == eos_id
  # 1 up to and including the first EOS: no EOS strictly before the slot.
  eos_before_BxT = jnp.cumsum(is_eos_BxT, axis=1) - is_eos_BxT
  mask_BxT = (eos_before_BxT == 0).astype(jnp.int32)
  return BeamSearchOutput(tokens=jnp.where(mask_BxT > 0, tokens_BxT, pad_id), mask=mask_BxT,
                          scores=scores_BxK[:, 0])
