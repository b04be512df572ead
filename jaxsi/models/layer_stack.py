"""Layers run as one `nn.scan` over stacked parameters, and parameter trees in both layouts.

With `scan_layers=True` in a model config, each stack of identical layers (the decoder's
layers; T5's encoder layers and decoder layers) runs as one `flax.linen.scan`, so compile time
no longer grows with depth. Its parameters are then one subtree named "layers" whose leaves
carry a leading [L] axis with the logical name "layers", instead of L subtrees:

  unscanned                                  scanned
  decoder  {"layer_0": {... [E, F]}, ...}      {"layers": {... [L, E, F]}}
  T5       {"encoder": {"layers_0": ...}, ...} {"encoder": {"layers": ...}, "decoder": ...}

`to_scanned` / `to_unscanned` convert between the two layouts for a model config; both are
exact (stacking and indexing), so a scanned model computes the same logits from converted
parameters. Hugging Face conversion always works on the unscanned layout and converts.

Caches of a scanned stack hold one array per kind with the layers on axis 1, [B, L, ...], so
that every cache leaf keeps the batch as its leading dimension (samplers repeat and gather
along it). The scanned layer reads its layer's slice and writes only its new rows back into
the carried stack, so a decode step never copies or transposes the whole cache.
"""

from __future__ import annotations

import copy
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxsi.models import remat

STACKED = "layers"  # name of a scanned stack's subtree and of its logical axis
# Model config keys that configs stored before they existed may lack (see `layer_options`).
OPTION_KEYS = frozenset({"remat_policy", "scan_layers", "fence_residual_grads"})


class LayerGroup(NamedTuple):
  """One stack of layers in a parameter tree.

  Attributes:
    path: keys from the root to the dict that holds the layers.
    prefix: unscanned layer i is `prefix + str(i)` in that dict.
    count: number of layers.
  """
  path: tuple[str, ...]
  prefix: str
  count: int


class LayerOptions(NamedTuple):
  """The per-layer speed and memory options of a model config (see `OPTION_KEYS`)."""
  remat_policy: str
  scan_layers: bool
  fence_residual_grads: bool


def layer_options(config: Any, family: str) -> LayerOptions:
  """The layer options of a model config, validated.

  Configs stored by runs from before these keys existed lack them: they mean "none", False,
  False.

  Raises:
    ValueError: one sentence naming a bad value.
  """
  policy = config.get("remat_policy", "none")
  scan = config.get("scan_layers", False)
  fence = config.get("fence_residual_grads", False)
  remat.check_policy(policy, family)
  for key, value in (("scan_layers", scan), ("fence_residual_grads", fence)):
    if not isinstance(value, bool):
      raise ValueError(f"{family} config {key}={value!r} must be True or False.")
  return LayerOptions(policy, scan, fence)


def with_layer_options(config: ml_collections.ConfigDict, family: str
                       ) -> ml_collections.ConfigDict:
  """`config` itself, or a copy with the defaults of the layer options it lacks (old runs)."""
  options = layer_options(config, family)
  if OPTION_KEYS <= set(config.keys()):
    return config
  filled = copy.deepcopy(config)
  with filled.unlocked():
    for key, value in options._asdict().items():
      filled[key] = value
  return filled


def layer_groups(config: Any) -> tuple[LayerGroup, ...]:
  """The layer stacks of a model config's parameter tree (decoder or T5)."""
  family = config.get("family")
  if family == "decoder":
    return (LayerGroup((), "layer_", int(config.num_layers)),)
  if family == "t5":
    return (LayerGroup(("encoder",), "layers_", int(config.num_layers)),
            LayerGroup(("decoder",), "layers_", int(config.num_decoder_layers)))
  raise ValueError(f"Model family {family!r} has no layer stacks; accepted: ['decoder', 't5'].")


def scan(layer_class: type[nn.Module], length: int,
         methods: Sequence[str] | None = None) -> type[nn.Module]:
  """`layer_class` run `length` times as one `nn.scan`, parameters stacked on axis 0.

  The scanned methods have the signature `(carry, *broadcast_args) -> (carry, ys)`: every
  argument after the carry is the same for all layers; `ys` come back stacked [L, ...].
  Parameters and dropout draw a different key per layer.

  Args:
    layer_class: a Flax module class (possibly wrapped by `remat.wrap`).
    length: number of layers L.
    methods: the methods to scan (default `__call__` only).
  """
  return nn.scan(layer_class, variable_axes={"params": 0},
                 split_rngs={"params": True, "dropout": True}, in_axes=nn.broadcast,
                 length=length, metadata_params={nn.PARTITION_NAME: STACKED}, methods=methods)


