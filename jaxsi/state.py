"""The training state pytree and the shardings of its parts."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxsi import partitioning


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training.

  Attributes:
    step: [] int32, number of optimizer updates applied so far.
    params: the model parameters (float32 pytree).
    opt_state: the optax state.
  """

  step: jax.Array
  params: Any
  opt_state: Any


def create(params: Any, tx: optax.GradientTransformation) -> TrainState:
  """A fresh state at step 0."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def _path_key(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def opt_state_shardings(abstract_opt_state: Any, abstract_params: Any, param_shardings: Any,
                        mesh: Mesh) -> Any:
  """Shards each optimizer-state leaf like the parameter it belongs to.

  A leaf whose tree path ends with a parameter's path and that has the parameter's shape
  (AdamW moments) gets the parameter's sharding; everything else (Adafactor's factored row and
  column statistics, counters) is replicated: they are small.
  """
  by_path = {}
  for (path, leaf), sharding in zip(
      jax.tree_util.tree_flatten_with_path(abstract_params)[0],
      jax.tree_util.tree_leaves(param_shardings)):
    by_path[_path_key(path)] = (tuple(leaf.shape), sharding)

  def pick(path, leaf):
    key = _path_key(path)
    shape = tuple(getattr(leaf, "shape", ()))
    for start in range(len(key)):
      hit = by_path.get(key[start:])
      if hit is not None and hit[0] == shape:
        return hit[1]
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def shardings(abstract_state: TrainState, param_axes: Any, mesh: Mesh) -> TrainState:
  """NamedShardings for every leaf of a TrainState.

  Args:
    abstract_state: the state as ShapeDtypeStructs (from `jax.eval_shape`).
    param_axes: logical PartitionSpecs for the params (`lm.param_axes()`).
    mesh: the device mesh.
  """
  param_shardings = partitioning.shardings_for(param_axes, abstract_state.params, mesh)
  return TrainState(
      step=NamedSharding(mesh, P()),
      params=param_shardings,
      opt_state=opt_state_shardings(abstract_state.opt_state, abstract_state.params,
                                    param_shardings, mesh),
  )
