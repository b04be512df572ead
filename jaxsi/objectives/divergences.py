"""Per-token divergences between teacher and student next-token distributions (GKD).

With T = softmax(teacher_logits / temperature) and S = softmax(student_logits / temperature):

  forward_kl  KL(T || S) = sum T (log T - log S)
  reverse_kl  KL(S || T)
  jsd         beta * KL(T || M) + (1 - beta) * KL(S || M),  M = beta T + (1 - beta) S,
              0 < beta < 1 (it tends to 0 at both ends, beta * KL(T||S) near 0 and
              (1 - beta) * KL(S||T) near 1)
  tvd         1/2 sum |T - S|

Everything is computed from log-probabilities in float32 (or wider, for float64
inputs); log M is a logsumexp of log beta + log T and log(1 - beta) + log S, never
the log of a sum of probabilities, which underflows. The temperature divides the
logits only: the values are not rescaled by temperature^2.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

NAMES = ("forward_kl", "reverse_kl", "jsd", "tvd")


def _kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
  """KL(P || Q) over the last axis from log-probabilities."""
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def _log_probs(logits: jax.Array, temperature: float, dtype) -> jax.Array:
  log_p = jax.nn.log_softmax(logits.astype(dtype) / temperature, axis=-1)
  # A logit of -inf (a masked-out token) gives log p = -inf and then 0 * inf = NaN
  # in the KL sums; the most negative finite value gives p = 0 and a finite term.
  return jnp.maximum(log_p, jnp.finfo(dtype).min)


def check_beta(name: str, beta: float | None) -> None:
  """Raises a ValueError unless `beta` suits divergence `name` (jsd needs 0 < beta < 1)."""
  if name != "jsd":
    return
  if beta is None:
    raise ValueError("The jsd divergence needs beta, a float strictly between 0 and 1.")
  beta = float(beta)
  if not 0.0 < beta < 1.0:
    raise ValueError(
        f"jsd beta must lie strictly between 0 and 1, got {beta}; for beta = 0 use "
        f"forward_kl (KL(T||S)), for beta = 1 use reverse_kl (KL(S||T)).")


def check_name(name: str) -> None:
  """Raises a ValueError unless `name` is one of NAMES."""
  if name not in NAMES:
    raise ValueError(f"Unknown divergence {name!r}; expected one of {', '.join(NAMES)}.")


def divergence(name: str, teacher_logits: jax.Array, student_logits: jax.Array, *,
               beta: float | None = None, temperature: float = 1.0) -> jax.Array:
  """Per-position divergence between teacher and student distributions.

  Args:
    name: one of NAMES.
    teacher_logits: [..., V] teacher logits (not differentiated by callers: wrap in
      `jax.lax.stop_gradient`).
    student_logits: [..., V] student logits, same shape.
    beta: the jsd interpolation weight, a Python float in (0, 1); ignored by the
      other divergences.
    temperature: > 0, divides both logits before the softmax.

  Returns:
    [...] float32 (float64 for float64 inputs) divergence per position, >= 0.
  """
  check_name(name)
  check_beta(name, beta)
  if teacher_logits.shape[-1] != student_logits.shape[-1]:
    raise ValueError(
        f"Teacher logits have vocabulary width {teacher_logits.shape[-1]} but student logits "
        f"have {student_logits.shape[-1]}; both models must share one output vocabulary "
        f"(keep both at the head width).")
  if teacher_logits.shape != student_logits.shape:
    raise ValueError(f"Teacher logits of shape {teacher_logits.shape} and student logits of "
                     f"shape {student_logits.shape} differ; expected the same [..., V] shape.")
  temperature = float(temperature)
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")

  dtype = jnp.promote_types(jnp.promote_types(teacher_logits.dtype, student_logits.dtype),
                            jnp.float32)
  log_t = _log_probs(teacher_logits, temperature, dtype)
  log_s = _log_probs(student_logits, temperature, dtype)
  if name == "forward_kl":
    return _kl(log_t, log_s)
  if name == "reverse_kl":
    return _kl(log_s, log_t)
  if name == "tvd":
    return 0.5 * jnp.sum(jnp.abs(jnp.exp(log_t) - jnp.exp(log_s)), axis=-1)
  beta = float(beta)
  log_m = jnp.logaddexp(math.log(beta) + log_t, math.log1p(-beta) + log_s)
  return beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)
