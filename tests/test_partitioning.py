"""Logical-axis rules: mapping, divisibility fallback, unmapped names, mesh construction."""

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxsi import mesh as mesh_lib
from jaxsi import partitioning


def _mesh(data, fsdp, tensor):
  return mesh_lib.build_mesh(ml_collections.ConfigDict({"data": data, "fsdp": fsdp, "tensor": tensor}))


def test_mesh_fills_minus_one():
  mesh = _mesh(-1, 2, 2)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}


def test_mesh_rejects_bad_shapes():
  with pytest.raises(ValueError, match="more than one -1"):
    mesh_lib.resolve_mesh_shape((-1, -1, 1), 8)
  with pytest.raises(ValueError, match="uses 12 devices but 8 are available"):
    mesh_lib.resolve_mesh_shape((3, 2, 2), 8)
  with pytest.raises(ValueError, match="not divisible by 3"):
    mesh_lib.resolve_mesh_shape((-1, 3, 1), 8)


def test_rules_map_parameters_to_mesh_axes():
  mesh = _mesh(2, 2, 2)
  spec = partitioning.logical_to_mesh_spec(P("embed", "mlp"), (64, 128), mesh)
  assert spec == P("fsdp", "tensor")
  spec = partitioning.logical_to_mesh_spec(P("vocab", "embed"), (96, 64), mesh)
  assert spec == P("tensor", "fsdp")
  assert partitioning.logical_to_mesh_spec(P("kv", None), (8, 3), mesh) == P(None, None)


def test_activation_batch_uses_both_batch_axes():
  mesh = _mesh(2, 2, 2)
  spec = partitioning.logical_to_mesh_spec(P("activation_batch", "activation_length"), (8, 5), mesh)
  assert spec == P(("data", "fsdp"), None)


def test_indivisible_dimension_is_replicated_not_an_error():
  mesh = _mesh(2, 2, 2)
  # 3 heads cannot split over tensor=2: replicate that dimension.
  assert partitioning.logical_to_mesh_spec(P("embed", "heads", "kv"), (64, 3, 16), mesh) == \
      P("fsdp", None, None)


def test_a_mesh_axis_is_used_once_per_array():
  mesh = _mesh(2, 2, 2)
  assert partitioning.logical_to_mesh_spec(P("mlp", "heads"), (4, 4), mesh) == P("tensor", None)


def test_unmapped_logical_name_is_an_error():
  mesh = _mesh(2, 2, 2)
  with pytest.raises(partitioning.UnmappedAxisError, match="'widgets' has no rule"):
    partitioning.logical_to_mesh_spec(P("widgets"), (4,), mesh)


def test_shardings_for_a_pytree_place_arrays():
  mesh = _mesh(2, 2, 2)
  tree = {"w": np.zeros((64, 128), np.float32), "b": np.zeros((128,), np.float32)}
  specs = {"w": P("embed", "mlp"), "b": P("mlp")}
  shardings = partitioning.shardings_for(specs, tree, mesh)
  placed = jax.device_put(tree, shardings)
  assert placed["w"].sharding.spec == P("fsdp", "tensor")
  assert placed["w"].addressable_shards[0].data.shape == (32, 64)
  assert placed["b"].addressable_shards[0].data.shape == (64,)


def test_batch_sharding_splits_rows_over_data_and_fsdp():
  mesh = _mesh(2, 2, 2)
  x = jax.device_put(np.arange(8 * 3).reshape(8, 3), partitioning.batch_sharding(mesh, 2))
  assert x.addressable_shards[0].data.shape == (2, 3)
