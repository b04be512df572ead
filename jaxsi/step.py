"""The pure train step: one optimizer update from one batch."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxsi.state import TrainState

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation):
  """Builds `train_step(state, frozen, batch, rng) -> (state, metrics)`.

  Args:
    loss_fn: `loss_fn(params, frozen, batch, rng, step) -> (loss, metrics)`.
    tx: the optax optimizer.

  The returned function is pure; the trainer jits it once with explicit shardings and donates
  the state. `rng` is the run's base key: the step folds its own step number in, so a resumed
  run draws the same randomness as an uninterrupted one.
  """

  def train_step(state: TrainState, frozen: Any, batch: dict[str, jax.Array], rng: jax.Array):
    step_rng = jax.random.fold_in(rng, state.step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, metrics), grads = grad_fn(state.params, frozen, batch, step_rng, state.step)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics)
    metrics["loss"] = loss
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["param_norm"] = optax.global_norm(params)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics)

  return train_step
