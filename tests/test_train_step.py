"""The jitted train step: 8-device sharded == 1 device, donation, and no retracing or
recompilation, neither here nor in the trainer (SFT, and GKD with the λ coin landing both ways)."""

import os

import chex
import jax
import ml_collections
import numpy as np
import pytest

from jaxsi import config as config_lib
from jaxsi import mesh as mesh_lib
from jaxsi import metrics_writer
from jaxsi import objectives
from jaxsi import optim
from jaxsi import partitioning
from jaxsi import pipeline
from jaxsi import state as state_lib
from jaxsi import step as step_lib
from jaxsi import trainer
from jaxsi.data import tasks
from jaxsi.models import build
from jaxsi.models import decoder
from jaxsi.objectives import sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model_config(variant):
  cfg = decoder.default_config(variant)
  cfg.update(vocab_size=128, d_model=64, num_layers=2, num_heads=4,
             num_kv_heads=2 if variant == "llama" else 4, head_dim=16, d_ff=128, max_len=64)
  return cfg


def _setup(variant, optimizer, mesh_shape, devices):
  lm = build(_model_config(variant))
  optim_cfg = optim.default_optim_config()
  optim_cfg.update(name=optimizer, lr=1e-2, grad_clip_norm=1.0)
  tx = optim.build_optimizer(optim_cfg)
  mesh = mesh_lib.build_mesh(ml_collections.ConfigDict(dict(zip(("data", "fsdp", "tensor"),
                                                                 mesh_shape))), devices)
  rng = jax.random.PRNGKey(0)
  abstract = jax.eval_shape(lambda r: state_lib.create(lm.init(r), tx), rng)
  shardings = state_lib.shardings(abstract, lm.param_axes(), mesh)
  state = jax.jit(lambda r: state_lib.create(lm.init(r), tx), out_shardings=shardings)(rng)
  loss_fn = objectives.make_loss_fn(sft.default_objective_config(), lm)
  task = tasks.get_task(tasks.default_data_config())
  batch_np = task.train_batch(0, 8)
  batch_sh = {k: partitioning.batch_sharding(mesh, v.ndim) for k, v in batch_np.items()}
  repl = partitioning.replicated(mesh)
  fn = step_lib.make_train_step(loss_fn, tx)
  return task, mesh, state, shardings, batch_sh, repl, fn


def _run(variant, optimizer, mesh_shape, devices, steps=3):
  task, mesh, state, shardings, batch_sh, repl, fn = _setup(variant, optimizer, mesh_shape, devices)
  traced = chex.assert_max_traces(fn, n=1)
  train_step = jax.jit(traced, in_shardings=(shardings, {}, batch_sh, repl),
                       out_shardings=(shardings, repl), donate_argnums=(0,))
  losses = []
  for step in range(steps):
    batch = jax.device_put(task.train_batch(step, 8), batch_sh)
    state, metrics = train_step(state, {}, batch, jax.random.PRNGKey(1))
    losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state.params), state


def _is_key_bias(path) -> bool:
  keys = [str(getattr(k, "key", k)) for k in path]
  return keys[-2:] == ["key", "bias"]


# Adafactor, not AdamW: Adam's update g / (sqrt(v) + eps) is about lr * sign(g) for an element
# whose gradient is pure rounding noise (|g| ~ 1e-8), so a few such elements legitimately differ
# by ~lr between reduction orders; Adafactor's factored statistics do not amplify single elements.
@pytest.mark.parametrize("variant,optimizer", [("llama", "adafactor"), ("gpt2", "adafactor")])
def test_sharded_step_equals_single_device(variant, optimizer):
  chex.clear_trace_counter()
  losses_8, params_8, state_8 = _run(variant, optimizer, (2, 2, 2), jax.devices())
  chex.clear_trace_counter()
  losses_1, params_1, _ = _run(variant, optimizer, (1, 1, 1), jax.devices()[:1])
  assert len(jax.devices()) == 8
  # the 8-device state really is distributed
  assert any(len(leaf.sharding.device_set) == 8 and not leaf.sharding.is_fully_replicated
             for leaf in jax.tree.leaves(state_8.params))
  np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5, atol=1e-5)
  assert losses_1[-1] < losses_1[0]  # the updates did something
  compared = 0
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(params_8)[0],
                          jax.tree.leaves(params_1)):
    if _is_key_bias(path):
      continue  # see test_gpt2_key_bias_gradient_is_zero
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))
    compared += 1
  assert compared >= 10


