"""The eval loop: decode held-out prompts in fixed-shape batches and score the text."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxsi import partitioning
from jaxsi import sampling

# PRNG stream for eval sampling, folded into the run's base key.
EVAL_STREAM = 4


def make_decoder(lm, *, max_new_tokens: int, eos_id: int, pad_id: int,
                 mesh: Mesh | None = None) -> Callable:
  """A compiled-once `decode(params, prompt, prompt_mask, rng, temperature) -> SampleOutput`.

  Temperature 0 is greedy decoding; the temperature is traced, so every eval temperature
  shares one executable.
  """
  sampler = sampling.make_sampler(lm, max_new_tokens=max_new_tokens, num_samples=1,
                                  eos_id=eos_id, pad_id=pad_id, mesh=mesh)
  return lambda params, prompt, prompt_mask, rng, temperature: sampler(
      params, prompt, prompt_mask, rng, temperature, 0, 1.0)


def metric_suffix(temperature: float) -> str:
  """"" for greedy decoding, "_t{temperature}" for sampling (e.g. "accuracy_t1")."""
  return "" if temperature == 0 else f"_t{temperature:g}"


def evaluate(decode: Callable, params: Any, task, examples: list, *, batch_size: int,
             mesh: Mesh, temperatures: Sequence[float] = (0.0,), seed: int = 0
             ) -> tuple[dict[str, float], dict[float, list[str]]]:
  """Decodes `examples` at each temperature and scores them with `task.score`.

  Args:
    decode: from `make_decoder`.
    params: model parameters (already placed on `mesh`).
    task: a jaxsi Task (tokenizer, pack, score).
    examples: the task's eval examples.
    batch_size: rows per decode call; the last batch is padded by repeating examples so every
      call has the same shape (one compilation).
    mesh: the device mesh; rows are sharded over its batch axes.
    temperatures: 0 = greedy; others sample (metrics get a `_t{temperature}` suffix).
    seed: seeds the sampling; the same seed gives the same samples.

  Returns:
    (metrics, predictions per temperature), predictions in example order.
  """
  if not examples:
    raise ValueError("The eval set is empty; set eval.num_examples > 0 or check the data config.")
  shards = partitioning.mesh_size(mesh, partitioning.BATCH_MESH_AXES)
  batch_size = max(shards, -(-batch_size // shards) * shards)
  rng = jax.random.fold_in(jax.random.PRNGKey(seed), EVAL_STREAM)
  metrics: dict[str, float] = {}
  all_predictions: dict[float, list[str]] = {}
  for temperature in temperatures:
    predictions: list[str] = []
    for start in range(0, len(examples), batch_size):
      chunk = examples[start:start + batch_size]
      padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
      batch = task.pack(padded, with_response=False)
      prompt = jax.device_put(batch["prompt"], partitioning.batch_sharding(mesh, 2))
      prompt_mask = jax.device_put(batch["prompt_mask"], partitioning.batch_sharding(mesh, 2))
      out = decode(params, prompt, prompt_mask, jax.random.fold_in(rng, start), temperature)
      # Every process needs every row to score and to print: gather across hosts.
      tokens = np.asarray(multihost_utils.process_allgather(out.tokens, tiled=True))
      predictions.extend(task.tokenizer.decode(list(row)) for row in tokens[:len(chunk)])
    suffix = metric_suffix(float(temperature))
    metrics.update({f"{k}{suffix}": v for k, v in task.score(predictions, examples).items()})
    all_predictions[float(temperature)] = predictions
  return metrics, all_predictions
