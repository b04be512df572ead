"""Chunked evaluation of per-token losses over a model's output head.

A loss over the vocabulary normally holds logits [B, T, V] float32 (and the same again for
their gradient, the log-probabilities, and a teacher's logits in GKD): for a 32k-50k vocabulary
they outweigh everything else a small or medium model keeps alive. Here the token axis is split
into chunks of c positions; `map_token_chunks` runs a per-chunk function (the head applied to
the chunk's features [B, c, E], then the per-token loss terms) inside a `lax.scan`, its body
under `jax.checkpoint`. The forward pass keeps only the per-token results [B, T] and the
features; the backward pass recomputes each chunk's logits from its features when it reaches
it. Peak memory then holds O(B·c·V) logits instead of O(B·T·V), for the cost of one more head
forward pass (and, in GKD, one more teacher head pass) per step. What the loss still adds is
the gradient of the head's parameters ([V, E]), which the scan accumulates over the chunks.
Chunks split the positions, never the vocabulary: every softmax still sees all V logits.

The per-chunk function computes exactly what the unchunked loss computes on the full logits,
so losses, gradients and metrics agree to float32 rounding (tests/test_chunked.py).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxsi.models import lm as lm_lib

PyTree = Any


def check_chunk_size(chunk_size: Any, owner: str) -> None:
  """Raises a ValueError unless `chunk_size` is an int >= 0 (0 = no chunking).

  Args:
    chunk_size: the `vocab_chunk_size` value of an objective config.
    owner: the objective's name for the message, e.g. "SFT" or "GKD".
  """
  if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 0:
    raise ValueError(f"{owner} vocab_chunk_size={chunk_size!r} must be an integer >= 0 "
                     "(0 = full logits, c > 0 = evaluate the head on c positions at a time).")


def check_exposes_head(model: Any, owner: str, chunk_size: int) -> None:
  """Raises a ValueError unless `model` has `hidden` and `head` (which chunking needs).

  `jaxsi.models.lm.LanguageModel` declares both but leaves them unimplemented by default.
  """
  for method in ("hidden", "head"):
    found = getattr(type(model), method, None)
    if found is None or found is getattr(lm_lib.LanguageModel, method):
      raise ValueError(f"{owner} vocab_chunk_size={chunk_size} needs models that expose "
                       f"hidden() and head(), and {type(model).__name__} has no {method}(); "
                       "set vocab_chunk_size=0.")


def map_token_chunks(chunk_fn: Callable[[PyTree, PyTree], PyTree], params: PyTree,
                     per_token_BxT: PyTree, chunk_size: int) -> PyTree:
  """Applies `chunk_fn` to chunks of `chunk_size` token positions, rematerialized per chunk.

  The token axis (axis 1) of every leaf of `per_token_BxT` is zero-padded up to a multiple of
  c = min(chunk_size, T) and cut into n = ceil(T / c) chunks; `lax.scan` runs
  `jax.checkpoint(chunk_fn)(params, chunk)` on each, so the intermediates of a chunk (its
  [B, c, V] logits) exist only while that chunk is computed, in the forward and again in the
  backward pass. Padded positions hold zeros (False for bool leaves): include a validity mask
  in `per_token_BxT` and let `chunk_fn` zero its values there. Differentiable with respect to
  `params` and to the float leaves of `per_token_BxT`; usable inside `jit`.

  Args:
    chunk_fn: `chunk_fn(params, chunk) -> out`, where `chunk` is `per_token_BxT` with every
      leaf cut to [B, c, ...] and every leaf of `out` is [B, c, ...] (per-token results).
      Pure; it must treat positions independently (each output position depends only on the
      same input position), which is what makes chunking exact.
    params: closed-over inputs of every chunk (e.g. the head's parameters), not chunked.
    per_token_BxT: a pytree of [B, T, ...] arrays, e.g. features [B, T, E], token ids [B, T]
      and a mask [B, T]; all share B and T.
    chunk_size: c > 0, positions per chunk; values >= T give a single chunk.

  Returns:
    The pytree `chunk_fn` returns, each leaf reassembled to [B, T, ...].
  """
  leaves = jax.tree.leaves(per_token_BxT)
  if not leaves:
    raise ValueError("map_token_chunks needs at least one [B, T, ...] array to chunk.")
  if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
    raise ValueError(f"map_token_chunks chunk_size={chunk_size!r} must be a positive integer.")
  shapes = {tuple(leaf.shape[:2]) for leaf in leaves}
  if len(shapes) != 1 or any(leaf.ndim < 2 for leaf in leaves):
    raise ValueError(f"map_token_chunks needs [B, T, ...] arrays with one B and T; got shapes "
                     f"{[tuple(leaf.shape) for leaf in leaves]}.")
  (batch, length), = shapes
  chunk = min(chunk_size, length)
  num_chunks = -(-length // chunk)
  padded = num_chunks * chunk

  def to_chunks(x_BxTx):
    x_BxTx = jnp.asarray(x_BxTx)
    pad = [(0, 0)] * x_BxTx.ndim
    pad[1] = (0, padded - length)
    x_BxPx = jnp.pad(x_BxTx, pad)
    x_BxNxCx = x_BxPx.reshape((batch, num_chunks, chunk) + x_BxTx.shape[2:])
    return jnp.moveaxis(x_BxNxCx, 1, 0)  # [N, B, c, ...]: scan runs over the leading axis

  def from_chunks(y_NxBxCx):
    y_BxNxCx = jnp.moveaxis(y_NxBxCx, 0, 1)
    y_BxPx = y_BxNxCx.reshape((batch, padded) + y_NxBxCx.shape[3:])
    return y_BxPx[:, :length]

  chunks_NxBxC = jax.tree.map(to_chunks, per_token_BxT)
  # Nothing inside a chunk is saved for the backward pass: only the chunk's inputs are, and
  # its logits are recomputed from them. Inside a scan the recomputation cannot be merged with
  # the forward pass's, so the CSE barriers are not needed (JAX's advice for remat in scans).
  remat_fn = jax.checkpoint(chunk_fn, prevent_cse=False)

  def body(carry, chunk_BxC):
    return carry, remat_fn(params, chunk_BxC)

  _, out_NxBxC = jax.lax.scan(body, None, chunks_NxBxC)
  return jax.tree.map(from_chunks, out_NxBxC)
