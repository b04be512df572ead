"""Supervised fine-tuning: masked negative log-likelihood of the dataset responses."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from jaxsi.models import lm as lm_lib

NORMALIZATIONS = ("sequence", "token")


def default_objective_config() -> ml_collections.ConfigDict:
  """Returns the SFT objective config.

  Keys:
    name: "sft".
    normalization: "sequence" (mean over each sequence's tokens, then over sequences) or
      "token" (mean over all tokens of the batch).
  """
  cfg = ml_collections.ConfigDict()
  cfg.name = "sft"
  cfg.normalization = "sequence"
  return cfg


def check_normalization(normalization: str) -> None:
  """Raises a ValueError unless `normalization` is one of NORMALIZATIONS."""
  if normalization not in NORMALIZATIONS:
    raise ValueError(f"Unknown normalization {normalization!r}; expected one of "
                     f"{', '.join(NORMALIZATIONS)}.")


def normalize(per_token_BxT: jax.Array, mask_BxT: jax.Array, normalization: str) -> jax.Array:
  """Averages per-token values over the unmasked tokens of a batch.

  Args:
    per_token_BxT: [B, T] values; those at masked positions must already be 0.
    mask_BxT: [B, T] float, 1 on real tokens.
    normalization: "sequence": mean over each sequence's tokens, then mean over
      the sequences that have at least one token; "token": mean over all tokens.

  Returns:
    [] the average (0 when the batch has no token).
  """
  check_normalization(normalization)
  if normalization == "token":
    return per_token_BxT.sum() / jnp.maximum(mask_BxT.sum(), 1.0)
  tokens_B = mask_BxT.sum(axis=-1)
  per_sequence_B = per_token_BxT.sum(axis=-1) / jnp.maximum(tokens_B, 1.0)
  has_tokens_B = (tokens_B > 0).astype(per_sequence_B.dtype)
  return (per_sequence_B * has_tokens_B).sum() / jnp.maximum(has_tokens_B.sum(), 1.0)


def masked_nll(logits_BxTxV: jax.Array, targets_BxT: jax.Array, mask_BxT: jax.Array, *,
               normalization: str = "sequence") -> tuple[jax.Array, dict[str, jax.Array]]:
  """Negative log-likelihood of `targets` under `logits`, over unmasked positions only.

  Computed in float32 (or wider) with log_softmax. Masked positions have no effect
  on the value or the gradient, whatever their logits (even inf/NaN) or targets
  (even out of range).

  Args:
    logits_BxTxV: [B, T, V] next-token logits.
    targets_BxT: [B, T] int token ids.
    mask_BxT: [B, T] bool/int/float, 1 on positions that count.
    normalization: "sequence" (per-sequence mean over its unmasked tokens, then
      mean over the sequences that have any) or "token" (mean over all unmasked
      tokens).

  Returns:
    (loss [], metrics) with metrics "loss" (= loss), "nll" (token-mean NLL,
    whatever the normalization, so runs stay comparable), "token_accuracy"
    (argmax == target over unmasked tokens) and "num_tokens", all float32 scalars.
  """
  check_normalization(normalization)
  if logits_BxTxV.ndim != 3 or logits_BxTxV.shape[:2] != targets_BxT.shape:
    raise ValueError(f"logits of shape {logits_BxTxV.shape} do not fit targets of shape "
                     f"{targets_BxT.shape}; expected [B, T, V] logits for [B, T] targets.")
  if mask_BxT.shape != targets_BxT.shape:
    raise ValueError(f"mask of shape {mask_BxT.shape} does not match targets of shape "
                     f"{targets_BxT.shape}.")
  dtype = jnp.promote_types(logits_BxTxV.dtype, jnp.float32)
  valid_BxT = mask_BxT.astype(bool)
  vocab = logits_BxTxV.shape[-1]
  # Zeroing the logits of masked positions keeps inf/NaN padding out of the
  # forward pass and out of the backward pass (where() alone would still leak
  # NaN through log_softmax's gradient).
  logits_BxTxV = jnp.where(valid_BxT[..., None], logits_BxTxV.astype(dtype), 0.0)
  targets_BxT = jnp.where(valid_BxT, jnp.clip(targets_BxT, 0, vocab - 1), 0)
  log_probs_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
  target_log_prob_BxT = jnp.take_along_axis(
      log_probs_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
  mask_f_BxT = valid_BxT.astype(dtype)
  nll_BxT = -target_log_prob_BxT * mask_f_BxT
  loss = normalize(nll_BxT, mask_f_BxT, normalization)

  num_tokens = mask_f_BxT.sum()
  correct_BxT = (jnp.argmax(logits_BxTxV, axis=-1) == targets_BxT).astype(dtype) * mask_f_BxT
  denominator = jnp.maximum(num_tokens, 1.0)
  metrics = {
      "loss": loss,
      "nll": nll_BxT.sum() / denominator,
      "token_accuracy": correct_BxT.sum() / denominator,
      "num_tokens": num_tokens,
  }
  return loss, jax.tree.map(lambda x: jax.lax.stop_gradient(x).astype(jnp.float32), metrics)


def make_loss_fn(lm: lm_lib.LanguageModel, objective_cfg: ml_collections.ConfigDict
                 ) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
  """Builds the SFT `loss_fn(params, frozen, batch, rng, step) -> (loss, metrics)`.

  Args:
    lm: the model being trained.
    objective_cfg: see `default_objective_config`.

  Returns:
    A pure loss function: NLL of `batch["response"]` under `lm.logits` (dropout
    driven by `rng`), masked by `batch["response_mask"]`. `frozen` and `step` are
    unused.
  """
  normalization = objective_cfg.normalization
  check_normalization(normalization)

  def loss_fn(params: Any, frozen: Any, batch: lm_lib.Batch, rng: jax.Array,
              step: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    del frozen, step
    logits_BxTxV = lm.logits(params, batch, dropout_rng=rng)
    return masked_nll(logits_BxTxV, batch["response"], batch["response_mask"],
                      normalization=normalization)

  return loss_fn
