"""Optimizers and learning-rate schedules, built from one ConfigDict.

Two optimizers, both straight from optax:

* `adafactor` with the T5 preset: second-moment decay 1 - t^-0.8, update
  clipping at block RMS 1.0, step size multiplied by max(RMS(param), 1e-3),
  no momentum, eps 1e-30, second moments factored for parameters whose two
  largest dimensions are both >= 128.
* `adamw`.

Both are preceded by gradient clipping by global norm when `grad_clip_norm` > 0.

Scanned layers (`scan_layers=True`) stack each layer stack's parameters on a leading [L] axis.
Adafactor decides per parameter which dimensions to factor, clips the update by the
parameter's block RMS and scales the step by the parameter's RMS, so it must see each layer's
slice as its own parameter: `per_layer` runs the optimizer under `jax.vmap` over the leading
axis of stacked leaves (found by `jaxsi.models.layer_stack.stacked_mask`), which makes a scanned
model train exactly like the unscanned one. Clipping by global norm stays global.

Weight decay has the same meaning for both: every step subtracts
lr_t * weight_decay * param, only for parameters with at least two dimensions
(kernels and embeddings; biases and norm scales are never decayed).

Schedules map the optimizer's update count `step` (0 for the first update) to a
learning rate. With `lr` = peak rate, W = warmup_steps, N = total_steps and
f = end_lr_fraction:

  constant  lr * min(1, step / W)                     (lr throughout when W = 0)
  linear    lr * step / W for step < W, then linear from lr at W down to
            f * lr at N, then f * lr
  cosine    lr * step / W for step < W, then
            lr * (f + (1 - f) * (1 + cos(pi * (step - W) / (N - W))) / 2)
            up to N, then f * lr
  rsqrt     lr * min(1, step / W) / sqrt(max(step, W))    (W >= 1)

`rsqrt` is T5X's `constant * linear_warmup * rsqrt_decay`: there `lr` is a
base scale, not the peak; the peak, at step W, is lr / sqrt(W) (lr = 1.0 with
W = 10000 peaks at T5's 0.01).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxsi.models import layer_stack

OPTIMIZERS = ("adafactor", "adamw")
SCHEDULES = ("constant", "linear", "cosine", "rsqrt")


def default_optim_config() -> ml_collections.ConfigDict:
  """Returns the optimizer config with every key and its default."""
  cfg = ml_collections.ConfigDict()
  cfg.name = "adafactor"           # one of OPTIMIZERS
  cfg.lr = 1e-3                    # peak learning rate (base scale for rsqrt)
  cfg.schedule = "constant"        # one of SCHEDULES
  cfg.warmup_steps = 0             # linear warmup from 0 over this many updates
  cfg.total_steps = 0              # end of the linear / cosine decay
  cfg.end_lr_fraction = 0.0        # linear / cosine end at end_lr_fraction * lr
  cfg.grad_clip_norm = 0.0         # clip gradients by global norm; 0 = off
  cfg.weight_decay = 0.0           # lr-coupled decay of parameters with ndim >= 2
  # AdamW.
  cfg.b1 = 0.9
  cfg.b2 = 0.999
  cfg.eps = 1e-8
  # Adafactor (T5 preset).
  cfg.adafactor_decay_rate = 0.8             # second-moment decay 1 - t^-decay_rate
  cfg.adafactor_clipping_threshold = 1.0     # max block RMS of the scaled update
  cfg.adafactor_multiply_by_parameter_scale = True  # times max(RMS(param), 1e-3)
  cfg.adafactor_min_dim_size_to_factor = 128
  cfg.adafactor_eps = 1e-30                  # added to squared gradients
  return cfg


def _check_choice(what: str, value, choices) -> None:
  if value not in choices:
    raise ValueError(f"Unknown {what} {value!r}; expected one of {', '.join(choices)}.")


def build_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
  """Builds the learning-rate schedule described in the module docstring.

  Args:
    cfg: an optimizer config (see `default_optim_config`).

  Returns:
    A function from the update count (int scalar, 0 for the first update) to
    the learning rate (float32 scalar).
  """
  _check_choice("optim.schedule", cfg.schedule, SCHEDULES)
  lr = float(cfg.lr)
  warmup = int(cfg.warmup_steps)
  total = int(cfg.total_steps)
  end_lr = float(cfg.end_lr_fraction) * lr
  if lr < 0:
    raise ValueError(f"optim.lr must be >= 0, got {lr}.")
  if warmup < 0:
    raise ValueError(f"optim.warmup_steps must be >= 0, got {warmup}.")

  if cfg.schedule == "constant":
    if warmup == 0:
      return optax.constant_schedule(lr)
    return optax.warmup_constant_schedule(0.0, lr, warmup)

  if cfg.schedule == "rsqrt":
    if warmup < 1:
      raise ValueError(
          f"optim.warmup_steps must be >= 1 for the rsqrt schedule (it divides by "
          f"sqrt(max(step, warmup_steps))), got {warmup}.")

    def rsqrt(step):
      step_f = jnp.asarray(step, jnp.float32)
      ramp = jnp.minimum(1.0, step_f / warmup)
      return lr * ramp * jax.lax.rsqrt(jnp.maximum(step_f, float(warmup)))

    return rsqrt

  # linear / cosine decay to end_lr at total_steps.
  if total <= warmup:
    raise ValueError(
        f"optim.total_steps must be greater than optim.warmup_steps ({warmup}) for the "
        f"{cfg.schedule} schedule, got {total}.")
  if not 0.0 <= float(cfg.end_lr_fraction) <= 1.0:
    raise ValueError(f"optim.end_lr_fraction must lie in [0, 1], got {cfg.end_lr_fraction}.")
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=total,
        end_value=end_lr)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup),
       optax.linear_schedule(lr, end_lr, total - warmup)],
      [warmup])


def _decay_mask(params):
  # Biases and norm scales (ndim < 2) are not decayed: shrinking them toward 0
  # only hurts (a norm scale of 0 kills its layer).
  return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


class PerLayerState(NamedTuple):
  """State of `per_layer` when some parameters are stacked.

  Attributes:
    single: the inner state of the unstacked parameters (stacked ones are `optax.MaskedNode`).
    stacked: one inner state per distinct layer count L of the stacked parameters (ascending
      L; e.g. T5's encoder and decoder stacks when their depths differ), every leaf [L, ...].
  """
  single: Any
  stacked: tuple[Any, ...]


def _select(tree: Any, keep: Any) -> Any:
  """`tree` with the leaves where `keep` is False replaced by `optax.MaskedNode`."""
  if tree is None:
    return None
  return jax.tree.map(lambda k, x: x if k else optax.MaskedNode(), keep, tree)


def _layer_groups(tree: Any, mask: Any) -> tuple[Any, list[Any]]:
  """(mask of unstacked leaves, one mask per distinct leading size of the stacked leaves)."""
  sizes = sorted({jnp.shape(x)[0] for m, x in zip(jax.tree.leaves(mask), jax.tree.leaves(tree))
                  if m})
  single = jax.tree.map(lambda m: not m, mask)
  groups = [jax.tree.map(lambda m, x, n=n: bool(m) and jnp.shape(x)[0] == n, mask, tree)
            for n in sizes]
  return single, groups


def per_layer(inner: optax.GradientTransformation,
              stacked: Callable[[Any], Any] = layer_stack.stacked_mask
              ) -> optax.GradientTransformation:
  """`inner` applied to each layer slice of stacked parameters as to a separate parameter.

  Leaves that `stacked` marks have a leading layer axis [L, ...]; `inner` runs on them under
  `jax.vmap` over that axis (one vmap per distinct L), so per-parameter statistics (Adafactor's
  factoring, update clipping and parameter scale, weight-decay masks by rank) are per layer,
  exactly as for unscanned layers. Other leaves go to `inner` directly. Without stacked leaves
  this is `inner` itself, state included (checkpoints of unscanned runs keep their layout).

  Args:
    inner: a per-leaf transformation (e.g. Adafactor, AdamW; not global-norm clipping).
    stacked: params -> a tree of bools like params, True for stacked leaves.

  Returns:
    A GradientTransformation whose `update` needs `params` when `inner`'s does.
  """

  def init(params):
    mask = stacked(params)
    if not any(jax.tree.leaves(mask)):
      return inner.init(params)
    single, groups = _layer_groups(params, mask)
    return PerLayerState(
        single=inner.init(_select(params, single)),
        stacked=tuple(jax.vmap(inner.init)(_select(params, group)) for group in groups))

  def update(updates, state, params=None):
    mask = stacked(updates)
    if not any(jax.tree.leaves(mask)):
      return inner.update(updates, state, params)
    single, groups = _layer_groups(updates, mask)
    new_updates, single_state = inner.update(_select(updates, single), state.single,
                                             _select(params, single))
    group_states = []
    for group, group_state in zip(groups, state.stacked):
      group_updates, group_state = jax.vmap(inner.update)(
          _select(updates, group), group_state, _select(params, group))
      new_updates = jax.tree.map(lambda g, a, b: b if g else a, group, new_updates,
                                 group_updates)
      group_states.append(group_state)
    return new_updates, PerLayerState(single=single_state, stacked=tuple(group_states))

  return optax.GradientTransformation(init, update)


def build_optimizer(cfg: ml_collections.ConfigDict,
                    stacked: Callable[[Any], Any] = layer_stack.stacked_mask
                    ) -> optax.GradientTransformation:
  """Builds the optimizer named by `cfg.name`, with its schedule and gradient clipping.

  Args:
    cfg: an optimizer config (see `default_optim_config`).
    stacked: params -> tree of bools, True for leaves stacked on a leading layer axis
      (default: leaves of the "layers" subtrees of scanned models); see `per_layer`.

  Returns:
    An optax GradientTransformation; `update` needs `params` (Adafactor scales by
    them, weight decay reads them).
  """
  _check_choice("optim.name", cfg.name, OPTIMIZERS)
  schedule = build_schedule(cfg)
  weight_decay = float(cfg.weight_decay)
  if weight_decay < 0:
    raise ValueError(f"optim.weight_decay must be >= 0, got {weight_decay}.")
  clip_norm = cfg.grad_clip_norm
  if clip_norm is not None and (math.isnan(clip_norm) or clip_norm < 0):
    raise ValueError(f"optim.grad_clip_norm must be >= 0 (0 turns clipping off), got {clip_norm}.")

  if cfg.name == "adamw":
    optimizer = optax.adamw(
        learning_rate=schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
        weight_decay=weight_decay, mask=_decay_mask)
  else:
    # optax adds weight_decay_rate * param after the learning rate has been
    # applied; scaling it by the schedule gives the same lr-coupled decay as AdamW.
    decay_rate = None
    if weight_decay > 0:
      decay_rate = lambda step: weight_decay * schedule(step)  # noqa: E731
    optimizer = optax.adafactor(
        learning_rate=schedule,
        min_dim_size_to_factor=cfg.adafactor_min_dim_size_to_factor,
        decay_rate=cfg.adafactor_decay_rate,
        multiply_by_parameter_scale=cfg.adafactor_multiply_by_parameter_scale,
        clipping_threshold=cfg.adafactor_clipping_threshold,
        momentum=None,
        eps=cfg.adafactor_eps,
        factored=True,
        weight_decay_rate=decay_rate,
        weight_decay_mask=_decay_mask)

  optimizer = per_layer(optimizer, stacked)
  if clip_norm:
    return optax.chain(optax.clip_by_global_norm(float(clip_norm)), optimizer)
  return optimizer
