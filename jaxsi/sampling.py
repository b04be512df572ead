"""Jitted KV-cache sampler: temperature, top-k, top-p, EOS, N samples per prompt.

Every model family talks to the sampler only through `LanguageModel.prefill` and
`LanguageModel.decode_step`, so decoders and T5 share this code:

  sampler = make_sampler(lm, max_new_tokens=64, num_samples=4, eos_id=1)   # compile once
  out = sampler(params, prompt, prompt_mask, rng, temperature=0.7, top_k=0, top_p=0.9)
  out.tokens  # [B * 4, 64]; rows b*4 .. b*4+3 are prompt b's samples

How it runs:
  - the prompt is prefilled ONCE (T5 runs its encoder once); the logits and cache are then
    repeated `num_samples` times along the batch, so the N samples of a prompt share its
    prefill;
  - one `lax.while_loop` feeds each sampled token back through `decode_step` and stops as soon
    as every row has produced EOS (or after `max_new_tokens` tokens); the cache lives in the loop
    carry, so XLA updates it in place;
  - temperature, top-k and top-p are traced scalars: changing them never recompiles. Top-k uses
    a sort and a threshold since k is dynamic; the sort is skipped (`lax.cond`) when both top-k
    and top-p are off, and temperature 0 skips sampling altogether (argmax);
  - head rows >= `lm.config.num_real_tokens` (padding of the embedding table) are never sampled;
  - step t draws with `fold_in(rng, t)`, so results depend only on `rng` (not on the sharding or
    on when the loop stops).

Backspace (SequenceMatch, spec/sequencematch.md). With `backspace_id`, the sampler draws ACTIONS
(tokens or <bksp>) and spends one cache slot per action, walking the same stack as
`jaxsi.objectives.sequencematch.preprocess_actions`, so the cache a generation builds is exactly
the one-pass training layout of its raw actions:

  token a at action j:  feed a at slot j, position = the stack depth, push j.
  <bksp> at action j:   pop the last generated slot (never a prompt token); with a new top t,
                        feed the copy of t's token at slot j and t's position, and slot j
                        replaces t (the popped slot and t become invisible); with an empty
                        stack, feed the boundary token at position -1 with no response slot
                        visible (the state "prompt alone").
  visible = the stack after the action.

A row ends at EOS (terminated), when its stack holds `max_new_tokens` tokens, or after
`max_actions` actions (both truncated). Outputs: the raw `actions` for the replay buffer and the
MATERIALIZED tokens (what the stack holds at the end) in `tokens`, for evaluation.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxsi import mesh as mesh_lib
from jaxsi import partitioning
from jaxsi.models.lm import LanguageModel, Params
from jaxsi.objectives import sequencematch


@flax.struct.dataclass
class SampleOutput:
  """What `sample` returns; every array has the R = B * N sample rows first.

  Attributes:
    tokens: [B*N, T] int32; rows b*N .. b*N+N-1 are prompt b's samples; `pad_id` after EOS.
    mask: [B*N, T] int32; 1 on generated tokens up to and including the first EOS.
    logprobs: [B*N, T] float32; log-prob of each token under the model's own (temperature 1,
      unfiltered) distribution over the real vocabulary; 0 where `mask` is 0.
    sample_logprobs: [B*N, T] float32; log-prob under the distribution actually sampled from
      (temperature, top-k, top-p applied); 0 for greedy (temperature 0) and where `mask` is 0.
    length: [B*N] int32; number of generated tokens (EOS included).
    truncated: [B*N] bool; True where no EOS appeared within `max_new_tokens`.
    prompt: [B*N, S] int32; each prompt repeated N times (aligned with `tokens`).
    prompt_mask: [B*N, S] int32; likewise.
    actions: with a backspace id only (else None): [B*N, max_actions] int32, the raw actions
      (tokens and <bksp>), `pad_id` after the row ended. `tokens` is then the materialized
      text, `logprobs`/`sample_logprobs` those of the actions that pushed each kept token,
      `length` the kept tokens and `truncated` True where the row did not end with EOS.
    actions_mask: [B*N, max_actions] int32, 1 on real actions (with a backspace id only).
    action_logits: [B*N, max_actions, V] float32, the logits each action was drawn from
      (padded head rows at -inf); only with `return_logits=True` (a testing aid).
  """
  tokens: jax.Array
  mask: jax.Array
  logprobs: jax.Array
  sample_logprobs: jax.Array
  length: jax.Array
  truncated: jax.Array
  prompt: jax.Array
  prompt_mask: jax.Array
  actions: jax.Array | None = None
  actions_mask: jax.Array | None = None
  action_logits: jax.Array | None = None


def num_real_tokens(lm: LanguageModel) -> int | None:
  """The tokenizer's vocabulary size when the model's head is padded beyond it, else None."""
  config = lm.config
  value = config.get("num_real_tokens", None) if hasattr(config, "get") else None
  return None if value is None or value >= lm.vocab_size else int(value)


def mask_padded_vocab(logits_RxV: jax.Array, num_real: int | None) -> jax.Array:
  """Sets the logits of head rows >= `num_real` to -inf so they are never produced."""
  if num_real is None or num_real >= logits_RxV.shape[-1]:
    return logits_RxV
  return jnp.where(jnp.arange(logits_RxV.shape[-1]) < num_real, logits_RxV, -jnp.inf)


def filter_logits(scaled_RxV: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """Top-k then top-p (nucleus) filtering with traced k and p; dropped entries become -inf.

  One descending sort serves both filters. Top-k keeps the k largest logits (ties with the k-th
  are kept too). Top-p then keeps, within the renormalized top-k distribution, the smallest
  prefix of tokens (by decreasing probability) whose total probability reaches `top_p`; the most
  likely token is always kept.

  Args:
    scaled_RxV: [R, V] float32 logits, already divided by the temperature.
    top_k: [] int; 0 disables top-k.
    top_p: [] float in (0, 1]; 1 disables top-p.

  Returns:
    [R, V] float32 logits with the filtered-out entries at -inf.
  """
  vocab = scaled_RxV.shape[-1]
  sorted_RxV = -jnp.sort(-scaled_RxV, axis=-1)
  rank_V = jnp.arange(vocab)
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab).astype(jnp.int32)
  in_top_k_RxV = jnp.broadcast_to(rank_V < k, sorted_RxV.shape)
  probs_RxV = jax.nn.softmax(jnp.where(in_top_k_RxV, sorted_RxV, -jnp.inf), axis=-1)
  # Probability mass strictly before each rank: a token is kept while that mass is < top_p.
  mass_before_RxV = jnp.cumsum(probs_RxV, axis=-1) - probs_RxV
  keep_RxV = in_top_k_RxV & (mass_before_RxV < top_p)
  # top_p = 1 must keep all k even when float rounding makes the cumulative mass reach 1 early.
  num_kept_R = jnp.where(top_p >= 1.0, k, jnp.maximum(keep_RxV.sum(axis=-1), 1))
  threshold_Rx1 = jnp.take_along_axis(sorted_RxV, (num_kept_R - 1)[:, None], axis=-1)
  return jnp.where(scaled_RxV >= threshold_Rx1, scaled_RxV, -jnp.inf)


def draw_from_probs(probs_RxV: jax.Array, uniform_R: jax.Array) -> jax.Array:
  """Inverse-CDF sampling: the token whose cumulative-probability interval holds `uniform_R`.

  Row r gets the first token j with p[r, j] > 0 and cdf[r, j] > u[r] * total[r], where cdf is
  the running sum of the row and total the cdf at its last token of positive probability: the
  token j with probability p[r, j] / total[r]. A token of probability 0 (filtered out, masked
  or padded) is never returned, even for u just below 1 or where float rounding makes the
  running sum flat or dip by an ulp.

  One uniform per row, rather than the V Gumbel draws and the argmax over them of
  `jax.random.categorical`: this is what each step of the sampler's loop draws with.

  Args:
    probs_RxV: [R, V] float32, non-negative, each row with at least one positive entry (need
      not sum to 1).
    uniform_R: [R] float32 in [0, 1).

  Returns:
    [R] int32 token ids.
  """
  vocab = probs_RxV.shape[-1]
  positive_RxV = probs_RxV > 0
  cdf_RxV = jnp.cumsum(probs_RxV, axis=-1)
  total_R = jnp.max(jnp.where(positive_RxV, cdf_RxV, 0.0), axis=-1)
  # u * total < total, so the token where the max is reached always qualifies.
  target_R = jnp.minimum(uniform_R * total_R, jnp.nextafter(total_R, jnp.float32(0)))
  qualifies_RxV = positive_RxV & (cdf_RxV > target_R[:, None])
  index_V = jnp.arange(vocab, dtype=jnp.int32)
  return jnp.min(jnp.where(qualifies_RxV, index_V, vocab - 1), axis=-1).astype(jnp.int32)


def _choose_tokens(logits_RxV: jax.Array, rng: jax.Array, temperature: jax.Array,
                   top_k: jax.Array, top_p: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Draws one token per row.

  Args:
    logits_RxV: [R, V] float32 with padded head rows already at -inf.
    rng: key for this step.
    temperature, top_k, top_p: traced scalars (see `sample`).

  Returns:
    (token [R] int32, log-prob under `logits_RxV` [R], log-prob under the sampling
    distribution [R]).
  """

  def draw(logits_RxV):
    # Only reached with temperature > 0; the guard keeps the untaken branch finite.
    scaled_RxV = logits_RxV / jnp.where(temperature > 0, temperature, 1.0)
    filtering = (top_k > 0) | (top_p < 1.0)
    # A full-vocabulary sort every step is wasted work when no filter is on: skip it.
    filtered_RxV = jax.lax.cond(filtering, filter_logits, lambda x, *_: x,
                                scaled_RxV, top_k, top_p)
    log_probs_RxV = jax.nn.log_softmax(filtered_RxV, axis=-1)
    token_R = draw_from_probs(jnp.exp(log_probs_RxV),
                              jax.random.uniform(rng, log_probs_RxV.shape[:1], jnp.float32))
    sample_logprob_R = jnp.take_along_axis(log_probs_RxV, token_R[:, None], axis=-1)[:, 0]
    return token_R, sample_logprob_R

  def argmax(logits_RxV):
    return (jnp.argmax(logits_RxV, axis=-1).astype(jnp.int32),
            jnp.zeros(logits_RxV.shape[:1], jnp.float32))

  token_R, sample_logprob_R = jax.lax.cond(temperature > 0, draw, argmax, logits_RxV)
  logprob_R = jnp.take_along_axis(jax.nn.log_softmax(logits_RxV, axis=-1), token_R[:, None],
                                  axis=-1)[:, 0]
  return token_R, logprob_R, sample_logprob_R


