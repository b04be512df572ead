"""Best-of-N evaluation of one model: greedy, sampled and best-of-N-by-likelihood accuracy.

The inference-time side of Sharpening (spec/sharpening.md): for each prompt, draw N responses
at temperature τ (default 1) and keep the one the model itself finds most likely, by the sum
of its token log-probs or by their per-token mean. For a list of N, everything comes from ONE
draw of max(N) samples per prompt: best-of-n uses the FIRST n samples of that draw, so the
curves over n are nested (coverage never drops as n grows) and cost one sampler call.

What `evaluate` reports (keys without prefix; `m` = the task's headline metric, "accuracy"
for arithmetic and GSM8K):

  m_greedy, length_greedy, truncation_greedy   greedy decoding;
  log_likelihood_greedy                        mean log π(y_greedy|x) under the model;
  base_log_likelihood_greedy                   ... under a base model, when one is given
                                               (the self-reward r of the greedy answer);
  reference_log_likelihood                     mean log π(y_ref|x) of the reference answers;
  m_sampled, length_sampled, truncation_sampled, reward_sampled, reward_sampled_norm
                                               temperature-τ sampling, averaged over all
                                               max(N) samples of every prompt (reward: the
                                               model's log π(y|x); _norm: per token);
  m_bon{n}, m_bon{n}_norm                      best-of-n selected by the sum / per-token mean;
  coverage{n}                                  pass@n: any of the first n samples is right;
  reward_bon{n}, reward_bon{n}_norm            the selected responses' score (sum / mean);
  length_bon{n}, length_bon{n}_norm            their length in tokens.

The self-reward of a sample is log π(y|x) over its tokens through the first EOS, at
temperature 1: the sampler's own per-token log-probs are those terms (`sampling.SampleOutput`
.logprobs) and are reused, never recomputed. Per-sample correctness is the task's `score` of
that one prediction (1 or 0 for accuracy tasks). Ties in the selection go to the first
sample (`sharpening.select_best`).

`run` evaluates a saved model (a jaxsi workdir or a Hugging Face checkpoint) with the
settings of `config.eval.best_of_n` (`default_config`) on held-out examples and on the first
training prompts, and is what the Sharpening pipeline calls after training.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxsi import partitioning
from jaxsi import sampling
from jaxsi.data import tasks as tasks_lib
from jaxsi.objectives import sharpening

# PRNG stream of the best-of-N samples, folded into the run's base key (the eval loop uses 4
# with the same seed; a different stream keeps the two draws independent).
BON_STREAM = 5


def default_config() -> ml_collections.ConfigDict:
  """The `eval.best_of_n` section: what `run` evaluates, with its defaults.

  Keys:
    ns: the N of best-of-N, e.g. (1, 2, 4, 8); empty disables the best-of-N eval.
    temperature: τ > 0 of the samples (1 = the model's own distribution).
    batch_size: prompts per sampler call (the call holds batch_size x max(ns) rows).
    num_examples: held-out examples (the task's first ones).
    train_prompts: also evaluate the first this-many training prompts (the prompts the
      generate stage sampled, in its order), with one sample each; 0 = off.
    with_base: the pipeline also evaluates the base model, as `eval/bon_base/...`.
  """
  return ml_collections.ConfigDict({"ns": (), "temperature": 1.0, "batch_size": 64,
                                    "num_examples": 200, "train_prompts": 0,
                                    "with_base": True})


def check_ns(ns: Sequence[int]) -> tuple[int, ...]:
  """The N values sorted and unique; raises a ValueError naming a bad one."""
  for n in ns:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
      raise ValueError(f"Best-of-N value {n!r} is invalid; every N must be an integer >= 1.")
  return tuple(sorted({int(n) for n in ns}))


# ----------------------------------------------------------------------------- selection


def best_of_n_metrics(correct_ExN: np.ndarray, log_likelihood_ExN: np.ndarray,
                      length_ExN: np.ndarray, truncated_ExN: np.ndarray, ns: Sequence[int], *,
                      metric: str = "accuracy") -> dict[str, float]:
  """The sampled and best-of-n metrics of one draw of max(ns) samples per example.

  Best-of-n looks at the first n columns only. Selection by the sum uses r = log π(y|x),
  by the mean r / max(|y|, 1) (`sharpening` conventions); ties go to the first sample.

  Args:
    correct_ExN: [E, N] per-sample score of `metric` (1/0 for accuracy).
    log_likelihood_ExN: [E, N] log π(y|x) of each sample.
    length_ExN: [E, N] tokens through EOS.
    truncated_ExN: [E, N] bool, no EOS within the length cap.
    ns: the n values, each <= N.
    metric: the name the correctness keys carry.

  Returns:
    `{metric}_sampled`, `length_sampled`, `truncation_sampled`, `reward_sampled(_norm)`, and
    per n `{metric}_bon{n}(_norm)`, `coverage{n}`, `reward_bon{n}(_norm)`,
    `length_bon{n}(_norm)` (see the module docstring).
  """
  ns = check_ns(ns)
  correct_ExN = np.asarray(correct_ExN, np.float64)
  log_likelihood_ExN = np.asarray(log_likelihood_ExN, np.float64)
  length_ExN = np.asarray(length_ExN, np.float64)
  drawn = correct_ExN.shape[1]
  if ns and ns[-1] > drawn:
    raise ValueError(f"Best-of-{ns[-1]} needs {ns[-1]} samples per prompt but only {drawn} "
                     "were drawn; draw max(ns) samples.")
  normalized_ExN = log_likelihood_ExN / np.maximum(length_ExN, 1.0)
  out = {f"{metric}_sampled": correct_ExN.mean(), "length_sampled": length_ExN.mean(),
         "truncation_sampled": np.asarray(truncated_ExN, np.float64).mean(),
         "reward_sampled": log_likelihood_ExN.mean(), "reward_sampled_norm": normalized_ExN.mean()}
  for n in ns:
    out[f"coverage{n}"] = correct_ExN[:, :n].max(axis=1).mean()
    for suffix, score_ExN in (("", log_likelihood_ExN), ("_norm", normalized_ExN)):
      index_E = np.asarray(sharpening.select_best(score_ExN[:, :n], truncated_ExN[:, :n]))
      pick = lambda x_ExN: np.take_along_axis(x_ExN, index_E[:, None], axis=1)[:, 0]
      out[f"{metric}_bon{n}{suffix}"] = pick(correct_ExN).mean()
      out[f"reward_bon{n}{suffix}"] = pick(score_ExN).mean()
      out[f"length_bon{n}{suffix}"] = pick(length_ExN).mean()
  return {key: float(value) for key, value in out.items()}


# ----------------------------------------------------------------------------- the model side


@dataclasses.dataclass
class Draw:
  """Responses to E examples, N per example (host arrays).

  Attributes:
    texts: E lists of N decoded responses.
    log_likelihood: [E, N] log π(y|x) under the sampling model (temperature 1).
    length: [E, N] int, tokens through EOS.
    truncated: [E, N] bool.
    tokens: [E, N, T] int32 response ids; mask: [E, N, T] int32.
  """
  texts: list[list[str]]
  log_likelihood: np.ndarray
  length: np.ndarray
  truncated: np.ndarray
  tokens: np.ndarray
  mask: np.ndarray


def _row_batches(examples: Sequence[tasks_lib.Example], batch_size: int, mesh: Mesh):
  """(start, count, padded chunk) over `examples`; every chunk has the same, shardable size."""
  shards = partitioning.mesh_size(mesh, partitioning.BATCH_MESH_AXES)
  batch_size = max(shards, -(-batch_size // shards) * shards)
  for start in range(0, len(examples), batch_size):
    chunk = list(examples[start:start + batch_size])
    yield start, len(chunk), chunk + [chunk[-1]] * (batch_size - len(chunk))


def _gather(x: jax.Array) -> np.ndarray:
  # Every process needs every row to score: gather across hosts (a no-op on one process).
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def draw(lm: Any, params: Any, task: tasks_lib.Task, examples: Sequence[tasks_lib.Example], *,
         num_samples: int, temperature: float, max_new_tokens: int, batch_size: int,
         rng: jax.Array, mesh: Mesh) -> Draw:
  """Samples `num_samples` responses per example with shared prefills (temperature 0: greedy).

  The prompts go through the sampler `batch_size` at a time (rounded up to a multiple of the
  mesh's batch shards; the last chunk is padded by repeating its last example), each chunk
  with N rows per prompt sharing the prompt's prefill. Chunk c starts at example c·batch_size
  and uses the key fold_in(rng, c·batch_size), so the result depends on (rng, batch size)
  only. The log-likelihood is the sum of the sampler's own temperature-1 per-token log-probs
  (`sampling.SampleOutput.logprobs`) through EOS: no second forward pass.

  Args:
    lm, params: the model.
    task: packs the prompts, decodes the responses.
    examples: E prompts.
    num_samples: N per prompt.
    temperature: 0 (greedy) or τ > 0; top-k and top-p are off.
    max_new_tokens: the response length cap T.
    batch_size: prompts per sampler call.
    rng: the draw's key.
    mesh: the device mesh.

  Returns:
    `Draw` with [E, N, ...] arrays.
  """
  if not examples:
    raise ValueError("The best-of-N eval got no examples; set eval.best_of_n.num_examples > 0.")
  sampler = _sampler(lm, max_new_tokens, num_samples, task.tokenizer.eos_id,
                     task.tokenizer.pad_id, mesh)
  row_sharding = partitioning.batch_sharding(mesh, 2)
  parts = []
  for start, count, chunk in _row_batches(examples, batch_size, mesh):
    batch = task.pack(chunk, with_response=False)
    out = sampler(params, jax.device_put(batch["prompt"], row_sharding),
                  jax.device_put(batch["prompt_mask"], row_sharding),
                  jax.random.fold_in(rng, start), temperature, 0, 1.0)
    # Rows b*N .. b*N+N-1 are prompt b's samples; the padding prompts are dropped.
    per_example = lambda x: _gather(x).reshape((len(chunk), num_samples) + x.shape[1:])[:count]
    tokens, mask = per_example(out.tokens), per_example(out.mask)
    log_likelihood = (per_example(out.logprobs).astype(np.float64) * mask).sum(axis=-1)
    parts.append({"tokens": tokens, "mask": mask, "log_likelihood": log_likelihood,
                  "length": per_example(out.length), "truncated": per_example(out.truncated)})
  arrays = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
  texts = [[task.tokenizer.decode(list(tokens_T)) for tokens_T in tokens_NxT]
           for tokens_NxT in arrays["tokens"]]
  return Draw(texts=texts, **arrays)


def per_sample_scores(task: tasks_lib.Task, examples: Sequence[tasks_lib.Example],
                      texts: Sequence[Sequence[str]]) -> np.ndarray:
  """[E, N] the task's headline metric of each single response (1/0 for accuracy)."""
  metric = task.headline_metric
  return np.asarray([[task.score([text], [example])[metric] for text in row]
                     for example, row in zip(examples, texts)], np.float64)


# The model is static (hashed by identity), so each model compiles once per shape.
_sequence_log_prob_jit = jax.jit(sharpening.sequence_log_prob, static_argnums=0,
                                 static_argnames=("eos_id",))


@functools.lru_cache(maxsize=16)
def _sampler(lm: Any, max_new_tokens: int, num_samples: int, eos_id: int, pad_id: int,
             mesh: Mesh) -> Callable:
  """`sampling.make_sampler`, built once per model and shape (evals call it repeatedly)."""
  return sampling.make_sampler(lm, max_new_tokens=max_new_tokens, num_samples=num_samples,
                               eos_id=eos_id, pad_id=pad_id, mesh=mesh)


def sequence_log_likelihood(lm: Any, params: Any, prompt: np.ndarray, prompt_mask: np.ndarray,
                            response: np.ndarray, response_mask: np.ndarray, *, eos_id: int,
                            mesh: Mesh, batch_size: int) -> np.ndarray:
  """[B] teacher-forced log π(response|prompt) through the first EOS, in chunks of rows.

  The rows are padded (by repeating the last) to a multiple of the batch shards so every
  chunk has one shape.
  """
  shards = partitioning.mesh_size(mesh, partitioning.BATCH_MESH_AXES)
  batch_size = max(shards, -(-batch_size // shards) * shards)
  arrays = {"prompt": prompt, "prompt_mask": prompt_mask, "response": response,
            "response_mask": response_mask}
  total = len(prompt)
  out = []
  for start in range(0, total, batch_size):
    chunk = {k: np.asarray(v[start:start + batch_size], np.int32) for k, v in arrays.items()}
    count = len(chunk["prompt"])
    chunk = {k: np.concatenate([v, np.repeat(v[-1:], batch_size - count, axis=0)])
             for k, v in chunk.items()}
    chunk = {k: jax.device_put(v, partitioning.batch_sharding(mesh, 2)) for k, v in chunk.items()}
    with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.flax_rules()):
      log_prob_B, _ = _sequence_log_prob_jit(lm, params, chunk, eos_id=eos_id)
    out.append(_gather(log_prob_B)[:count])
  return np.concatenate(out).astype(np.float64)


def evaluate(lm: Any, params: Any, task: tasks_lib.Task, examples: Sequence[tasks_lib.Example],
             *, ns: Sequence[int], mesh: Mesh, temperature: float = 1.0,
             max_new_tokens: int | None = None, batch_size: int = 64, seed: int = 0,
             base: tuple[Any, Any] | None = None) -> dict[str, float]:
  """Greedy, sampled and best-of-N metrics of one model on `examples` (see the module doc).

  Args:
    lm, params: the model (params placed on `mesh`, or host arrays).
    task: gives the tokenizer, packing and per-example scoring.
    examples: the prompts with their reference answers.
    ns: the N values; one draw of max(ns) samples per prompt serves them all. Empty: greedy
      and likelihood metrics only.
    mesh: the device mesh; prompt rows are sharded over its batch axes.
    temperature: τ > 0 of the samples.
    max_new_tokens: the response length cap (default: the task's response width).
    batch_size: prompts per sampler call.
    seed: the samples use fold_in(PRNGKey(seed), BON_STREAM).
    base: optional (base_lm, base_params): also report log π_base of the greedy answers.

  Returns:
    The metrics, floats.
  """
  ns = check_ns(ns)
  if not temperature > 0:
    raise ValueError(f"Best-of-N temperature={temperature!r} must be > 0 (greedy decoding is "
                     "reported separately).")
  examples = list(examples)
  max_new_tokens = task.max_response_len if max_new_tokens is None else int(max_new_tokens)
  metric = task.headline_metric
  rng = jax.random.fold_in(jax.random.PRNGKey(seed), BON_STREAM)
  knobs = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, mesh=mesh)

  greedy = draw(lm, params, task, examples, num_samples=1, temperature=0.0, rng=rng, **knobs)
  greedy_texts = [row[0] for row in greedy.texts]
  out = {f"{metric}_greedy": task.score(greedy_texts, examples)[metric],
         "length_greedy": greedy.length.mean(), "truncation_greedy": greedy.truncated.mean(),
         "log_likelihood_greedy": greedy.log_likelihood.mean(),
         "num_examples": len(examples)}
  prompts = task.pack(examples, with_response=False)
  if base is not None:
    base_lm, base_params = base
    out["base_log_likelihood_greedy"] = sequence_log_likelihood(
        base_lm, base_params, prompts["prompt"], prompts["prompt_mask"], greedy.tokens[:, 0],
        greedy.mask[:, 0], eos_id=task.tokenizer.eos_id, mesh=mesh,
        batch_size=batch_size).mean()
  references = task.pack(examples)
  out["reference_log_likelihood"] = sequence_log_likelihood(
      lm, params, references["prompt"], references["prompt_mask"], references["response"],
      references["response_mask"], eos_id=task.tokenizer.eos_id, mesh=mesh,
      batch_size=batch_size).mean()
  if ns:
    sampled = draw(lm, params, task, examples, num_samples=ns[-1], temperature=temperature,
                   rng=jax.random.fold_in(rng, 1), **knobs)
    out.update(best_of_n_metrics(per_sample_scores(task, examples, sampled.texts),
                                 sampled.log_likelihood, sampled.length, sampled.truncated, ns,
                                 metric=metric))
  return {key: float(value) for key, value in out.items()}


# ----------------------------------------------------------------------------- saved models


def train_examples(task: tasks_lib.Task, count: int, chunk_size: int) -> list[tasks_lib.Example]:
  """The first `count` training prompts with their reference answers, as `Example`s.

  Prompt i is row i % C of `task.train_batch(i // C, C)` (C = `chunk_size`): the prompts the
  generate stage of `jaxsi.sharpen_data` samples, in its order. The reference text is the
  decoded reference response.
  """
  if count < 1 or chunk_size < 1:
    raise ValueError(f"train_examples needs count >= 1 and chunk_size >= 1, got {count} and "
                     f"{chunk_size}.")
  out = []
  for chunk in range(-(-count // chunk_size)):
    batch = task.train_batch(chunk, chunk_size)
    for row in range(min(chunk_size, count - chunk * chunk_size)):
      prompt_ids = batch["prompt"][row][batch["prompt_mask"][row] == 1].tolist()
      target_ids = batch["response"][row][batch["response_mask"][row] == 1].tolist()
      out.append(tasks_lib.Example(prompt_ids=prompt_ids,
                                   prompt_text=task.tokenizer.decode(prompt_ids),
                                   target_text=task.tokenizer.decode(target_ids),
                                   target_ids=target_ids))
  return out


def _settings(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.eval.best_of_n` checked against `default_config` (missing section: disabled)."""
  if "best_of_n" not in config.eval:
    return default_config()
  settings = config.eval.best_of_n
  expected = set(default_config().keys())
  if set(settings.keys()) != expected:
    raise ValueError(f"eval.best_of_n has keys {sorted(settings.keys())}; expected "
                     f"{sorted(expected)}.")
  check_ns(settings.ns)
  for key in ("batch_size", "num_examples"):
    if isinstance(settings[key], bool) or not isinstance(settings[key], int) or settings[key] < 1:
      raise ValueError(f"eval.best_of_n.{key}={settings[key]!r} must be an integer >= 1.")
  if (isinstance(settings.train_prompts, bool) or not isinstance(settings.train_prompts, int)
      or settings.train_prompts < 0):
    raise ValueError(f"eval.best_of_n.train_prompts={settings.train_prompts!r} must be an "
                     "integer >= 0.")
  return settings


def enabled(config: ml_collections.ConfigDict) -> bool:
  """Whether `config` asks for a best-of-N eval (non-empty eval.best_of_n.ns)."""
  return bool(_settings(config).ns)


def base_task(config: ml_collections.ConfigDict) -> tasks_lib.Task:
  """The task whose prompts are evaluated: `config.data`, or its base for "sharpened" data."""
  data = config.data.base if config.data.name == "sharpened" else config.data
  return tasks_lib.get_task(data)


# Models with the same config behave the same: sharing one object lets the jitted sampler and
# scorer (static in the model, hashed by identity) compile once for a base and its sharpened
# copy, and across calls.
_MODELS: dict[str, Any] = {}


def _load(source: str, mesh: Mesh) -> tuple[Any, Any]:
  """`pretrained.load`, with one model object per distinct model config."""
  from jaxsi import pretrained  # pylint: disable=g-import-not-at-top  (heavy: orbax)

  lm, params = pretrained.load(source, mesh=mesh)
  key = type(lm).__name__ + json.dumps(lm.config.to_dict(), sort_keys=True, default=str)
  return _MODELS.setdefault(key, lm), params


def run(config: ml_collections.ConfigDict, source: str, *, base_source: str | None = None,
        mesh: Mesh | None = None) -> dict[str, float]:
  """The best-of-N eval of a saved model with the settings of `config.eval.best_of_n`.

  Held-out: the first `num_examples` eval examples, all metrics. Training prompts (when
  `train_prompts` > 0): the first ones of the generate stage's order, with one sample per
  prompt (greedy, sampled and likelihood metrics). Samples use `config.seed`.

  Args:
    config: the run's config (data, eval.best_of_n, mesh, seed; the sharpening objective's
      generate.chunk_size orders the training prompts when present).
    source: the model, a jaxsi workdir or a Hugging Face checkpoint.
    base_source: the base model, to report log π_base of the greedy answers; None: skip.
    mesh: where to run (default: the config's mesh).

  Returns:
    `{"bon/<metric>": ..., "bon_train/<metric>": ...}` (callers add their own prefix).
  """
  from jaxsi import mesh as mesh_lib  # pylint: disable=g-import-not-at-top

  settings = _settings(config)
  mesh = mesh_lib.build_mesh(config.mesh) if mesh is None else mesh
  task = base_task(config)
  lm, params = _load(source, mesh)
  base = None
  if base_source is not None:
    base = (lm, params) if base_source == source else _load(base_source, mesh)
  knobs = dict(mesh=mesh, temperature=float(settings.temperature),
               batch_size=int(settings.batch_size), seed=int(config.seed), base=base)
  held_out = task.eval_examples(int(settings.num_examples))
  metrics = {f"bon/{k}": v for k, v in evaluate(lm, params, task, held_out, ns=settings.ns,
                                                **knobs).items()}
  if settings.train_prompts:
    objective = config.objective
    chunk = (int(objective.generate.chunk_size) if objective.name == "sharpening"
             else int(settings.train_prompts))
    examples = train_examples(task, int(settings.train_prompts), chunk)
    metrics.update({f"bon_train/{k}": v
                    for k, v in evaluate(lm, params, task, examples, ns=(1,), **knobs).items()})
  return metrics
