"""Greedy decoding through the model's KV cache (used by evals until the sampler replaces it)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsi.models.lm import LanguageModel


def mask_padded_vocab(logits_BxV: jax.Array, num_real_tokens: int | None) -> jax.Array:
  """Sets logits of head rows beyond the tokenizer's vocabulary to -inf (they are never produced)."""
  if not num_real_tokens or num_real_tokens >= logits_BxV.shape[-1]:
    return logits_BxV
  real = jnp.arange(logits_BxV.shape[-1]) < num_real_tokens
  return jnp.where(real, logits_BxV, -jnp.inf)


def greedy_decode(lm: LanguageModel, params, prompt_BxS: jax.Array, prompt_mask_BxS: jax.Array, *,
                  max_new_tokens: int, eos_id: int, pad_id: int = 0) -> tuple[jax.Array, jax.Array]:
  """Argmax decoding of up to `max_new_tokens` tokens per prompt.

  Args:
    lm: the language model.
    params: its parameters.
    prompt_BxS: [B, S] int32 left-padded prompts.
    prompt_mask_BxS: [B, S].
    max_new_tokens: static number of decode steps.
    eos_id: end-of-sequence id; tokens after the first EOS are `pad_id`.

  Returns:
    (tokens [B, T] int32, mask [B, T] int32: 1 up to and including the first EOS).
  """
  batch = prompt_BxS.shape[0]
  num_real = lm.config.get("num_real_tokens", None) if hasattr(lm.config, "get") else None
  logits_BxV, cache = lm.prefill(params, prompt_BxS, prompt_mask_BxS, max_new_tokens)
  slots_T = jnp.arange(max_new_tokens)

  def body(t, carry):
    tokens_BxT, mask_BxT, done_B, logits_BxV, cache = carry
    token_B = jnp.argmax(mask_padded_vocab(logits_BxV, num_real), axis=-1).astype(jnp.int32)
    token_B = jnp.where(done_B, pad_id, token_B)
    tokens_BxT = tokens_BxT.at[:, t].set(token_B)
    mask_BxT = mask_BxT.at[:, t].set((~done_B).astype(jnp.int32))
    done_B = done_B | (token_B == eos_id)
    visible_BxT = jnp.broadcast_to(slots_T[None, :] <= t, (batch, max_new_tokens))
    logits_BxV, cache = lm.decode_step(params, cache, token_B, t, jnp.full((batch,), t, jnp.int32),
                                       visible_BxT)
    return tokens_BxT, mask_BxT, done_B, logits_BxV, cache

  init = (jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
          jnp.zeros((batch, max_new_tokens), jnp.int32),
          jnp.zeros((batch,), bool), logits_BxV, cache)
  tokens_BxT, mask_BxT, _, _, _ = jax.lax.fori_loop(0, max_new_tokens, body, init)
  return tokens_BxT, mask_BxT
