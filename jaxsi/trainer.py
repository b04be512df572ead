"""The training loop: one linear `train()` whose phases read top to bottom.

mesh -> task and model -> abstract state -> shardings -> restore or init -> jitted step -> loop
(sample the batch, step, log, eval, checkpoint) -> final eval and checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import threading
import time
from typing import Any

import jax
import numpy as np
import tqdm

from jaxsi import checkpoint as checkpoint_lib
from jaxsi import config as config_lib
from jaxsi import flops as flops_lib
from jaxsi import mesh as mesh_lib
from jaxsi import models
from jaxsi import objectives
from jaxsi import onpolicy
from jaxsi import optim
from jaxsi import partitioning
from jaxsi import peak as peak_lib
from jaxsi import pretrained
from jaxsi import sm_batches
from jaxsi import state as state_lib
from jaxsi import step as step_lib
from jaxsi.data import tasks
from jaxsi.objectives import gkd
from jaxsi.objectives import sharpening
from jaxsi.evals import loop as eval_loop
from jaxsi.metrics_writer import MetricsWriter


class TrainingError(RuntimeError):
  """The run cannot continue (e.g. the loss became NaN); nothing saved is lost."""


@dataclasses.dataclass
class Run:
  """What the phases of a run share (built by `setup`)."""

  config: Any
  workdir: str
  mesh: Any
  task: Any
  lm: Any
  tx: Any
  state_shardings: Any
  abstract_state: Any
  checkpointer: checkpoint_lib.Checkpointer
  decode: Any
  eval_examples: list


def check_workdir(workdir: str) -> None:
  """Creates `workdir` or fails with one sentence if it cannot be written."""
  if "://" in workdir:  # gs:// and friends: orbax and tf.io handle those.
    return
  try:
    os.makedirs(workdir, exist_ok=True)
    # One probe per process: hosts sharing the workdir must not delete each other's probe.
    probe = os.path.join(workdir, f".jaxsi_write_probe.{jax.process_index()}.{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise TrainingError(f"Workdir {workdir!r} is not writable ({e.strerror}); "
                        "pass --workdir=A_WRITABLE_DIRECTORY.") from None


def _global_batch(mesh, host_batch: dict[str, np.ndarray], global_batch_size: int) -> dict:
  """Assembles host-local rows into global arrays sharded over the mesh's batch axes."""
  out = {}
  for key, value in host_batch.items():
    sharding = partitioning.batch_sharding(mesh, value.ndim)
    global_shape = (global_batch_size,) + value.shape[1:]
    out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
  return out


def setup(config, workdir: str) -> Run:
  """Builds the mesh, task, model, optimizer, shardings and checkpointer of a run."""
  check_workdir(workdir)
  mesh = mesh_lib.build_mesh(config.mesh)
  task = tasks.get_task(config.data)
  lm = models.build(config.model)
  is_sm = config.objective.name == "sequencematch"
  if is_sm:  # SequenceMatch acts with one more token, <bksp>: grow the model before init.
    lm = sm_batches.with_backspace(lm, config.objective)
  if task.tokenizer.vocab_size > lm.vocab_size:
    raise config_lib.ConfigError(
        f"The tokenizer has {task.tokenizer.vocab_size} tokens but model.vocab_size is "
        f"{lm.vocab_size}; set --config.model.vocab_size >= {task.tokenizer.vocab_size}.")
  max_len = config.model.get("max_len", None)
  total_len = task.max_prompt_len + max(task.max_response_len, config.eval.max_new_tokens)
  if config.model.family == "decoder" and max_len is not None and total_len > max_len:
    raise config_lib.ConfigError(
        f"Prompt + response need {total_len} positions (data.max_prompt_len="
        f"{task.max_prompt_len}, response {max(task.max_response_len, config.eval.max_new_tokens)})"
        f" but the model allows model.max_len={max_len}; shorten data.max_prompt_len or raise "
        "model.max_len.")
  batch_shards = partitioning.mesh_size(mesh, partitioning.BATCH_MESH_AXES)
  if config.train.batch_size % batch_shards or config.train.batch_size % jax.process_count():
    raise config_lib.ConfigError(
        f"train.batch_size={config.train.batch_size} must be divisible by the data x fsdp mesh size "
        f"({batch_shards}) and the process count ({jax.process_count()}).")
  tx = optim.build_optimizer(config.optim)

  init_rng = jax.random.PRNGKey(config.seed)
  abstract_state = jax.eval_shape(lambda r: state_lib.create(lm.init(r), tx), init_rng)
  state_shardings = state_lib.shardings(abstract_state, lm.param_axes(), mesh)
  # The checkpoint manager's first cross-host sync is the run's first collective: line the
  # processes up first (they may be minutes apart after imports and model building).
  mesh_lib.sync_processes("setup")
  checkpointer = checkpoint_lib.Checkpointer(
      os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
      best_metric=config.checkpoint.best_metric or None, best_mode=config.checkpoint.best_mode,
      async_save=config.checkpoint.async_save)
  decoder_kwargs = dict(max_new_tokens=config.eval.max_new_tokens, eos_id=task.tokenizer.eos_id,
                        pad_id=task.tokenizer.pad_id, mesh=mesh)
  if is_sm:  # A SequenceMatch model is scored on the text its backspaces leave.
    decode = sm_batches.make_eval_decoder(lm, config.objective, **decoder_kwargs)
  else:
    decode = eval_loop.make_decoder(lm, **decoder_kwargs)
  eval_examples = task.eval_examples(config.eval.num_examples)
  if not eval_examples and (config.eval.at_end or config.train.eval_every):
    raise config_lib.ConfigError(
        f"The eval set of task {config.data.name!r} is empty (eval.num_examples="
        f"{config.eval.num_examples}); set eval.num_examples > 0, or eval.at_end=false and "
        "train.eval_every=0 to train without evals.")
  return Run(config, workdir, mesh, task, lm, tx, state_shardings, abstract_state, checkpointer,
             decode, eval_examples)


