"""A fence on the residual stream's gradient, so each layer computes it once (model knob).

A model config's `fence_residual_grads` (default False) puts `fence` on every residual sum of
every layer. In the backward pass the residual stream's cotangent is a long elementwise chain:
each layer adds its attention and MLP contributions and the layer-norm backward terms to the
cotangent of the layer above. XLA:CPU fuses such a cheap-looking chain into every consumer that
reads it (among them the transposes in front of the weight-gradient matmuls), so the chain is
recomputed several times per layer, and transitively through the layers above. The GKD train
step of `benchmarks/gkd_step.py` takes 0.180 s without the fence and 0.140 s with it.

`fence(x)` is the identity in the forward pass. In the backward pass its cotangent goes through
a `lax.cond` on a runtime predicate whose branches both return it unchanged: XLA fuses nothing
across a conditional, so the cotangent is computed once, into a buffer, that every consumer
reads. Values and gradients are those of the unfenced model, mostly bitwise (where a fence
moves a fusion boundary, XLA may sum in another order: ~1e-7 relative). The cost is one
conditional per fence per backward pass: negligible on CPU, but a GPU reads each conditional's
predicate on the host, so leave the knob off there and on TPU (the default). The forward pass
(sampling, evaluation, a teacher's logits) is unaffected.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def _fence(x: jax.Array) -> jax.Array:
  return x


def _fence_fwd(x: jax.Array) -> tuple[jax.Array, None]:
  return x, None


def _fence_bwd(_, cotangent: jax.Array) -> tuple[jax.Array]:
  # Known only at run time, so XLA keeps the conditional; either branch is the identity.
  first_is_finite = jnp.isfinite(cotangent.reshape(-1)[0])
  return (jax.lax.cond(first_is_finite, lambda g: g, lambda g: g * 1, cotangent),)


_fence.defvjp(_fence_fwd, _fence_bwd)


def fence(x: jax.Array, enabled: bool) -> jax.Array:
  """`x` [...] unchanged; with `enabled`, its cotangent is materialized once (module docstring)."""
  return _fence(x) if enabled else x
