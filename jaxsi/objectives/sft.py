"""Supervised fine-tuning: masked negative log-likelihood of the dataset responses."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from jaxsi.models import lm as lm_lib
from jaxsi.objectives import chunked

NORMALIZATIONS = ("sequence", "token")


def default_objective_config() -> ml_collections.ConfigDict:
  """Returns the SFT objective config.

  Keys:
    name: "sft".
    normalization: "sequence" (mean over each sequence's tokens, then over sequences) or
      "token" (mean over all tokens of the batch).
    vocab_chunk_size: 0 (default) computes the full [B, T, V] logits; c > 0 applies the
      output head to c response positions at a time and recomputes them in the backward pass
      (`jaxsi.objectives.chunked`): the same loss and gradients, peak memory O(B·c·V) instead
      of O(B·T·V), one more head forward pass per step.
  """
  cfg = ml_collections.ConfigDict()
  cfg.name = "sft"
  cfg.normalization = "sequence"
  cfg.vocab_chunk_size = 0
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


def token_nll(logits_BxTxV: jax.Array, targets_BxT: jax.Array, mask_BxT: jax.Array
              ) -> dict[str, jax.Array]:
  """Per-token NLL and argmax hits of `targets` under `logits`, 0 at masked positions.

  Computed in float32 (or wider) with log_softmax. Masked positions have no effect on the
  values or the gradient, whatever their logits (even inf/NaN) or targets (even out of
  range). Each position depends only on its own logits, so this also runs on a slice of
  positions (`jaxsi.objectives.chunked`).

  Args:
    logits_BxTxV: [B, T, V] next-token logits.
    targets_BxT: [B, T] int token ids.
    mask_BxT: [B, T] bool/int/float, 1 on positions that count.

  Returns:
    {"nll": [B, T] −log p(target), "correct": [B, T] 1.0 where argmax == target
    (stop-gradient)}, both float32 (float64 for float64 logits) and 0 where masked.
  """
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
  correct_BxT = (jnp.argmax(logits_BxTxV, axis=-1) == targets_BxT).astype(dtype) * mask_f_BxT
  return {"nll": -target_log_prob_BxT * mask_f_BxT,
          "correct": jax.lax.stop_gradient(correct_BxT)}


def nll_loss(per_token: dict[str, jax.Array], mask_BxT: jax.Array, *,
             normalization: str = "sequence") -> tuple[jax.Array, dict[str, jax.Array]]:
  """The SFT loss and metrics from `token_nll`'s per-token values.

  Args:
    per_token: {"nll": [B, T], "correct": [B, T]} from `token_nll` (whole or chunked).
    mask_BxT: [B, T] bool/int/float, 1 on positions that count.
    normalization: see `masked_nll`.

  Returns:
    (loss [], metrics) as `masked_nll` returns them.
  """
  check_normalization(normalization)
  nll_BxT = per_token["nll"]
  mask_f_BxT = mask_BxT.astype(bool).astype(nll_BxT.dtype)
  loss = normalize(nll_BxT, mask_f_BxT, normalization)
  num_tokens = mask_f_BxT.sum()
  denominator = jnp.maximum(num_tokens, 1.0)
  metrics = {
      "loss": loss,
      "nll": nll_BxT.sum() / denominator,
      "token_accuracy": per_token["correct"].sum() / denominator,
      "num_tokens": num_tokens,
  }
  return loss, jax.tree.map(lambda x: jax.lax.stop_gradient(x).astype(jnp.float32), metrics)


def _check_inputs(per_position_BxTxX: jax.Array, what: str, width: str, targets_BxT: jax.Array,
                  mask_BxT: jax.Array, normalization: str) -> None:
  """Raises a ValueError unless `what` [B, T, width], targets [B, T] and mask [B, T] fit."""
  check_normalization(normalization)
  if per_position_BxTxX.ndim != 3 or per_position_BxTxX.shape[:2] != targets_BxT.shape:
    raise ValueError(f"{what} of shape {per_position_BxTxX.shape} do not fit targets of shape "
                     f"{targets_BxT.shape}; expected [B, T, {width}] {what} for [B, T] targets.")
  if mask_BxT.shape != targets_BxT.shape:
    raise ValueError(f"mask of shape {mask_BxT.shape} does not match targets of shape "
                     f"{targets_BxT.shape}.")


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
  _check_inputs(logits_BxTxV, "logits", "V", targets_BxT, mask_BxT, normalization)
  return nll_loss(token_nll(logits_BxTxV, targets_BxT, mask_BxT), mask_BxT,
                  normalization=normalization)


def chunked_nll(lm: lm_lib.LanguageModel, params: Any, hidden_BxTxE: jax.Array,
                targets_BxT: jax.Array, mask_BxT: jax.Array, *, chunk_size: int,
                normalization: str = "sequence") -> tuple[jax.Array, dict[str, jax.Array]]:
  """`masked_nll` of `lm.head(params, hidden)` without ever holding the [B, T, V] logits.

  The head and `token_nll` run on `chunk_size` positions at a time
  (`chunked.map_token_chunks`); loss, gradients and metrics equal `masked_nll`'s up to
  float32 rounding.

  Args:
    lm: the model whose `head` maps features to logits.
    params: its parameters.
    hidden_BxTxE: [B, T, E] features from `lm.hidden`.
    targets_BxT: [B, T] int token ids.
    mask_BxT: [B, T] bool/int/float, 1 on positions that count.
    chunk_size: positions per chunk, > 0.
    normalization: see `masked_nll`.

  Returns:
    (loss [], metrics) as `masked_nll` returns them.
  """
  _check_inputs(hidden_BxTxE, "features", "E", targets_BxT, mask_BxT, normalization)

  def chunk_nll(p, chunk):
    return token_nll(lm.head(p, chunk["hidden"]), chunk["targets"], chunk["mask"])

  per_token = chunked.map_token_chunks(
      chunk_nll, params,
      {"hidden": hidden_BxTxE, "targets": targets_BxT, "mask": mask_BxT.astype(bool)},
      chunk_size)
  return nll_loss(per_token, mask_BxT, normalization=normalization)


def make_loss_fn(lm: lm_lib.LanguageModel, objective_cfg: ml_collections.ConfigDict
                 ) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
  """Builds the SFT `loss_fn(params, frozen, batch, rng, step) -> (loss, metrics)`.

  Args:
    lm: the model being trained.
    objective_cfg: see `default_objective_config`.

  Returns:
    A pure loss function: NLL of `batch["response"]` under `lm.logits` (dropout
    driven by `rng`), masked by `batch["response_mask"]`; with `vocab_chunk_size` > 0
    the same value from `lm.hidden` and `lm.head` in chunks (`chunked_nll`). `frozen`
    and `step` are unused.
  """
  normalization = objective_cfg.normalization
  check_normalization(normalization)
  # Configs built before the knob existed (or by hand) lack the key: no chunking.
  chunk_size = objective_cfg.get("vocab_chunk_size", 0)
  chunked.check_chunk_size(chunk_size, "SFT")
  if chunk_size:
    chunked.check_exposes_head(lm, "SFT", chunk_size)

  def loss_fn(params: Any, frozen: Any, batch: lm_lib.Batch, rng: jax.Array,
              step: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    del frozen, step
    if chunk_size:
      hidden_BxTxE = lm.hidden(params, batch, dropout_rng=rng)
      return chunked_nll(lm, params, hidden_BxTxE, batch["response"], batch["response_mask"],
                         chunk_size=chunk_size, normalization=normalization)
    logits_BxTxV = lm.logits(params, batch, dropout_rng=rng)
    return masked_nll(logits_BxTxV, batch["response"], batch["response_mask"],
                      normalization=normalization)

  return loss_fn