def _flat(tree: Any, prefix: str) -> dict[str, Any]:
  """{"prefix.a.b": leaf} of a nested dict."""
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for key, value in tree.items():
    out.update(_flat(value, f"{prefix}.{key}"))
  return out


def _stored_differences(run: Run) -> list[str]:
  """"key: stored value there, this run's here" for the model and optimizer keys that differ
  between the workdir's latest checkpoint and `run` (empty when its config cannot be read)."""
  try:
    stored = run.checkpointer.read_json(run.checkpointer.latest_step(), "config")
  except Exception:  # noqa: BLE001 - a damaged step: the caller's own error stands.
    return []
  current = run.config.to_dict()
  differences = []
  for section in ("model", "optim"):
    there, here = _flat(stored.get(section, {}), section), _flat(current.get(section, {}), section)
    for key in sorted(set(there) | set(here)):
      if there.get(key) != here.get(key):
        differences.append(f"{key}: {there.get(key)!r} there, {here.get(key)!r} here")
  return differences


def restore_or_init(run: Run) -> tuple[Any, int]:
  """The latest readable checkpoint in the workdir, else a fresh state. Returns (state, step)."""
  if run.checkpointer.latest_step() is not None:
    target = checkpoint_lib.abstract_with_shardings(run.abstract_state, run.state_shardings)
    try:
      step, state, _ = run.checkpointer.restore(target)
    except FileNotFoundError:
      differences = _stored_differences(run)
      if not differences:
        raise
      raise config_lib.ConfigError(
          f"{run.checkpointer.directory} holds the checkpoints of a run with another model or "
          f"optimizer ({'; '.join(differences)}), which this run cannot resume; give it a new "
          f"--workdir (--config.init_from={run.workdir} starts it from those weights if the "
          "model matches, in either layer layout).") from None
    logging.info("Resumed from %s at step %d.", run.checkpointer.directory, step)
    return state, step
  if run.config.init_from:
    loaded_lm, params = pretrained.load(run.config.init_from, mesh=run.mesh, like=run.lm)
    if run.config.objective.name == "sequencematch":
      params = sm_batches.grow_loaded_params(run.lm, loaded_lm, params, run.config.objective)
    try:
      pretrained.check_compatible(run.abstract_state.params, params, run.config.init_from)
    except ValueError as e:
      raise config_lib.ConfigError(str(e)) from None
    create = jax.jit(lambda p: state_lib.create(p, run.tx), out_shardings=run.state_shardings)
    logging.info("Initialized from %s.", run.config.init_from)
    return create(params), 0
  init = jax.jit(lambda r: state_lib.create(run.lm.init(r), run.tx),
                 out_shardings=run.state_shardings)
  return init(jax.random.PRNGKey(run.config.seed)), 0