def _check_static(max_new_tokens: Any, num_samples: Any, eos_id: Any, pad_id: Any) -> None:
  for name, value, low in (("max_new_tokens", max_new_tokens, 1), ("num_samples", num_samples, 1),
                           ("eos_id", eos_id, 0), ("pad_id", pad_id, 0)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
      raise ValueError(f"{name}={value!r} must be a Python int >= {low}.")


def _check_knobs(temperature: Any, top_k: Any, top_p: Any) -> None:
  """Checks the sampling knobs when they are concrete (traced values cannot be inspected)."""
  def concrete(x):
    return None if isinstance(x, jax.core.Tracer) else np.asarray(x)
  t, k, p = concrete(temperature), concrete(top_k), concrete(top_p)
  if t is not None and (t.shape != () or not t >= 0):
    raise ValueError(f"temperature={temperature!r} must be a scalar >= 0 (0 means greedy).")
  if k is not None and (k.shape != () or not np.issubdtype(k.dtype, np.integer) or k < 0):
    raise ValueError(f"top_k={top_k!r} must be an integer scalar >= 0 (0 means off).")
  if p is not None and (p.shape != () or not 0 < p <= 1):
    raise ValueError(f"top_p={top_p!r} must be a scalar in (0, 1] (1 means off).")


def sample(lm: LanguageModel, params: Params, prompt: jax.Array, prompt_mask: jax.Array,
           rng: jax.Array, *, max_new_tokens: int, temperature: Any = 1.0, top_k: Any = 0,
           top_p: Any = 1.0, num_samples: int = 1, eos_id: int, pad_id: int = 0,
           backspace_id: int | None = None, max_actions: int | None = None,
           forced_actions: Any = None, return_logits: bool = False) -> SampleOutput:
  """Samples `num_samples` continuations of each prompt through the model's KV cache.

  A pure function: jit it with `max_new_tokens`, `num_samples`, `eos_id`, `pad_id` static, or use
  `make_sampler`, which does so once.

  Args:
    lm: the language model.
    params: its parameters.
    prompt: [B, S] int32, left-padded.
    prompt_mask: [B, S], 1 on real prompt tokens.
    rng: PRNG key; equal keys give equal samples.
    max_new_tokens: static number of response slots T.
    temperature: scalar >= 0 (traced); 0 is greedy argmax.
    top_k: integer scalar >= 0 (traced); keep the k most likely tokens, 0 = off.
    top_p: scalar in (0, 1] (traced); nucleus sampling, 1 = off.
    num_samples: static N, samples per prompt.
    eos_id: static end-of-sequence id; a row stops after it.
    pad_id: static id written after EOS.
    backspace_id: static <bksp> id of a SequenceMatch model (see the module docstring); None
      samples plain tokens.
    max_actions: static cap on the actions of a row with backspace (default
      2 * max_new_tokens); the cache then holds `max_actions` slots.
    forced_actions: testing aid, with backspace only: [B*N, max_actions] int, the action to
      take at each step instead of drawing one (-1 = draw). A forced action's `logprobs`
      entry is its model log-prob, its `sample_logprobs` entry 0.
    return_logits: static testing aid, with backspace only: also return `action_logits`.

  Returns:
    `SampleOutput` with B * N rows (rows b*N .. b*N+N-1 belong to prompt b).
  """
  _check_static(max_new_tokens, num_samples, eos_id, pad_id)
  _check_knobs(temperature, top_k, top_p)
  max_actions = _check_backspace(lm, backspace_id, max_actions, max_new_tokens, eos_id)
  if backspace_id is None and (forced_actions is not None or return_logits):
    raise ValueError("forced_actions and return_logits are backspace-sampler aids; pass a "
                     "backspace_id or drop them.")
  prompt, prompt_mask = jnp.asarray(prompt), jnp.asarray(prompt_mask)
  if prompt.ndim != 2 or prompt_mask.shape != prompt.shape:
    raise ValueError(f"prompt {tuple(prompt.shape)} and prompt_mask {tuple(prompt_mask.shape)} "
                     "must have the same [B, S] shape.")
  temperature = jnp.asarray(temperature, jnp.float32)
  top_k = jnp.asarray(top_k, jnp.int32)
  top_p = jnp.asarray(top_p, jnp.float32)
  if backspace_id is not None:
    return _sample_actions(lm, params, prompt, prompt_mask, rng, max_new_tokens=max_new_tokens,
                           max_actions=max_actions, temperature=temperature, top_k=top_k,
                           top_p=top_p, num_samples=num_samples, eos_id=eos_id, pad_id=pad_id,
                           backspace_id=backspace_id, forced_actions=forced_actions,
                           return_logits=return_logits)
  num_real = num_real_tokens(lm)
  steps = max_new_tokens

  logits_BxV, cache = lm.prefill(params, prompt, prompt_mask, steps)
  # Share the prefill among the N samples of a prompt: rows b*N .. b*N+N-1 copy prompt b.
  expand = lambda x: jnp.repeat(x, num_samples, axis=0) if num_samples > 1 else x
  logits_RxV = mask_padded_vocab(expand(logits_BxV), num_real)
  cache = jax.tree.map(expand, cache)
  rows = logits_RxV.shape[0]
  slot_T = jnp.arange(steps, dtype=jnp.int32)

  def choose(step, logits_RxV, done_R):
    token_R, logprob_R, sample_logprob_R = _choose_tokens(
        logits_RxV, jax.random.fold_in(rng, step), temperature, top_k, top_p)
    token_R = jnp.where(done_R, pad_id, token_R)
    logprob_R = jnp.where(done_R, 0.0, logprob_R)
    sample_logprob_R = jnp.where(done_R, 0.0, sample_logprob_R)
    return token_R, logprob_R, sample_logprob_R

  def write(buffers, step, values):
    return tuple(jax.lax.dynamic_update_index_in_dim(buf, val, step, axis=1)
                 for buf, val in zip(buffers, values))

  # Slot 0 comes from the prefill logits; each loop iteration then feeds slot t - 1 and draws
  # slot t, so no decode step is spent after the last token.
  not_done_R = jnp.zeros((rows,), bool)
  token_R, logprob_R, sample_logprob_R = choose(0, logits_RxV, not_done_R)
  buffers = (jnp.full((rows, steps), pad_id, jnp.int32), jnp.zeros((rows, steps), jnp.float32),
             jnp.zeros((rows, steps), jnp.float32), jnp.zeros((rows, steps), jnp.int32))
  buffers = write(buffers, 0, (token_R, logprob_R, sample_logprob_R, jnp.ones((rows,), jnp.int32)))
  done_R = token_R == eos_id

  def keep_going(carry):
    step, done_R = carry[0], carry[1]
    return (step < steps) & ~jnp.all(done_R)

  def body(carry):
    step, done_R, token_R, buffers, cache = carry
    prev = step - 1
    visible_RxT = jnp.broadcast_to(slot_T <= prev, (rows, steps))
    logits_RxV, cache = lm.decode_step(params, cache, token_R, prev,
                                       jnp.full((rows,), prev, jnp.int32), visible_RxT)
    token_R, logprob_R, sample_logprob_R = choose(step, mask_padded_vocab(logits_RxV, num_real),
                                                  done_R)
    buffers = write(buffers, step, (token_R, logprob_R, sample_logprob_R,
                                    (~done_R).astype(jnp.int32)))
    return step + 1, done_R | (token_R == eos_id), token_R, buffers, cache

  carry = (jnp.int32(1), done_R, token_R, buffers, cache)
  _, done_R, _, buffers, _ = jax.lax.while_loop(keep_going, body, carry)
  tokens_RxT, logprobs_RxT, sample_logprobs_RxT, mask_RxT = buffers
  return SampleOutput(tokens=tokens_RxT, mask=mask_RxT, logprobs=logprobs_RxT,
                      sample_logprobs=sample_logprobs_RxT, length=mask_RxT.sum(axis=1),
                      truncated=~done_R, prompt=expand(prompt).astype(jnp.int32),
                      prompt_mask=expand(prompt_mask).astype(jnp.int32))


def _check_backspace(lm: LanguageModel, backspace_id: Any, max_actions: Any,
                     max_new_tokens: int, eos_id: int) -> int | None:
  """Validates the backspace arguments; returns max_actions with its default filled in."""
  if backspace_id is None:
    if max_actions is not None:
      raise ValueError(f"max_actions={max_actions!r} only applies to backspace sampling; pass a "
                       "backspace_id or drop max_actions.")
    return None
  real = num_real_tokens(lm) or lm.vocab_size
  if (isinstance(backspace_id, bool) or not isinstance(backspace_id, (int, np.integer))
      or not 0 <= backspace_id < real or backspace_id == eos_id):
    raise ValueError(f"backspace_id={backspace_id!r} must be a Python int in [0, {real}) (a "
                     f"sampleable id of the model) other than eos_id={eos_id}.")
  if max_actions is None:
    return 2 * max_new_tokens
  if isinstance(max_actions, bool) or not isinstance(max_actions, (int, np.integer)) \
      or max_actions < 1:
    raise ValueError(f"max_actions={max_actions!r} must be a Python int >= 1.")
  return int(max_actions)


@flax.struct.dataclass
class _Stack:
  """Per row: the visible response slots of a backspace generation (see the module docstring).

  Entry d < depth describes the kept token at depth d (its position): the cache slot holding
  it now (a <bksp> copy replaces the original), its id and the log-probs of the action that
  pushed it. `member` [R, max_actions] marks the slots on the stack: the visibility row.
  """
  slot: jax.Array            # [R, T] int32
  token: jax.Array           # [R, T] int32
  logprob: jax.Array         # [R, T] float32
  sample_logprob: jax.Array  # [R, T] float32
  depth: jax.Array           # [R] int32
  member: jax.Array          # [R, L] bool


def _apply_actions(stack: _Stack, action_R: jax.Array, logprob_R: jax.Array,
                   sample_logprob_R: jax.Array, live_R: jax.Array, step: jax.Array,
                   boundary_R: jax.Array, backspace_id: int, pad_id: int
                   ) -> tuple[_Stack, jax.Array, jax.Array]:
  """Applies action `step` of each live row to its stack.

  Returns:
    (new stack, token to feed at slot `step` [R], its position [R]); rows that are not live
    keep their stack and feed `pad_id` at position 0.
  """
  depth_R = stack.depth
  depths_T = jnp.arange(stack.token.shape[1], dtype=jnp.int32)
  slots_L = jnp.arange(stack.member.shape[1], dtype=jnp.int32)
  this_slot_RxL = jnp.broadcast_to(slots_L == step, stack.member.shape)
  at = lambda x_RxT, d_R: jnp.take_along_axis(x_RxT, d_R[:, None], axis=1)[:, 0]

  # A token: push it at depth `depth`.
  push_here_RxT = depths_T[None, :] == depth_R[:, None]
  pushed = _Stack(
      slot=jnp.where(push_here_RxT, step, stack.slot),
      token=jnp.where(push_here_RxT, action_R[:, None], stack.token),
      logprob=jnp.where(push_here_RxT, logprob_R[:, None], stack.logprob),
      sample_logprob=jnp.where(push_here_RxT, sample_logprob_R[:, None], stack.sample_logprob),
      depth=depth_R + 1, member=stack.member | this_slot_RxL)

  # <bksp>: pop the last generated slot (none at the prompt boundary); the copy of the new
  # top (if any) takes its place on the stack, so neither the popped slot nor the original
  # top stays visible.
  popped_R = jnp.maximum(depth_R - 1, 0)
  member_RxL = jnp.where((depth_R > 0)[:, None],
                         stack.member & (slots_L[None, :] != at(stack.slot, popped_R)[:, None]),
                         stack.member)
  top_R = popped_R - 1
  has_top_R = top_R >= 0
  top_c_R = jnp.maximum(top_R, 0)
  member_RxL = jnp.where(has_top_R[:, None],
                         (member_RxL & (slots_L[None, :] != at(stack.slot, top_c_R)[:, None]))
                         | this_slot_RxL, member_RxL)
  replace_RxT = (depths_T[None, :] == top_c_R[:, None]) & has_top_R[:, None]
  backspaced = stack.replace(slot=jnp.where(replace_RxT, step, stack.slot), depth=popped_R,
                             member=member_RxL)

  is_backspace_R = action_R == backspace_id

  def pick(push_x, backspace_x, old_x):
    expand = lambda m: m.reshape(m.shape + (1,) * (old_x.ndim - 1))
    return jnp.where(expand(live_R), jnp.where(expand(is_backspace_R), backspace_x, push_x),
                     old_x)

  new_stack = jax.tree.map(pick, pushed, backspaced, stack)
  feed_token_R = pick(action_R, jnp.where(has_top_R, at(stack.token, top_c_R), boundary_R),
                      jnp.full_like(action_R, pad_id))
  feed_position_R = pick(depth_R, jnp.where(has_top_R, top_R, -1), jnp.zeros_like(depth_R))
  return new_stack, feed_token_R, feed_position_R


def _sample_actions(lm: LanguageModel, params: Params, prompt: jax.Array,
                    prompt_mask: jax.Array, rng: jax.Array, *, max_new_tokens: int,
                    max_actions: int, temperature: jax.Array, top_k: jax.Array,
                    top_p: jax.Array, num_samples: int, eos_id: int, pad_id: int,
                    backspace_id: int, forced_actions: Any, return_logits: bool
                    ) -> SampleOutput:
  """`sample` with a <bksp> action: one cache slot per action (see the module docstring)."""
  num_real = num_real_tokens(lm)
  logits_BxV, cache = lm.prefill(params, prompt, prompt_mask, max_actions)
  expand = lambda x: jnp.repeat(x, num_samples, axis=0) if num_samples > 1 else x
  logits_RxV = mask_padded_vocab(expand(logits_BxV), num_real)
  cache = jax.tree.map(expand, cache)
  prompt_R, prompt_mask_R = expand(prompt).astype(jnp.int32), expand(prompt_mask)
  boundary_R = sequencematch.boundary_tokens(lm, prompt_R)
  rows = logits_RxV.shape[0]
  if forced_actions is not None:
    forced_RxL = jnp.asarray(forced_actions, jnp.int32)
    if forced_RxL.shape != (rows, max_actions):
      raise ValueError(f"forced_actions has shape {tuple(forced_RxL.shape)}; expected "
                       f"{(rows, max_actions)} (B * num_samples, max_actions).")

  def choose(step, logits_RxV, done_R):
    action_R, logprob_R, sample_logprob_R = _choose_tokens(
        logits_RxV, jax.random.fold_in(rng, step), temperature, top_k, top_p)
    if forced_actions is not None:
      forced_R = jax.lax.dynamic_index_in_dim(forced_RxL, step, axis=1, keepdims=False)
      is_forced_R = forced_R >= 0
      forced_logprob_R = jnp.take_along_axis(jax.nn.log_softmax(logits_RxV, axis=-1),
                                             jnp.maximum(forced_R, 0)[:, None], axis=-1)[:, 0]
      action_R = jnp.where(is_forced_R, forced_R, action_R)
      logprob_R = jnp.where(is_forced_R, forced_logprob_R, logprob_R)
      sample_logprob_R = jnp.where(is_forced_R, 0.0, sample_logprob_R)
    return action_R, logprob_R, sample_logprob_R

  def act(step, logits_RxV, carry):
    """Draws action `step`, records it and applies it; returns the carry minus the cache."""
    done_R, terminated_R, stack, buffers = carry
    live_R = ~done_R
    action_R, logprob_R, sample_logprob_R = choose(step, logits_RxV, done_R)
    stack, feed_token_R, feed_position_R = _apply_actions(
        stack, action_R, logprob_R, sample_logprob_R, live_R, step, boundary_R, backspace_id,
        pad_id)
    ends_R = live_R & (action_R == eos_id)
    terminated_R = terminated_R | ends_R
    done_R = done_R | ends_R | (stack.depth >= max_new_tokens) | (step + 1 >= max_actions)
    values = (jnp.where(live_R, action_R, pad_id), live_R.astype(jnp.int32))
    if return_logits:
      values += (logits_RxV,)
    buffers = tuple(jax.lax.dynamic_update_index_in_dim(buf, val, step, axis=1)
                    for buf, val in zip(buffers, values))
    return (done_R, terminated_R, stack, buffers), (feed_token_R, feed_position_R)

  stack = _Stack(slot=jnp.zeros((rows, max_new_tokens), jnp.int32),
                 token=jnp.full((rows, max_new_tokens), pad_id, jnp.int32),
                 logprob=jnp.zeros((rows, max_new_tokens), jnp.float32),
                 sample_logprob=jnp.zeros((rows, max_new_tokens), jnp.float32),
                 depth=jnp.zeros((rows,), jnp.int32),
                 member=jnp.zeros((rows, max_actions), bool))
  buffers = (jnp.full((rows, max_actions), pad_id, jnp.int32),
             jnp.zeros((rows, max_actions), jnp.int32))
  if return_logits:
    buffers += (jnp.zeros((rows, max_actions, logits_RxV.shape[-1]), jnp.float32),)
  no_rows_R = jnp.zeros((rows,), bool)
  # Action 0 comes from the prefill logits; each iteration feeds action j - 1 into slot j - 1
  # and draws action j.
  state, feed = act(0, logits_RxV, (no_rows_R, no_rows_R, stack, buffers))

  def keep_going(carry):
    step, (done_R, *_), _, _ = carry
    return (step < max_actions) & ~jnp.all(done_R)

  def body(carry):
    step, state, (feed_token_R, feed_position_R), cache = carry
    stack = state[2]
    logits_RxV, cache = lm.decode_step(params, cache, feed_token_R, step - 1, feed_position_R,
                                       stack.member)
    state, feed = act(step, mask_padded_vocab(logits_RxV, num_real), state)
    return step + 1, state, feed, cache

  _, state, _, _ = jax.lax.while_loop(keep_going, body, (jnp.int32(1), state, feed, cache))
  _, terminated_R, stack, buffers = state
  kept_RxT = jnp.arange(max_new_tokens)[None, :] < stack.depth[:, None]
  return SampleOutput(
      tokens=jnp.where(kept_RxT, stack.token, pad_id), mask=kept_RxT.astype(jnp.int32),
      logprobs=jnp.where(kept_RxT, stack.logprob, 0.0),
      sample_logprobs=jnp.where(kept_RxT, stack.sample_logprob, 0.0), length=stack.depth,
      truncated=~terminated_R, prompt=prompt_R, prompt_mask=prompt_mask_R.astype(jnp.int32),
      actions=buffers[0], actions_mask=buffers[1],
      action_logits=buffers[2] if return_logits else None)


def greedy(lm: LanguageModel, params: Params, prompt: jax.Array, prompt_mask: jax.Array, *,
           max_new_tokens: int, eos_id: int, pad_id: int = 0) -> SampleOutput:
  """Argmax decoding: `sample` with temperature 0 and one sample per prompt ([B, T] rows)."""
  return sample(lm, params, prompt, prompt_mask, jax.random.key(0),
                max_new_tokens=max_new_tokens, temperature=0.0, num_samples=1, eos_id=eos_id,
                pad_id=pad_id)


def make_sampler(lm: LanguageModel, *, max_new_tokens: int, num_samples: int = 1, eos_id: int,
                 pad_id: int = 0, mesh: Mesh | None = None, backspace_id: int | None = None,
                 max_actions: int | None = None) -> Callable[..., SampleOutput]:
  """A compiled-once `sampler(params, prompt, prompt_mask, rng, temperature, top_k, top_p)`.

  The knobs are cast to fixed dtypes (float32, int32, float32) before the jitted call, so any
  values (Python or NumPy scalars) reuse the same executable. The jitted function itself is
  `sampler.jitted`.

  Args:
    lm: the language model.
    max_new_tokens, num_samples, eos_id, pad_id: static, as in `sample`.
    backspace_id, max_actions: static, as in `sample` (backspace sampling for SequenceMatch).
    mesh: optional device mesh. With one, parameters are sharded by their logical axes
      (`jaxsi.partitioning`), prompts and outputs along the batch over ("data", "fsdp"), and the
      model's activation constraints are active; B * num_samples should then divide evenly over
      the batch axes.

  Returns:
    The sampler; it returns a `SampleOutput` with B * num_samples rows.
  """
  _check_static(max_new_tokens, num_samples, eos_id, pad_id)
  max_actions = _check_backspace(lm, backspace_id, max_actions, max_new_tokens, eos_id)

  def run(params, prompt, prompt_mask, rng, temperature, top_k, top_p):
    return sample(lm, params, prompt, prompt_mask, rng, max_new_tokens=max_new_tokens,
                  temperature=temperature, top_k=top_k, top_p=top_p, num_samples=num_samples,
                  eos_id=eos_id, pad_id=pad_id, backspace_id=backspace_id,
                  max_actions=max_actions)

  if mesh is None:
    jitted = jax.jit(run)
  else:
    param_shardings = partitioning.shardings_for(lm.param_axes(), lm.abstract_params(), mesh)
    rows, replicated = partitioning.batch_sharding, partitioning.replicated(mesh)
    out_shardings = SampleOutput(
        tokens=rows(mesh, 2), mask=rows(mesh, 2), logprobs=rows(mesh, 2),
        sample_logprobs=rows(mesh, 2), length=rows(mesh, 1), truncated=rows(mesh, 1),
        prompt=rows(mesh, 2), prompt_mask=rows(mesh, 2),
        actions=None if backspace_id is None else rows(mesh, 2),
        actions_mask=None if backspace_id is None else rows(mesh, 2))
    jitted = jax.jit(run, in_shardings=(param_shardings, rows(mesh, 2), rows(mesh, 2), replicated,
                                        replicated, replicated, replicated),
                     out_shardings=out_shardings)

  def sampler(params, prompt, prompt_mask, rng, temperature=1.0, top_k=0, top_p=1.0):
    _check_knobs(temperature, top_k, top_p)
    knobs = (np.float32(temperature), np.int32(top_k), np.float32(top_p))
    if mesh is None:
      return jitted(params, prompt, prompt_mask, rng, *knobs)
    with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.flax_rules()):
      return together(params, prompt, prompt_mask, rng, *knobs)

  # Several processes: compile, then wait for the others before the first sharded call.
  together = mesh_lib.compile_together(jitted, "sampler")
  sampler.jitted = jitted
  return sampler
