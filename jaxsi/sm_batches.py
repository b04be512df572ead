"""SequenceMatch batches: half data, half replay-buffer samples, one compiled shape.

The trainer calls `BatchPreparer(step, batch, params, frozen)` before each train step (the
`prepare` hook of `trainer.ObjectiveParts`). From the task's batch of `step` it builds the
one-pass layout of `jaxsi.objectives.sequencematch` for B rows:

  rows [0, B - B//2)   data: the task's responses as actions, noise-augmented
                       (`augment_with_noise`: (noise, <bksp>) pairs with `noise_prob`);
                       truncated when cut to the action width or not ending with EOS.
  rows [B - B//2, B)   model samples drawn from the FIFO replay buffer once it has rows
                       (is_data = 0); data rows like the first half before that.

The buffer is refreshed at steps bc_steps, bc_steps + sample_every, ... with the
backspace-aware sampler on the current parameters: one sample per prompt of that step's batch
(B rows). During the first `bc_steps` steps β = 1 and the loss reads data rows only (the BC
term), so model samples would be wasted there: batches are data only until the first refresh.
Data-only and mixed batches have the same shapes, dtypes and shardings (the rows are chosen
with a traced flag), so the train step compiles once. The BC -> SM schedule itself lives in the
loss (`sequencematch.sm_weight`).

Every choice is a pure function of (config, step, buffer contents); the buffer is saved with
each checkpoint (`state_dict`, the checkpoint's `data` item) and restored on resume, so a
resumed run trains on exactly the batches an uninterrupted one does.

Also here: the model with its <bksp> row (`with_backspace`, before init), the growth of
`init_from` parameters (`grow_loaded_params`), and the eval decoder that scores the
materialized text of backspace generations (`make_eval_decoder`).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxsi import partitioning
from jaxsi import replay_buffer
from jaxsi import sampling
from jaxsi.models import vocab as vocab_lib
from jaxsi.models.lm import LanguageModel, Params
from jaxsi.objectives import sequencematch as sm

# PRNG streams folded into the run's base key (onpolicy uses 2 and 3, evals and sharpening 4).
NOISE_STREAM = 7
SAMPLE_STREAM = 8

# The ndim of every array of a prepared batch (the trainer's batch shardings).
BATCH_NDIMS = {"prompt": 2, "prompt_mask": 2, "response": 2, "response_mask": 2,
               "response_positions": 2, "response_visibility": 3, "targets": 2, "loss_mask": 2,
               "is_data": 1, "truncated": 1}

# Wrong tokens for noise="task" on the arithmetic task: any digit of bases up to 16, or a sign.
_ARITHMETIC_NOISE_TEXT = "0123456789abcdef-"


def with_backspace(lm: LanguageModel, objective_cfg: ml_collections.ConfigDict) -> LanguageModel:
  """The model `lm` grown by the <bksp> row (`vocab.grow_vocab`), without touching parameters."""
  grown = {}

  def grow(params):
    grown["lm"], params = vocab_lib.grow_vocab(lm, params, 1, init=objective_cfg.backspace_init)
    return params

  jax.eval_shape(grow, lm.abstract_params())
  return grown["lm"]


def grow_loaded_params(run_lm: LanguageModel, loaded_lm: LanguageModel, params: Params,
                       objective_cfg: ml_collections.ConfigDict) -> Params:
  """`init_from` parameters with the <bksp> row added when they lack it.

  Parameters of a model with one real token fewer than `run_lm` (the model before
  `with_backspace`, e.g. an SFT run) gain the row (`objective.backspace_init`); others are
  returned as they are (the trainer's compatibility check then judges them).
  """
  if vocab_lib.real_vocab_size(loaded_lm) + 1 != vocab_lib.real_vocab_size(run_lm):
    return params
  _, params = vocab_lib.grow_vocab(loaded_lm, params, 1, init=objective_cfg.backspace_init)
  return params


def eval_max_actions(objective_cfg: ml_collections.ConfigDict, max_new_tokens: int) -> int:
  """Action cap of eval generations: `objective.max_actions`, else 2 × max_new_tokens."""
  if objective_cfg.max_actions is not None:
    return int(objective_cfg.max_actions)
  return 2 * int(max_new_tokens)


def make_eval_decoder(lm: LanguageModel, objective_cfg: ml_collections.ConfigDict, *,
                      max_new_tokens: int, eos_id: int, pad_id: int,
                      mesh: Mesh | None = None) -> Callable:
  """`decode(params, prompt, prompt_mask, rng, temperature) -> SampleOutput` with backspace.

  The drop-in for `jaxsi.evals.loop.make_decoder`: `tokens` holds the materialized text (what
  remains after the model's backspaces), which the task scores.
  """
  sampler = sampling.make_sampler(
      lm, max_new_tokens=max_new_tokens, num_samples=1, eos_id=eos_id, pad_id=pad_id, mesh=mesh,
      backspace_id=sm.resolve_backspace_id(objective_cfg, lm),
      max_actions=eval_max_actions(objective_cfg, max_new_tokens))
  return lambda params, prompt, prompt_mask, rng, temperature: sampler(
      params, prompt, prompt_mask, rng, temperature, 0, 1.0)


def check_lengths(lm: LanguageModel, prompt_width: int, action_width: int,
                  eval_actions: int) -> None:
  """Fails in one sentence when a decoder's `max_len` cannot hold the action layouts."""
  max_len = lm.config.get("max_len", None) if lm.config.get("family") != "t5" else None
  needed = prompt_width + max(action_width + 1, eval_actions)
  if max_len is not None and needed > max_len:
    raise ValueError(
        f"SequenceMatch needs {needed} positions (prompt {prompt_width} + max(training actions "
        f"{action_width} + 1, eval actions {eval_actions})) but model.max_len={max_len}; raise "
        "model.max_len or lower objective.max_actions.")


def task_noise_fn(task: Any) -> Callable[..., jax.Array]:
  """`noise="task"` for `task`: a uniformly drawn wrong token at each position.

  Only the arithmetic task defines wrong tokens (the digits of bases up to 16 and "-"); a
  position whose action is one of them gets one of the others, any other action (EOS) any of
  them.

  Raises:
    ValueError: the task defines no wrong tokens.
  """
  if getattr(task, "name", None) != "arithmetic":
    raise ValueError(f"objective.noise='task' needs task-specific wrong tokens, which only the "
                     f"arithmetic task defines; task {getattr(task, 'name', task)!r} has none, "
                     "so use objective.noise='random'.")
  candidates_K = jnp.asarray(task.tokenizer.encode(_ARITHMETIC_NOISE_TEXT), jnp.int32)
  k = candidates_K.shape[0]

  def noise_fn(rng, actions_BxL, mask_BxL):
    del mask_BxL
    matches_BxLxK = actions_BxL[..., None] == candidates_K
    is_candidate_BxL = matches_BxLxK.any(-1)
    index_BxL = jnp.argmax(matches_BxLxK, axis=-1)
    # Draw among the K - 1 others (skipping the action's own index) or among all K.
    upper_BxL = jnp.where(is_candidate_BxL, k - 1, k)
    draw_BxL = jnp.floor(jax.random.uniform(rng, actions_BxL.shape) * upper_BxL).astype(jnp.int32)
    draw_BxL = draw_BxL + (is_candidate_BxL & (draw_BxL >= index_BxL)).astype(jnp.int32)
    return candidates_K[jnp.minimum(draw_BxL, k - 1)]

  return noise_fn


class BatchPreparer:
  """The trainer's per-step `prepare` for SequenceMatch (see the module docstring).

  Args:
    lm: the model being trained, with its <bksp> row (`with_backspace`).
    objective_cfg: the SequenceMatch objective config.
    task: the jaxsi Task (widths, tokenizer, and wrong tokens for noise="task").
    mesh: the device mesh; prepared batches are sharded over its batch axes.
    batch_size: B, rows of the global batch.
    seed: the run seed (noise, samples and buffer draws use their own streams of it).
    eval_max_new_tokens: when given, also check that eval generations fit a decoder's max_len.

  Attributes:
    buffer: the `ReplayBuffer` of model action sequences.
    action_width: L, the action width of every row (the batch's response width is L + 1).
  """

  def __init__(self, lm: LanguageModel, objective_cfg: ml_collections.ConfigDict, task: Any,
               mesh: Mesh, batch_size: int, seed: int, eval_max_new_tokens: int | None = None):
    sm.validate(objective_cfg)
    cfg = objective_cfg
    self.cfg = cfg
    self.mesh = mesh
    self.batch_size = int(batch_size)
    self.num_model_rows = self.batch_size // 2
    tokenizer = task.tokenizer
    self.pad_id = tokenizer.pad_id
    self.eos_id = tokenizer.eos_id if cfg.eos_id is None else int(cfg.eos_id)
    self.backspace_id = sm.resolve_backspace_id(cfg, lm)
    self.max_new_tokens = (task.max_response_len if cfg.max_new_tokens is None
                           else int(cfg.max_new_tokens))
    self.action_width = sm.max_actions(cfg, task.max_response_len)
    self.prompt_width = task.max_prompt_len
    check_lengths(lm, self.prompt_width, self.action_width,
                  0 if eval_max_new_tokens is None else eval_max_actions(cfg, eval_max_new_tokens))
    noise_vocab = min(tokenizer.vocab_size, vocab_lib.real_vocab_size(lm))
    noise_fn = task_noise_fn(task) if cfg.noise == "task" else None
    self.buffer = replay_buffer.ReplayBuffer(cfg.buffer_size, self.prompt_width,
                                             self.action_width, seed=seed, pad_id=self.pad_id)
    base = jax.random.PRNGKey(seed)
    self.noise_rng = jax.random.fold_in(base, NOISE_STREAM)
    self.sample_rng = jax.random.fold_in(base, SAMPLE_STREAM)
    self.sampler = sampling.make_sampler(
        lm, max_new_tokens=self.max_new_tokens, num_samples=1, eos_id=self.eos_id,
        pad_id=self.pad_id, mesh=mesh, backspace_id=self.backspace_id,
        max_actions=self.action_width)
    self.steps_sampled = 0

    backspace_id, pad_id, eos_id = self.backspace_id, self.pad_id, self.eos_id
    width, rows, num_model = self.action_width, self.batch_size, self.num_model_rows

    def build(batch, model_rows, mixed, rng):
      data = sm.augment_with_noise(
          rng, batch["response"], batch["response_mask"], noise_prob=float(cfg.noise_prob),
          backspace_id=backspace_id, vocab_size=noise_vocab, max_len=width, noise=cfg.noise,
          task_noise_fn=noise_fn, eos_id=eos_id, pad_id=pad_id)
      data_layout = sm.preprocess_actions(
          data["actions"], backspace_id, pad_id=pad_id, actions_mask_BxL=data["mask"],
          loss_mask_BxL=data["loss_mask"])
      model_layout = sm.preprocess_actions(
          model_rows["actions"], backspace_id, pad_id=pad_id,
          actions_mask_BxL=model_rows["actions_mask"])
      is_model_B = mixed & (jnp.arange(rows) >= rows - num_model)

      def pick(data_x, model_x):
        is_model = is_model_B.reshape((rows,) + (1,) * (data_x.ndim - 1))
        return jnp.where(is_model, model_x, data_x.astype(model_x.dtype))

      out = {key: pick(data_layout[key], model_layout[key]) for key in data_layout}
      out["prompt"] = pick(batch["prompt"], model_rows["prompt"])
      out["prompt_mask"] = pick(batch["prompt_mask"], model_rows["prompt_mask"])
      # A data response that does not end with EOS was cut (e.g. a text window): truncated.
      length_B = batch["response_mask"].astype(jnp.int32).sum(axis=1)
      last_B = jnp.take_along_axis(batch["response"], jnp.maximum(length_B - 1, 0)[:, None],
                                   axis=1)[:, 0]
      data_truncated_B = data["truncated"] | (last_B != eos_id)
      out["truncated"] = pick(data_truncated_B, model_rows["truncated"])
      out["is_data"] = (~is_model_B).astype(jnp.int32)
      return out

    out_shardings = {key: partitioning.batch_sharding(mesh, ndim)
                     for key, ndim in BATCH_NDIMS.items()}
    self._build = jax.jit(build, out_shardings=out_shardings)

  def refreshes(self, step: int) -> bool:
    """Whether the buffer gets fresh samples before step `step`'s batch is built."""
    since = step - self.cfg.bc_steps
    return since >= 0 and since % self.cfg.sample_every == 0

  def refresh(self, step: int, prompt: jax.Array, prompt_mask: jax.Array, params: Params
              ) -> None:
    """Samples one action sequence per prompt with `params` and adds them to the buffer."""
    out = self.sampler(params, prompt, prompt_mask, jax.random.fold_in(self.sample_rng, step),
                       self.cfg.sample_temperature, self.cfg.top_k, self.cfg.top_p)
    # Every host keeps the whole (global) buffer.
    gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
    self.buffer.add(gather(out.prompt), gather(out.prompt_mask), gather(out.actions),
                    gather(out.actions_mask), gather(out.truncated))
    self.steps_sampled += 1

  def _model_rows(self, step: int) -> dict[str, jax.Array]:
    """B rows for the model half (only the last B // 2 are read), sharded like the batch."""
    host = {"prompt": np.zeros((self.batch_size, self.prompt_width), np.int32),
            "prompt_mask": np.zeros((self.batch_size, self.prompt_width), np.int32),
            "actions": np.zeros((self.batch_size, self.action_width), np.int32),
            "actions_mask": np.zeros((self.batch_size, self.action_width), np.int32),
            "truncated": np.zeros((self.batch_size,), bool)}
    if len(self.buffer) and self.num_model_rows:
      drawn = self.buffer.sample(step, self.num_model_rows)
      for key, value in drawn.items():
        host[key][self.batch_size - self.num_model_rows:] = value
    return {key: jax.make_array_from_callback(
        value.shape, partitioning.batch_sharding(self.mesh, value.ndim),
        lambda index, value=value: value[index]) for key, value in host.items()}

  def __call__(self, step: int, batch: dict, params: Params, frozen: Any = None
               ) -> tuple[dict, dict[str, float]]:
    """Returns (step `step`'s SequenceMatch batch, host metrics).

    Args:
      step: the optimizer step about to run.
      batch: the task's batch of that step (global arrays with prompt, prompt_mask, response,
        response_mask).
      params: the current parameters (used when the buffer is refreshed).
      frozen: unused.
    """
    del frozen
    refreshed = self.refreshes(step)
    seconds = 0.0
    if refreshed:
      start = time.perf_counter()
      self.refresh(step, batch["prompt"], batch["prompt_mask"], params)
      seconds = time.perf_counter() - start
    mixed = len(self.buffer) > 0
    prepared = self._build(batch, self._model_rows(step), np.bool_(mixed),
                           jax.random.fold_in(self.noise_rng, step))
    metrics = {"buffer_rows": float(len(self.buffer)), "refreshed": float(refreshed),
               "refresh_seconds": seconds}
    return prepared, metrics

  def state_dict(self) -> dict[str, Any]:
    """Host state to save with a checkpoint (JSON-able): the replay buffer."""
    return {"replay_buffer": self.buffer.state_dict()}

  def load_state_dict(self, state: dict[str, Any]) -> None:
    """Restores `state_dict()`; a state without a buffer (an older run) leaves it empty."""
    if state and "replay_buffer" in state:
      self.buffer.load_state_dict(state["replay_buffer"])
