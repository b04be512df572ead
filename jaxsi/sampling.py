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
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxsi import partitioning
from jaxsi.models.lm import LanguageModel, Params


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
  """
  tokens: jax.Array
  mask: jax.Array
  logprobs: jax.Array
  sample_logprobs: jax.Array
  length: jax.Array
  truncated: jax.Array
  prompt: jax.Array
  prompt_mask: jax.Array


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
    token_R = jax.random.categorical(rng, filtered_RxV, axis=-1).astype(jnp.int32)
    sample_logprob_R = jnp.take_along_axis(jax.nn.log_softmax(filtered_RxV, axis=-1),
                                           token_R[:, None], axis=-1)[:, 0]
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
           top_p: Any = 1.0, num_samples: int = 1, eos_id: int, pad_id: int = 0
           ) -> SampleOutput:
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

  Returns:
    `SampleOutput` with B * N rows (rows b*N .. b*N+N-1 belong to prompt b).
  """
  _check_static(max_new_tokens, num_samples, eos_id, pad_id)
  _check_knobs(temperature, top_k, top_p)
  prompt, prompt_mask = jnp.asarray(prompt), jnp.asarray(prompt_mask)
  if prompt.ndim != 2 or prompt_mask.shape != prompt.shape:
    raise ValueError(f"prompt {tuple(prompt.shape)} and prompt_mask {tuple(prompt_mask.shape)} "
                     "must have the same [B, S] shape.")
  temperature = jnp.asarray(temperature, jnp.float32)
  top_k = jnp.asarray(top_k, jnp.int32)
  top_p = jnp.asarray(top_p, jnp.float32)
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


def greedy(lm: LanguageModel, params: Params, prompt: jax.Array, prompt_mask: jax.Array, *,
           max_new_tokens: int, eos_id: int, pad_id: int = 0) -> SampleOutput:
  """Argmax decoding: `sample` with temperature 0 and one sample per prompt ([B, T] rows)."""
  return sample(lm, params, prompt, prompt_mask, jax.random.key(0),
                max_new_tokens=max_new_tokens, temperature=0.0, num_samples=1, eos_id=eos_id,
                pad_id=pad_id)


def make_sampler(lm: LanguageModel, *, max_new_tokens: int, num_samples: int = 1, eos_id: int,
                 pad_id: int = 0, mesh: Mesh | None = None) -> Callable[..., SampleOutput]:
  """A compiled-once `sampler(params, prompt, prompt_mask, rng, temperature, top_k, top_p)`.

  The knobs are cast to fixed dtypes (float32, int32, float32) before the jitted call, so any
  values (Python or NumPy scalars) reuse the same executable. The jitted function itself is
  `sampler.jitted`.

  Args:
    lm: the language model.
    max_new_tokens, num_samples, eos_id, pad_id: static, as in `sample`.
    mesh: optional device mesh. With one, parameters are sharded by their logical axes
      (`jaxsi.partitioning`), prompts and outputs along the batch over ("data", "fsdp"), and the
      model's activation constraints are active; B * num_samples should then divide evenly over
      the batch axes.

  Returns:
    The sampler; it returns a `SampleOutput` with B * num_samples rows.
  """
  _check_static(max_new_tokens, num_samples, eos_id, pad_id)

  def run(params, prompt, prompt_mask, rng, temperature, top_k, top_p):
    return sample(lm, params, prompt, prompt_mask, rng, max_new_tokens=max_new_tokens,
                  temperature=temperature, top_k=top_k, top_p=top_p, num_samples=num_samples,
                  eos_id=eos_id, pad_id=pad_id)

  if mesh is None:
    jitted = jax.jit(run)
  else:
    param_shardings = partitioning.shardings_for(lm.param_axes(), lm.abstract_params(), mesh)
    rows, replicated = partitioning.batch_sharding, partitioning.replicated(mesh)
    out_shardings = SampleOutput(
        tokens=rows(mesh, 2), mask=rows(mesh, 2), logprobs=rows(mesh, 2),
        sample_logprobs=rows(mesh, 2), length=rows(mesh, 1), truncated=rows(mesh, 1),
        prompt=rows(mesh, 2), prompt_mask=rows(mesh, 2))
    jitted = jax.jit(run, in_shardings=(param_shardings, rows(mesh, 2), rows(mesh, 2), replicated,
                                        replicated, replicated, replicated),
                     out_shardings=out_shardings)

  def sampler(params, prompt, prompt_mask, rng, temperature=1.0, top_k=0, top_p=1.0):
    _check_knobs(temperature, top_k, top_p)
    knobs = (np.float32(temperature), np.int32(top_k), np.float32(top_p))
    if mesh is None:
      return jitted(params, prompt, prompt_mask, rng, *knobs)
    with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.flax_rules()):
      return jitted(params, prompt, prompt_mask, rng, *knobs)

  sampler.jitted = jitted
  return sampler