def layer_slice(stack_BxLx: jax.Array, layer: jax.Array) -> jax.Array:
  """Layer `layer`'s part of a cache stack [B, L, ...] -> [B, ...]."""
  return jax.lax.dynamic_index_in_dim(stack_BxLx, layer, axis=1, keepdims=False)


def write_rows(stack_BxLxHxNxD: jax.Array, cache_BxHxNxD: jax.Array, layer: jax.Array,
               index: jax.Array | int, num_rows: int) -> jax.Array:
  """Copies rows [index, index + num_rows) of one layer's updated cache into the stack.

  Args:
    stack_BxLxHxNxD: the cache stack of all layers.
    cache_BxHxNxD: layer `layer`'s cache with its new rows written at `index` along N.
    layer: [] int32 layer index.
    index: first new row.
    num_rows: number of new rows (static).

  Returns:
    The stack with the new rows of layer `layer` in place.
  """
  rows_BxHxMxD = jax.lax.dynamic_slice_in_dim(cache_BxHxNxD, index, num_rows, axis=2)
  zero = jnp.zeros((), jnp.int32)
  start = (zero, jnp.asarray(layer, jnp.int32), zero, jnp.asarray(index, jnp.int32), zero)
  return jax.lax.dynamic_update_slice(stack_BxLxHxNxD,
                                      rows_BxHxMxD[:, None].astype(stack_BxLxHxNxD.dtype), start)


def stacked_mask(tree: Any) -> Any:
  """A tree of bools like `tree`: True for leaves inside a scanned stack (leading [L] axis)."""
  def inside_stack(path, _):
    return any(getattr(key, "key", None) == STACKED for key in path)
  return jax.tree_util.tree_map_with_path(inside_stack, tree)


def _node(tree: Any, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _replace_node(tree: dict, path: tuple[str, ...], node: dict) -> dict:
  """A copy of `tree` with the dict at `path` replaced (only the dicts on the path are copied)."""
  if not path:
    return node
  out = dict(tree)
  out[path[0]] = _replace_node(tree[path[0]], path[1:], node)
  return out


def _stack(leaves: Sequence[Any]) -> Any:
  if all(isinstance(leaf, np.ndarray) for leaf in leaves):
    return np.stack(leaves)  # host parameters (e.g. from `from_pretrained`) stay NumPy
  return jnp.stack(leaves)


def is_scanned(params: Any, config: Any) -> bool:
  """Whether `params` are in the scanned layout (each stack one "layers" subtree)."""
  return STACKED in _node(params, layer_groups(config)[0].path)


def to_scanned(params: Any, config: Any) -> Any:
  """Unscanned parameters -> the scanned layout (see the module docstring).

  Args:
    params: a parameter tree with per-layer subtrees, NumPy or jax arrays.
    config: the model config (its family and layer counts).

  Returns:
    A new tree; leaves outside the layers are shared, not copied.
  """
  for group in layer_groups(config):
    node = dict(_node(params, group.path))
    names = [f"{group.prefix}{i}" for i in range(group.count)]
    missing = [name for name in names if name not in node]
    if missing:
      raise ValueError(f"Parameters at {'/'.join(group.path) or 'the root'} lack {missing[0]!r} "
                       f"of the {group.count} unscanned layers the config has.")
    layers = [node.pop(name) for name in names]
    node[STACKED] = jax.tree.map(lambda *leaves: _stack(leaves), *layers)
    params = _replace_node(params, group.path, node)
  return params


def to_unscanned(params: Any, config: Any) -> Any:
  """Scanned parameters -> one subtree per layer (the inverse of `to_scanned`)."""
  for group in layer_groups(config):
    node = dict(_node(params, group.path))
    if STACKED not in node:
      raise ValueError(f"Parameters at {'/'.join(group.path) or 'the root'} have no scanned "
                       f"{STACKED!r} subtree.")
    stacked = node.pop(STACKED)
    for i in range(group.count):
      node[f"{group.prefix}{i}"] = jax.tree.map(lambda leaf, i=i: leaf[i], stacked)
    params = _replace_node(params, group.path, node)
  return params


def to_layout(params: Any, config: Any, scanned: bool) -> Any:
  """`params` in the scanned (`scanned=True`) or unscanned layout, converting when needed."""
  if is_scanned(params, config) == scanned:
    return params
  return to_scanned(params, config) if scanned else to_unscanned(params, config)
