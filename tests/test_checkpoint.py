"""Checkpoints: exact round trip, restore onto another mesh, side items, unreadable steps."""

import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxsi import checkpoint as checkpoint_lib
from jaxsi import mesh as mesh_lib
from jaxsi import partitioning
from jaxsi import state as state_lib

AXES = {"embed": {"kernel": P("embed", "mlp")}, "head": {"kernel": P("mlp", "vocab"),
                                                         "bias": P("vocab")}}


def _mesh(data, fsdp, tensor, devices=None):
  return mesh_lib.build_mesh(
      ml_collections.ConfigDict({"data": data, "fsdp": fsdp, "tensor": tensor}), devices)


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {"embed": {"kernel": rng.normal(size=(16, 256)).astype(np.float32)},
          "head": {"kernel": rng.normal(size=(256, 8)).astype(np.float32),
                   "bias": rng.normal(size=(8,)).astype(np.float32)}}


def _state(mesh, tx):
  params = _params()
  state = state_lib.create(jax.tree.map(jnp.asarray, params), tx)
  # one real update so the optimizer state is not all zeros
  grads = jax.tree.map(lambda p: 0.1 * jnp.ones_like(p), state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                        opt_state=opt_state)
  shardings = state_lib.shardings(jax.eval_shape(lambda: state), AXES, mesh)
  return jax.device_put(state, shardings), shardings


def _assert_trees_equal(a, b):
  flat_a, tree_a = jax.tree.flatten(a)
  flat_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(flat_a, flat_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("tx_name", ["adafactor", "adamw"])
def test_save_restore_is_exact_and_moves_to_another_mesh(tmp_path, tx_name):
  tx = optax.adafactor(1e-2) if tx_name == "adafactor" else optax.adamw(1e-2)
  mesh_a = _mesh(2, 2, 2)
  state, _ = _state(mesh_a, tx)
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "ckpt"), keep=2)
  assert ckpt.save(1, state, config={"a": 1}, metrics={"train/loss": 0.5}, data={"step": 1})
  ckpt.wait()

  mesh_b = _mesh(1, 4, 2)  # a different shape of the same 8 devices
  abstract = jax.eval_shape(lambda: state)
  target = checkpoint_lib.abstract_with_shardings(abstract, state_lib.shardings(abstract, AXES, mesh_b))
  step, restored, side = ckpt.restore(target)
  assert step == 1
  _assert_trees_equal(restored, state)
  assert restored.params["embed"]["kernel"].sharding.mesh.shape["fsdp"] == 4
  assert side["config"] == {"a": 1}
  assert side["metrics"]["train/loss"] == 0.5
  assert side["data"] == {"step": 1}

  mesh_c = _mesh(1, 1, 1, devices=jax.devices()[:1])  # and onto a single device
  target = checkpoint_lib.abstract_with_shardings(abstract, state_lib.shardings(abstract, AXES, mesh_c))
  _, restored_one, _ = ckpt.restore(target)
  _assert_trees_equal(restored_one, state)
  assert len(restored_one.params["head"]["bias"].sharding.device_set) == 1
  ckpt.close()


def test_restore_params_reads_the_parameters_alone_onto_another_mesh(tmp_path):
  state, _ = _state(_mesh(2, 2, 2), optax.adamw(1e-2))
  directory = str(tmp_path / "ckpt")
  ckpt = checkpoint_lib.Checkpointer(directory)
  assert ckpt.save(1, state, config={"a": 1})
  ckpt.wait()
  ckpt.close()
  # The target names the parameters only: no optimizer is needed to describe the checkpoint.
  mesh = _mesh(1, 4, 2)
  abstract = jax.eval_shape(lambda: state.params)
  target = checkpoint_lib.abstract_with_shardings(
      abstract, partitioning.shardings_for(AXES, abstract, mesh))
  ckpt = checkpoint_lib.Checkpointer(directory)
  params = ckpt.restore_params(target, 1)
  ckpt.close()
  _assert_trees_equal(params, state.params)
  assert params["embed"]["kernel"].sharding.mesh.shape["fsdp"] == 4


def test_keeps_last_n_plus_best_and_never_overwrites(tmp_path):
  tx = optax.adamw(1e-2)
  state, _ = _state(_mesh(-1, 1, 1), tx)
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "ckpt"), keep=2, best_metric="eval/accuracy")
  for step, acc in [(1, 0.9), (2, 0.1), (3, 0.2), (4, 0.3)]:
    ckpt.save(step, state, config={}, metrics={"eval/accuracy": acc})
    ckpt.wait()
  assert ckpt.all_steps() == [1, 3, 4]   # best (1) + last two
  assert not ckpt.save(4, state, config={}, metrics={})  # existing step is left alone
  ckpt.close()


def test_unreadable_latest_step_falls_back_to_previous(tmp_path, caplog):
  tx = optax.adamw(1e-2)
  state, shardings = _state(_mesh(-1, 1, 1), tx)
  directory = str(tmp_path / "ckpt")
  ckpt = checkpoint_lib.Checkpointer(directory, keep=3)
  ckpt.save(1, state, config={}, metrics={})
  ckpt.wait()
  later = state.replace(step=state.step + 1)
  ckpt.save(2, later, config={}, metrics={})
  ckpt.close()
  # corrupt step 2: remove the array data of the state item
  state_dir = os.path.join(directory, "2", "state")
  for name in os.listdir(state_dir):
    path = os.path.join(state_dir, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    else:
      os.remove(path)
  ckpt = checkpoint_lib.Checkpointer(directory, keep=3)
  abstract = jax.eval_shape(lambda: state)
  step, restored, _ = ckpt.restore(checkpoint_lib.abstract_with_shardings(abstract, shardings))
  assert step == 1
  assert int(restored.step) == int(state.step)
  assert "cannot be read" in caplog.text
  assert ckpt.all_steps() == [1, 2]  # the failing step was not deleted by the restore
  ckpt.close()


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "empty"))
  with pytest.raises(FileNotFoundError, match="No checkpoint found"):
    ckpt.restore({})
  ckpt.close()