def test_gpt2_key_bias_gradient_is_zero():
  """Why the sharded-vs-single comparison skips GPT-2's key bias.

  Adding a bias to every key adds the same q.b to all scores of a query, which softmax
  ignores, so its true gradient is exactly zero. Adafactor and Adam normalize the gradient,
  turning rounding noise (which depends on the reduction order, hence on the sharding) into
  lr-sized updates of that leaf; every other leaf matches to 1e-5.
  """
  task, mesh, state, shardings, batch_sh, repl, fn = _setup("gpt2", "adafactor", (1, 1, 1),
                                                             jax.devices()[:1])
  loss_fn = objectives.make_loss_fn(sft.default_objective_config(), build(_model_config("gpt2")))
  batch = task.train_batch(0, 8)
  grads = jax.grad(lambda p: loss_fn(p, {}, batch, jax.random.PRNGKey(0), 0)[0])(state.params)
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    if _is_key_bias(path):
      assert float(np.abs(g).max()) < 1e-6
    elif "kernel" in jax.tree_util.keystr(path):
      assert float(np.abs(g).max()) > 1e-4


def test_step_never_retraces_and_donates_state():
  chex.clear_trace_counter()
  task, mesh, state, shardings, batch_sh, repl, fn = _setup("gpt2", "adafactor", (4, 2, 1),
                                                             jax.devices())
  train_step = jax.jit(chex.assert_max_traces(fn, n=1), in_shardings=(shardings, {}, batch_sh, repl),
                       out_shardings=(shardings, repl), donate_argnums=(0,))
  previous = state
  for step in range(4):  # assert_max_traces raises on a second trace
    batch = jax.device_put(task.train_batch(step, 8), batch_sh)
    state, metrics = train_step(state, {}, batch, jax.random.PRNGKey(1))
  assert int(state.step) == 4
  assert all(leaf.is_deleted() for leaf in jax.tree.leaves(previous.params))  # donated
  assert train_step._cache_size() == 1


@pytest.fixture
def trainer_steps(monkeypatch):
  """Each train step the trainer jits, as (its jitted function, how often it was traced)."""
  steps = []
  make_train_step, compile_together = step_lib.make_train_step, mesh_lib.compile_together

  def counted_train_step(*args, **kwargs):
    fn, record = make_train_step(*args, **kwargs), {"traces": 0}

    def train_step(*step_args):
      record["traces"] += 1  # runs only while jax traces
      return fn(*step_args)

    steps.append(record)
    return train_step

  def recording_compile_together(jitted, name):
    if name == "train_step":
      steps[-1]["jitted"] = jitted
    return compile_together(jitted, name)

  monkeypatch.setattr(step_lib, "make_train_step", counted_train_step)
  monkeypatch.setattr(mesh_lib, "compile_together", recording_compile_together)
  return steps


def _learning_rates(workdir):
  return [r["train/lr"] for r in metrics_writer.read(workdir) if "train/lr" in r]


def test_trainer_compiles_the_sft_step_once(tmp_path, trainer_steps):
  """8 steps with a new batch each, a warmup + cosine LR, evals and checkpoints in between."""
  config = config_lib.load(os.path.join(ROOT, "configs/arithmetic_sft.py:tiny"),
                           [("train.progress", "false")])
  trainer.train(config, str(tmp_path))
  assert [(r["traces"], r["jitted"]._cache_size()) for r in trainer_steps] == [(1, 1)]
  assert len(set(_learning_rates(str(tmp_path)))) >= 3  # the LR really changed


def test_trainer_compiles_the_gkd_step_once_whichever_way_the_coin_lands(tmp_path,
                                                                         trainer_steps):
  """GKD + RL at λ = 0.5: dataset and student-sampled responses (and rewards) share a step."""
  config = config_lib.load(os.path.join(ROOT, "configs/arithmetic_gkd.py:tiny"), [
      ("train.progress", "false"), ("train.steps", "6"), ("objective.lam", "0.5"),
      ("objective.reward", "exact_match")])
  pipeline.run(config, str(tmp_path))  # teacher SFT, student SFT, then GKD: one step each
  assert [(r["traces"], r["jitted"]._cache_size()) for r in trainer_steps] == [(1, 1)] * 3
  rows = [r for r in metrics_writer.read(str(tmp_path)) if "train/on_policy_fraction" in r]
  assert 0.0 < rows[-1]["train/on_policy_fraction"] < 1.0  # both sources were trained on
  assert len(set(_learning_rates(str(tmp_path)))) >= 3