@dataclasses.dataclass
class ObjectiveParts:
  """What the loop needs from the objective.

  Attributes:
    loss_fn: `loss_fn(params, frozen, batch, rng, step) -> (loss, metrics)`.
    frozen: frozen parameters passed to every step, never donated (e.g. {"teacher": ...}).
    frozen_shardings: their shardings.
    prepare: None, or a host callable `(step, batch, params, frozen) -> (batch, metrics)` run
      before each step (GKD: replace responses by samples).
    batch_ndims: None, or {key: ndim} of the batches `prepare` returns when its keys differ
      from the task's (SequenceMatch).
    host_state: None, or host state saved with each checkpoint and restored on resume: an
      object with JSON-able `state_dict()` and `load_state_dict(state)` (SequenceMatch's
      replay buffer).
  """

  loss_fn: Any
  frozen: dict
  frozen_shardings: dict
  prepare: Any = None
  batch_ndims: Any = None
  host_state: Any = None


def _sharpening_parts(run: Run) -> ObjectiveParts:
  """Online SFT-Sharpening, RLHF- and XPO-Sharpening: a frozen base samples every batch."""
  config = run.config
  source = config.base.source if "base" in config else ""
  source = source or config.init_from
  if not source:
    raise config_lib.ConfigError(
        "objective sharpening needs a frozen base model: set --config.base.source (or "
        "--config.init_from) to a jaxsi workdir or a Hugging Face checkpoint.")
  base_lm, base_params = pretrained.load(source, mesh=run.mesh)
  eos, pad = run.task.tokenizer.eos_id, run.task.tokenizer.pad_id
  loss_fn = objectives.make_loss_fn(config.objective, run.lm, base_lm=base_lm, eos_id=eos)
  prepare = sharpening.make_preparer(
      run.lm, config.objective, base_lm=base_lm, eos_id=eos, pad_id=pad,
      response_width=run.task.max_response_len, seed=config.seed, mesh=run.mesh)
  ndims = {"prompt": 2, "prompt_mask": 2, "response": 2, "response_mask": 2,
           **sharpening.extra_batch_keys(config.objective)}
  shardings = partitioning.shardings_for(base_lm.param_axes(), base_lm.abstract_params(), run.mesh)
  return ObjectiveParts(loss_fn, {"base": base_params}, {"base": shardings}, prepare=prepare,
                        batch_ndims=ndims)


def build_objective(run: Run) -> ObjectiveParts:
  """The loss, frozen parameters and per-step batch preparation of `config.objective`."""
  config = run.config
  name = config.objective.name
  if name == "sequencematch":
    preparer = sm_batches.BatchPreparer(
        run.lm, config.objective, run.task, run.mesh, config.train.batch_size, config.seed,
        eval_max_new_tokens=config.eval.max_new_tokens)
    return ObjectiveParts(objectives.make_loss_fn(config.objective, run.lm), {}, {},
                          prepare=preparer, batch_ndims=sm_batches.BATCH_NDIMS,
                          host_state=preparer)
  if name == "sharpening" and sharpening.needs_preparer(config.objective):
    return _sharpening_parts(run)
  if name != "gkd":
    return ObjectiveParts(objectives.make_loss_fn(config.objective, run.lm), {}, {})
  source = config.teacher.source if "teacher" in config else ""
  if not source:
    raise config_lib.ConfigError(
        "objective gkd needs a frozen teacher: set --config.teacher.source to a jaxsi workdir or a "
        "Hugging Face checkpoint (configs/arithmetic_gkd.py trains one when it is empty).")
  teacher_lm, teacher_params = pretrained.load(source, mesh=run.mesh)
  if teacher_lm.vocab_size != run.lm.vocab_size:
    raise config_lib.ConfigError(
        f"Teacher vocabulary width {teacher_lm.vocab_size} (from {source!r}) differs from the "
        f"student's model.vocab_size={run.lm.vocab_size}; GKD compares distributions over the same "
        "tokens, so both models need the same tokenizer and head width.")
  loss_fn = objectives.make_loss_fn(config.objective, run.lm, teacher_lm=teacher_lm,
                                    eos_id=run.task.tokenizer.eos_id)
  frozen = {"teacher": teacher_params}
  frozen_shardings = {"teacher": partitioning.shardings_for(
      teacher_lm.param_axes(), teacher_lm.abstract_params(), run.mesh)}
  sampler = onpolicy.ResponseSampler(run.lm, teacher_lm, config.objective, run.task, run.mesh,
                                     run.task.max_response_len, config.seed)
  prepare = lambda step, batch, params, frozen: sampler(step, batch, params, frozen["teacher"])
  return ObjectiveParts(loss_fn, frozen, frozen_shardings, prepare)


