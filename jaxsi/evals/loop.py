"""The eval loop: decode held-out prompts in fixed-shape batches and score the text."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxsi import partitioning
from jaxsi.evals.greedy import greedy_decode


def make_decoder(lm, *, max_new_tokens: int, eos_id: int, pad_id: int) -> Callable:
  """A jitted `decode(params, prompt, prompt_mask) -> (tokens, mask)` (greedy)."""
  return jax.jit(functools.partial(greedy_decode, lm, max_new_tokens=max_new_tokens,
                                   eos_id=eos_id, pad_id=pad_id))


def evaluate(decode: Callable, params: Any, task, examples: list, *, batch_size: int,
             mesh: Mesh) -> tuple[dict[str, float], list[str]]:
  """Decodes `examples` and scores them with `task.score`.

  Args:
    decode: from `make_decoder`.
    params: model parameters (already placed on `mesh`).
    task: a jaxsi Task (tokenizer, pack, score).
    examples: the task's eval examples.
    batch_size: rows per decode call; the last batch is padded by repeating examples so every
      call has the same shape (one compilation).
    mesh: the device mesh; rows are sharded over its batch axes.

  Returns:
    (metrics, predictions) for the examples, in order.
  """
  if not examples:
    raise ValueError("The eval set is empty; set eval.num_examples > 0 or check the data config.")
  shards = partitioning.mesh_size(mesh, partitioning.BATCH_MESH_AXES)
  batch_size = max(shards, -(-batch_size // shards) * shards)
  predictions: list[str] = []
  for start in range(0, len(examples), batch_size):
    chunk = examples[start:start + batch_size]
    padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
    batch = task.pack(padded, with_response=False)
    prompt = jax.device_put(batch["prompt"], partitioning.batch_sharding(mesh, 2))
    prompt_mask = jax.device_put(batch["prompt_mask"], partitioning.batch_sharding(mesh, 2))
    tokens, _ = decode(params, prompt, prompt_mask)
    # Every process needs every row to score and to print: gather across hosts.
    tokens = np.asarray(multihost_utils.process_allgather(tokens, tiled=True))
    predictions.extend(task.tokenizer.decode(list(row)) for row in tokens[:len(chunk)])
  return task.score(predictions, examples), predictions
