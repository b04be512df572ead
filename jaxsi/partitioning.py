"""Logical axis names -> mesh axes, and shardings for any pytree.

Every parameter carries logical axis names (set in the model with
`nn.with_logical_partitioning`). One rules table maps each name to a mesh axis
(or to None: replicated). A name missing from the table is an error, so a new
layer can never silently end up replicated on a pod.

Mesh axes: "data" (pure data parallel), "fsdp" (data parallel with sharded
parameters and optimizer state), "tensor" (model parallel).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_MESH_AXES = ("data", "fsdp")

# Logical name -> mesh axis (str), tuple of mesh axes, or None (replicated).
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),              # per-head feature dimension
    ("positions", None),       # learned absolute position table
    ("relpos_buckets", None),  # T5 relative attention buckets
    ("layers", None),          # stacked (scanned) layers
    # activations
    ("activation_batch", BATCH_MESH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)


class UnmappedAxisError(KeyError):
  """A logical axis name has no entry in the rules table."""


def _rules_dict(rules: Sequence[tuple[str, Any]]) -> dict[str, Any]:
  return dict(rules)


def logical_to_mesh_spec(logical: P | Sequence[str | None], shape: Sequence[int],
                         mesh: Mesh,
                         rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> P:
  """Maps a PartitionSpec of logical names to one of mesh axes.

  A mesh axis is used at most once per array, and is dropped for a dimension it
  does not divide evenly (that dimension is then replicated along it).

  Args:
    logical: logical names, one per array dimension (None = replicated).
    shape: the array's shape.
    mesh: the device mesh.
    rules: logical name -> mesh axes table.

  Returns:
    A PartitionSpec over mesh axes.

  Raises:
    UnmappedAxisError: a logical name is not in `rules`.
  """
  table = _rules_dict(rules)
  logical = tuple(logical) + (None,) * (len(shape) - len(tuple(logical)))
  used: set[str] = set()
  out = []
  for name, dim in zip(logical, shape):
    if name is None:
      out.append(None)
      continue
    if name not in table:
      raise UnmappedAxisError(
          f"Logical axis name {name!r} has no rule in jaxsi.partitioning.LOGICAL_RULES; "
          f"known names are {sorted(table)}.")
    target = table[name]
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    kept = []
    size = 1
    for axis in axes:
      if axis in used or axis not in mesh.shape:
        continue
      if dim % (size * mesh.shape[axis]) != 0:
        continue
      kept.append(axis)
      size *= mesh.shape[axis]
    used.update(kept)
    out.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
  return P(*out)


def shardings_for(logical_specs: Any, abstract_tree: Any, mesh: Mesh,
                  rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> Any:
  """NamedShardings for a pytree from its logical specs.

  Args:
    logical_specs: pytree of PartitionSpecs of logical names (e.g. `lm.param_axes()`).
    abstract_tree: pytree with the same structure whose leaves have `.shape`.
    mesh: the device mesh.

  Returns:
    A pytree of `NamedSharding`s with the structure of `abstract_tree`.
  """
  return jax.tree.map(
      lambda spec, leaf: NamedSharding(mesh, logical_to_mesh_spec(spec, leaf.shape, mesh, rules)),
      logical_specs, abstract_tree,
      is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Sharding of a batch array: leading dimension over ("data", "fsdp")."""
  return NamedSharding(mesh, P(BATCH_MESH_AXES, *([None] * (ndim - 1))))


def batch_shardings(mesh: Mesh, batch: Mapping[str, Any]) -> dict[str, NamedSharding]:
  """One batch sharding per entry of a batch dict (of arrays or ShapeDtypeStructs)."""
  return {k: batch_sharding(mesh, len(v.shape)) for k, v in batch.items()}


def replicated(mesh: Mesh) -> NamedSharding:
  """A fully replicated sharding on `mesh`."""
  return NamedSharding(mesh, P())


def flax_rules(rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> tuple[tuple[str, Any], ...]:
  """The rules in the form `flax.linen.logical_axis_rules` expects (for activation constraints)."""
  return tuple((name, target) for name, target in rules)


def mesh_size(mesh: Mesh, axes: Sequence[str]) -> int:
  """Product of the sizes of `axes` in `mesh`."""
  return int(np.prod([mesh.shape[a] for a in axes]))
