"""On-policy batches for GKD: responses replaced by student (or teacher) samples.

The host decides each step where the responses come from (`gkd.response_source`, a pure
function of the run key and the step), calls the compiled sampler, and hands the train step
a batch of the same shapes and dtypes, so one compiled step serves every source. Rewards for
GKD + RL are scored on the host from decoded text and travel in `batch["reward"]`.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxsi import partitioning
from jaxsi import sampling
from jaxsi.objectives import gkd
from jaxsi.objectives import rewards as rewards_lib

# Separate PRNG streams folded into the run's base key.
COIN_STREAM = 2
SAMPLE_STREAM = 3


class ResponseSampler:
  """Prepares each GKD step's batch.

  Args:
    lm: the student model.
    teacher_lm: the frozen teacher model.
    objective_cfg: the GKD objective config.
    task: the jaxsi Task (tokenizer, for EOS/PAD ids and for decoding rewards).
    mesh: the device mesh; samples come back sharded like the batch.
    response_width: T of the batch's responses.
    seed: the run seed (the coin and the sampler use their own streams of it).
  """

  def __init__(self, lm, teacher_lm, objective_cfg, task, mesh, response_width: int, seed: int):
    self.cfg = gkd.resolve(objective_cfg)
    self.task = task
    self.mesh = mesh
    self.width = response_width
    base = jax.random.PRNGKey(seed)
    self.coin_rng = jax.random.fold_in(base, COIN_STREAM)
    self.sample_rng = jax.random.fold_in(base, SAMPLE_STREAM)
    self.settings = gkd.sampling_settings(self.cfg, response_width)
    self.uses_rewards = gkd.uses_rewards(self.cfg)
    self.reward_fn = rewards_lib.get_reward(self.cfg.reward) if self.uses_rewards else None
    make = lambda model: sampling.make_sampler(
        model, max_new_tokens=self.settings["max_new_tokens"], num_samples=1,
        eos_id=task.tokenizer.eos_id, pad_id=task.tokenizer.pad_id, mesh=mesh)
    self._samplers = {"student": make(lm), "teacher": make(teacher_lm)}
    self.steps_seen = 0
    self.steps_sampled = 0
    self.sample_seconds = 0.0

  def source(self, step: int) -> str:
    """Where step `step`'s responses come from."""
    return gkd.response_source(self.cfg, self.coin_rng, step)

  def __call__(self, step: int, batch: dict, params: Any, teacher_params: Any
               ) -> tuple[dict, dict[str, float]]:
    """Returns (the batch for the train step, host metrics).

    Args:
      step: the optimizer step about to run.
      batch: the dataset batch (global arrays on the mesh).
      params: the current student parameters.
      teacher_params: the frozen teacher parameters.
    """
    source = self.source(step)
    self.steps_seen += 1
    batch = dict(batch)
    targets = batch["response"]
    if source != "dataset":
      start = time.perf_counter()
      out = self._samplers[source](
          params if source == "student" else teacher_params, batch["prompt"],
          batch["prompt_mask"], jax.random.fold_in(self.sample_rng, step),
          self.settings["temperature"], self.settings["top_k"], self.settings["top_p"])
      tokens, mask = out.tokens, out.mask
      pad = self.width - tokens.shape[1]
      if pad:
        tokens = jnp.pad(tokens, ((0, 0), (0, pad)), constant_values=self.task.tokenizer.pad_id)
        mask = jnp.pad(mask, ((0, 0), (0, pad)))
      batch["response"] = tokens.astype(jnp.int32)
      batch["response_mask"] = mask.astype(batch["response_mask"].dtype)
      jax.block_until_ready(batch["response"])
      self.sample_seconds += time.perf_counter() - start
      self.steps_sampled += source == "student"
    if self.uses_rewards:
      batch["reward"] = self._rewards(batch["response"], targets, scored=source != "dataset")
    metrics = {"on_policy_fraction": self.steps_sampled / self.steps_seen,
               "sampled": float(source != "dataset")}
    return batch, metrics

  def _rewards(self, responses, targets, *, scored: bool):
    """[B] float32 rewards on the mesh; zeros for dataset steps (the RL term is then zero)."""
    rows = responses.shape[0]
    if not scored:
      values = np.zeros((rows,), np.float32)
    else:
      gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
      decode = self.task.tokenizer.decode
      predictions = [decode(list(row)) for row in gather(responses)]
      references = [decode(list(row)) for row in gather(targets)]
      values = np.asarray(self.reward_fn(predictions, references), np.float32)
    return jax.device_put(values, partitioning.batch_sharding(self.mesh, 1))
