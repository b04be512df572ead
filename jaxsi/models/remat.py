"""Rematerialization of Transformer layers: which activations the backward pass recomputes.

A model config's `remat_policy` names what each layer keeps from its forward pass for the
backward pass; everything else is recomputed there (one more forward of the layer):

  none           keep everything (no rematerialization; the default).
  full           keep only the layer's inputs; recompute the whole layer.
  dots           keep the outputs of every matrix multiplication (projections, MLP, attention
                 scores and mixing); recompute norms, activations, softmax and the like.
  dots_no_batch  keep the outputs of matrix multiplications without batch dimensions (the
                 projections and the MLP, whose weights are parameters); recompute the attention
                 scores and mixing, the softmax and the elementwise work.

The policy only trades memory for compute: logits and gradients are the same as with "none"
(up to the float reassociation XLA may choose for a different program).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax

POLICIES = ("none", "full", "dots", "dots_no_batch")

_SAVEABLE = {
    "full": None,  # jax.checkpoint's default: save nothing but the inputs
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_policy(policy: Any, family: str) -> None:
  """Raises ValueError with one sentence unless `policy` is one of `POLICIES`."""
  if policy not in POLICIES:
    raise ValueError(f"{family} config remat_policy={policy!r} is unknown; accepted: "
                     f"{list(POLICIES)}.")


def wrap(layer_class: type[nn.Module], policy: str, *, static_argnums: Sequence[int],
         in_scan: bool) -> type[nn.Module]:
  """`layer_class` whose `__call__` rematerializes under `policy` ("none": unchanged).

  Args:
    layer_class: a Flax module class.
    policy: one of `POLICIES`.
    static_argnums: positions of the Python (non-array) arguments of `__call__`, counting
      `self` as 0 (e.g. `deterministic`); they must be passed positionally.
    in_scan: the layer runs inside `nn.scan`, where preventing common-subexpression
      elimination is unnecessary (the loop already keeps the recomputation apart) and costly.

  Returns:
    A module class with the same fields, parameters and methods.
  """
  check_policy(policy, "Model")
  if policy == "none":
    return layer_class
  return nn.remat(layer_class, policy=_SAVEABLE[policy], prevent_cse=not in_scan,
                  static_argnums=tuple(static_argnums))