def _count_tokens(batch: dict[str, np.ndarray]) -> int:
  return int(batch["prompt_mask"].sum() + batch["response_mask"].sum())


def run_eval(run: Run, params) -> dict[str, float]:
  """Greedy-decodes the held-out examples and returns `eval/<metric>` values."""
  metrics, _ = eval_loop.evaluate(run.decode, params, run.task, run.eval_examples,
                                  batch_size=run.config.eval.batch_size, mesh=run.mesh,
                                  temperatures=run.config.eval.temperatures,
                                  seed=run.config.seed)
  return {f"eval/{k}": float(v) for k, v in metrics.items()}


def train(config, workdir: str, *, stop_at: int | None = None) -> dict[str, float]:
  """Trains until `config.train.steps`, resuming from WORKDIR/checkpoints if present.

  Args:
    config: the locked experiment config.
    workdir: the run directory.
    stop_at: stop after this step with a checkpoint, as a preemption would (the schedule
      still follows `config.train.steps`); rerunning continues from there.

  Returns:
    The final metrics (last train metrics and the final eval).
  """
  run = setup(config, workdir)
  is_main = jax.process_index() == 0
  state, start_step = restore_or_init(run)
  total_steps = config.train.steps
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config_lib.to_json(config))
  writer = MetricsWriter(workdir, resume_step=start_step,
                         tensorboard=config.log.tensorboard) if is_main else None

  parts = build_objective(run)
  frozen = parts.frozen
  if parts.host_state is not None and start_step > 0:
    parts.host_state.load_state_dict(
        run.checkpointer.read_json(start_step, "data").get("objective", {}))
  example_batch = run.task.train_batch(0, config.train.batch_size,
                                       process_index=jax.process_index(),
                                       process_count=jax.process_count())
  batch_shardings = {k: partitioning.batch_sharding(run.mesh, v.ndim)
                     for k, v in example_batch.items()}
  replicated = partitioning.replicated(run.mesh)
  if parts.batch_ndims is not None:
    batch_shardings = {k: partitioning.batch_sharding(run.mesh, n)
                       for k, n in parts.batch_ndims.items()}
  elif parts.prepare is not None and gkd.uses_rewards(config.objective):
    batch_shardings["reward"] = partitioning.batch_sharding(run.mesh, 1)
  train_step = mesh_lib.compile_together(jax.jit(
      step_lib.make_train_step(parts.loss_fn, run.tx),
      in_shardings=(run.state_shardings, parts.frozen_shardings, batch_shardings, replicated),
      out_shardings=(run.state_shardings, replicated),
      donate_argnums=(0,)), "train_step")
  train_rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)

  stop_requested = {"signal": None}

  def on_sigterm(signum, _frame):
    stop_requested["signal"] = signum

  previous_handler = None
  # Signal handlers can only be installed from the main thread (not, e.g., under a test runner thread).
  if threading.current_thread() is threading.main_thread():
    previous_handler = signal.signal(signal.SIGTERM, on_sigterm)

  progress = tqdm.tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                       disable=not (is_main and config.train.progress), dynamic_ncols=True)
  schedule = optim.build_schedule(config.optim)
  last_metrics: dict[str, float] = {}
  # Metrics of step t are fetched after step t+1 is dispatched, so the host never stalls the
  # device; `pending` holds (step number after the update, device metrics).
  pending: tuple[int, Any] | None = None
  # throughput window, excluding eval and checkpoints
  window = {"tokens": 0, "seconds": 0.0, "sample_seconds": 0.0, "flops": 0.0}
  # Measured once per process, before the loop keeps the devices busy (None: MFU is off).
  peak_flops = peak_lib.run_peak_flops(run.lm.config.get("dtype", "float32"))

  def fetch(pending) -> dict[str, float]:
    step, device_metrics = pending
    host = {f"train/{k}": float(v) for k, v in jax.device_get(device_metrics).items()}
    if not math.isfinite(host["train/loss"]):
      raise TrainingError(
          f"The loss became {host['train/loss']} at step {step}; stopping. The last good checkpoint "
          f"(step {run.checkpointer.latest_step()}) is kept in {run.checkpointer.directory}; lower "
          "optim.lr or enable optim.grad_clip_norm.")
    return host

  def log(pending) -> None:
    host = fetch(pending)
    step = pending[0]
    last_metrics.update(host)
    if step % config.train.log_every and step != total_steps:
      return
    host["train/tokens_per_s"] = window["tokens"] / max(window["seconds"], 1e-9)
    host["train/model_flops_per_s"] = window["flops"] / max(window["seconds"], 1e-9)
    if peak_flops:
      host["train/mfu"] = host["train/model_flops_per_s"] / peak_flops
    if "train/sample_seconds" in host:
      host["train/sampling_time_share"] = window["sample_seconds"] / max(window["seconds"], 1e-9)
    host["train/lr"] = float(schedule(step - 1))
    window.update(tokens=0, seconds=0.0, sample_seconds=0.0, flops=0.0)
    last_metrics.update(host)
    if writer:
      writer.write(step, host)
    postfix = dict(loss=f"{host['train/loss']:.4f}", tok_s=f"{host['train/tokens_per_s']:.0f}")
    if "train/mfu" in host:
      postfix["mfu"] = f"{host['train/mfu']:.1%}"
    progress.set_postfix(postfix, refresh=False)

  def save(step: int, force: bool = False) -> None:
    data = {"step": step, "task": config.data.name}
    if parts.host_state is not None:
      data["objective"] = parts.host_state.state_dict()
    run.checkpointer.save(step, state, config=config.to_dict(), metrics=last_metrics,
                          data=data, force=force)

  try:
    for step in range(start_step, total_steps):
      tick = time.perf_counter()
      host_batch = run.task.train_batch(step, config.train.batch_size,
                                        process_index=jax.process_index(),
                                        process_count=jax.process_count())
      batch = _global_batch(run.mesh, host_batch, config.train.batch_size)
      host_extra = {}
      if parts.prepare is not None:
        sample_start = time.perf_counter()
        batch, host_extra = parts.prepare(step, batch, state.params, frozen)
        host_extra["sample_seconds"] = time.perf_counter() - sample_start
      state, device_metrics = train_step(state, frozen, batch, train_rng)
      if host_extra:
        device_metrics = {**device_metrics, **host_extra}
      if pending is not None:
        log(pending)
      pending = (step + 1, device_metrics)
      window["tokens"] += _count_tokens(host_batch) * jax.process_count()
      window["flops"] += flops_lib.batch_train_step_flops(run.lm.config, batch)
      window["seconds"] += time.perf_counter() - tick
      window["sample_seconds"] += host_extra.get("sample_seconds", 0.0)
      progress.update(1)
      done = step + 1

      if config.train.eval_every and done % config.train.eval_every == 0 and done < total_steps:
        eval_metrics = run_eval(run, state.params)
        last_metrics.update(eval_metrics)
        if writer:
          writer.write(done, eval_metrics)
        progress.write(f"step {done}: " + ", ".join(f"{k}={v:.4f}" for k, v in eval_metrics.items()))
      # The final step is saved after the final eval, so its checkpoint carries those metrics.
      if (config.train.checkpoint_every and done % config.train.checkpoint_every == 0
          and done < total_steps):
        log(pending)  # never checkpoint a state whose loss went bad
        pending = None
        save(done)
      if stop_requested["signal"] is not None or done == stop_at:
        if stop_requested["signal"] is not None:
          logging.warning("SIGTERM received: saving step %d and exiting.", done)
        if pending is not None:
          log(pending)
        save(done, force=True)
        run.checkpointer.close()
        return last_metrics

    if pending is not None:
      log(pending)
    final_step = max(total_steps, start_step)
    if config.eval.at_end:
      eval_metrics = run_eval(run, state.params)
      last_metrics.update(eval_metrics)
      if writer:
        writer.write(final_step, eval_metrics)
      if is_main:
        progress.write("final eval: " + ", ".join(f"{k}={v:.4f}" for k, v in eval_metrics.items()))
    save(final_step, force=True)
    run.checkpointer.close()
  finally:
    progress.close()
    if previous_handler is not None:
      signal.signal(signal.SIGTERM, previous_handler)
  return last_metrics


def evaluate_only(config, workdir: str) -> dict[str, float]:
  """Restores the latest checkpoint in `workdir` and runs the eval set (`--mode=eval`)."""
  run = setup(config, workdir)
  if run.checkpointer.latest_step() is None:
    raise TrainingError(f"No checkpoint in {run.checkpointer.directory} to evaluate; train first "
                        "or pass the --workdir of a finished run.")
  state, step = restore_or_init(run)
  metrics = run_eval(run, state.params)
  if jax.process_index() == 0:
    print(f"eval at step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
  run.checkpointer.close()
  return metrics


