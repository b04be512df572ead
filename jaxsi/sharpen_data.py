"""The generate stage of SFT-Sharpening: a best-of-N dataset under the self-reward, on disk.

For each of the first `num_prompts` training prompts, the best of N samples of the frozen base
model under r = log π_base(y|x) (`jaxsi.objectives.sharpening`). The SFT stage then trains on
the result through the "sharpened" task (`jaxsi.data.sharpened`).

Which prompts: prompt i is row i % C of `task.train_batch(i // C, C)` with C = `chunk_size`,
i.e. the task's train stream read in global batches of C, a pure function of i (whatever the
number of hosts). Chunk c holds prompts [c·C, min((c + 1)·C, num_prompts)) and is sampled with
the key fold_in(PRNGKey(seed), c) (adaptive N: fold_in of that key with the round), so a chunk's
rows never depend on which host made it or when.

Layout of the output directory (normally WORKDIR/sharpen_data; local or gs://):

  meta.json          the settings; a rerun with other settings fails instead of mixing data.
  chunk-000000.npz   the rows of chunk 0, and so on.

Resumable and sharded: host p of P makes chunks c with c % P == p and skips every chunk whose
file exists. A chunk is written to a hidden temporary name and renamed when complete, so a
file under the final name is always whole; a half-written chunk (an interrupted write leaves
only its temporary) is simply made again. Hosts need a shared filesystem for `read_dataset`.

Each row holds (arrays of one chunk file, R rows):
  index [R] int64            the prompt index i.
  prompt, prompt_mask [R, S] int32, left-padded as the task packs them.
  response, response_mask [R, T] int32, the selected response (T = max_new_tokens).
  score [R] float32          its self-reward (normalized when configured).
  log_likelihood [R] float32 its log π_base(y|x).
  length [R] int32, truncated [R] bool.
  num_samples [R] int32      N (varies per prompt with adaptive N).
  seed [R] int64             the run seed (the chunk's key is derived from it as above).
  sample_score, sample_log_likelihood, sample_length, sample_truncated [R] float32: means
                             over the prompt's N samples (the "sampled" baseline metrics).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import uuid
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from etils import epath

from jaxsi.data import tasks as tasks_lib
from jaxsi.objectives import sharpening

DATA_DIRNAME = "sharpen_data"
META_FILE = "meta.json"
FORMAT_VERSION = 1
_ROW_KEYS = ("index", "prompt", "prompt_mask", "response", "response_mask", "score",
             "log_likelihood", "length", "truncated", "num_samples", "seed", "sample_score",
             "sample_log_likelihood", "sample_length", "sample_truncated")


@dataclasses.dataclass(frozen=True)
class GenerateSettings:
  """What the generate stage samples (all of it is recorded in meta.json).

  Attributes:
    num_prompts: how many prompts of the train stream (the first ones).
    chunk_size: C, prompts per sampler call and per shard file.
    n: N samples per prompt (adaptive: samples per round).
    max_new_tokens: T, the sample length.
    temperature, top_k, top_p: sampling knobs.
    normalize: length-normalized self-reward.
    drop_truncated: rank truncated samples last.
    seed: the key of chunk c is fold_in(PRNGKey(seed), c).
    adaptive: per-prompt N (see `sharpening.adaptive_best_of_n`) with adaptive_k,
      adaptive_delta and the cap adaptive_n_max.
  """
  num_prompts: int
  chunk_size: int
  n: int
  max_new_tokens: int
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  normalize: bool = False
  drop_truncated: bool = False
  seed: int = 0
  adaptive: bool = False
  adaptive_k: float = 10.0
  adaptive_delta: float = 0.1
  adaptive_n_max: int = 64

  def __post_init__(self):
    for key in ("num_prompts", "chunk_size", "n", "max_new_tokens"):
      value = getattr(self, key)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"Sharpen-data {key}={value!r} must be an integer >= 1.")
    if not self.temperature > 0:
      raise ValueError(f"Sharpen-data temperature={self.temperature!r} must be > 0.")
    if self.adaptive:
      sharpening.check_adaptive(self.adaptive_k, self.adaptive_delta, self.adaptive_n_max)

  @property
  def num_chunks(self) -> int:
    return math.ceil(self.num_prompts / self.chunk_size)


def settings_from_config(objective_cfg: ml_collections.ConfigDict, *, seed: int,
                         response_width: int) -> GenerateSettings:
  """The settings a sharpening objective config asks for (max_new_tokens None = the width)."""
  sharpening.validate(objective_cfg)
  cfg = objective_cfg
  return GenerateSettings(
      num_prompts=int(cfg.generate.num_prompts), chunk_size=int(cfg.generate.chunk_size),
      n=int(cfg.n),
      max_new_tokens=int(response_width if cfg.max_new_tokens is None else cfg.max_new_tokens),
      temperature=float(cfg.temperature), top_k=int(cfg.top_k), top_p=float(cfg.top_p),
      normalize=bool(cfg.normalize), drop_truncated=bool(cfg.drop_truncated), seed=int(seed),
      adaptive=bool(cfg.adaptive_n.enabled), adaptive_k=float(cfg.adaptive_n.k),
      adaptive_delta=float(cfg.adaptive_n.delta), adaptive_n_max=int(cfg.adaptive_n.n_max))


def chunk_path(directory: str | os.PathLike, chunk: int) -> epath.Path:
  """The final file of chunk `chunk`."""
  return epath.Path(directory) / f"chunk-{chunk:06d}.npz"


def _write_atomic(path: epath.Path, data: bytes, *, clean_stale: bool = True) -> None:
  """Writes under a hidden temporary name, then renames: `path` is whole or absent.

  `clean_stale` first deletes temporaries of earlier interrupted attempts; only for files a
  single host writes (chunks), never for meta.json, which every host may write at once.
  """
  if clean_stale:
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
      stale.unlink()
  temporary = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
  temporary.write_bytes(data)
  temporary.rename(path)


def _meta(settings: GenerateSettings, task: tasks_lib.Task, extra: dict[str, Any]) -> dict:
  return {"format": FORMAT_VERSION, "settings": dataclasses.asdict(settings), "task": task.name,
          "prompt_width": int(task.max_prompt_len), "eos_id": int(task.tokenizer.eos_id),
          "pad_id": int(task.tokenizer.pad_id), **extra}


def _check_or_write_meta(directory: epath.Path, meta: dict) -> None:
  """Writes meta.json, or checks that an existing one describes the same dataset."""
  path = directory / META_FILE
  if path.exists():
    stored = json.loads(path.read_text())
    flat = lambda m: {**{k: v for k, v in m.items() if k != "settings"}, **m.get("settings", {})}
    old, new = flat(stored), flat(meta)
    for key in sorted(set(old) | set(new)):
      if old.get(key) != new.get(key):
        raise ValueError(f"{directory} already holds a sharpen dataset made with {key}="
                         f"{old.get(key)!r}, but this run asks for {key}={new.get(key)!r}; "
                         "use another directory or the original settings.")
    return
  _write_atomic(path, json.dumps(meta, indent=2, sort_keys=True).encode(), clean_stale=False)


def read_meta(directory: str | os.PathLike) -> dict:
  """The meta.json of a sharpen dataset directory."""
  path = epath.Path(directory) / META_FILE
  if not path.exists():
    raise FileNotFoundError(f"{directory} holds no sharpen dataset ({META_FILE} is missing); "
                            "run the generate stage first or point to WORKDIR/sharpen_data.")
  return json.loads(path.read_text())


def missing_chunks(directory: str | os.PathLike) -> list[int]:
  """The chunks of the dataset in `directory` that are not written yet."""
  meta = read_meta(directory)
  num_chunks = GenerateSettings(**meta["settings"]).num_chunks
  return [c for c in range(num_chunks) if not chunk_path(directory, c).exists()]


def is_complete(directory: str | os.PathLike) -> bool:
  """Whether `directory` holds a finished dataset (meta and every chunk)."""
  try:
    return not missing_chunks(directory)
  except FileNotFoundError:
    return False


def _per_prompt_means(values_BxN: np.ndarray, valid_BxN: np.ndarray) -> np.ndarray:
  values_BxN = np.asarray(values_BxN, np.float64)
  return ((values_BxN * valid_BxN).sum(axis=1) / valid_BxN.sum(axis=1)).astype(np.float32)


# Everything but the arrays is static (the model is hashed by identity), so jax's compile
# cache serves every chunk and every `generate` call with the same model and settings.
_STATIC = ("n", "max_new_tokens", "temperature", "top_k", "top_p", "eos_id", "pad_id",
           "normalize")
_score_samples_jit = jax.jit(sharpening.score_samples, static_argnums=0, static_argnames=_STATIC)
_best_of_n_jit = jax.jit(sharpening.best_of_n, static_argnums=0,
                         static_argnames=_STATIC + ("drop_truncated",))


def make_chunk_selector(lm: Any, settings: GenerateSettings, *, eos_id: int, pad_id: int
                        ) -> Callable[[Any, np.ndarray, np.ndarray, jax.Array], dict]:
  """`select(params, prompt, prompt_mask, rng) -> row arrays` (all but index/seed/prompt).

  Compiles the sampler once; fixed N calls `sharpening.best_of_n`, adaptive N runs
  `sharpening.adaptive_best_of_n` over `score_samples` rounds keyed fold_in(rng, round).
  """
  knobs = dict(n=settings.n, max_new_tokens=settings.max_new_tokens,
               temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
               eos_id=eos_id, pad_id=pad_id, normalize=settings.normalize)
  if settings.adaptive:

    def select(params, prompt, prompt_mask, rng):
      best = sharpening.adaptive_best_of_n(
          lambda i: _score_samples_jit(lm, params, prompt, prompt_mask,
                                       jax.random.fold_in(rng, i), **knobs),
          k=settings.adaptive_k, delta=settings.adaptive_delta, n_max=settings.adaptive_n_max,
          drop_truncated=settings.drop_truncated)
      return best, best.num_samples, best.log_likelihood
  else:

    def select(params, prompt, prompt_mask, rng):
      best = jax.device_get(_best_of_n_jit(lm, params, prompt, prompt_mask, rng,
                                           drop_truncated=settings.drop_truncated, **knobs))
      log_likelihood = np.take_along_axis(best.log_likelihoods, best.index[:, None], axis=1)[:, 0]
      return best, np.full(best.index.shape, settings.n), log_likelihood

  def rows(params, prompt, prompt_mask, rng) -> dict:
    best, num_samples, log_likelihood = select(params, prompt, prompt_mask, rng)
    valid = np.arange(best.scores.shape[1])[None, :] < np.asarray(num_samples)[:, None]
    return {"response": np.asarray(best.tokens, np.int32),
            "response_mask": np.asarray(best.mask, np.int32),
            "score": np.asarray(best.score, np.float32),
            "log_likelihood": np.asarray(log_likelihood, np.float32),
            "length": np.asarray(best.mask, np.int32).sum(axis=1).astype(np.int32),
            "truncated": np.asarray(best.truncated, bool),
            "num_samples": np.asarray(num_samples, np.int32),
            "sample_score": _per_prompt_means(best.scores, valid),
            "sample_log_likelihood": _per_prompt_means(best.log_likelihoods, valid),
            "sample_length": _per_prompt_means(best.lengths, valid),
            "sample_truncated": _per_prompt_means(best.all_truncated, valid)}

  return rows


def generate(task: tasks_lib.Task, lm: Any, params: Any, directory: str | os.PathLike,
             settings: GenerateSettings, *, process_index: int | None = None,
             process_count: int | None = None, meta_extra: dict[str, Any] | None = None,
             on_chunk_written: Callable[[int], None] | None = None) -> list[int]:
  """Makes this host's missing chunks of the best-of-N dataset (see the module docstring).

  Args:
    task: the base task; its train stream gives the prompts and its tokenizer EOS/PAD.
    lm, params: the frozen base model (params on this host's devices, e.g. from
      `jaxsi.pretrained.load(source)`).
    directory: the output directory (created if needed).
    settings: what to sample.
    process_index, process_count: this host and the host count (default: jax's); host p makes
      chunks c with c % process_count == p.
    meta_extra: more JSON values to record and check in meta.json (e.g. {"base": source}).
    on_chunk_written: called with the chunk index after each chunk file is in place.

  Returns:
    The chunks this call wrote (already existing ones are skipped).
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, {process_count}).")
  directory = epath.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  eos_id, pad_id = int(task.tokenizer.eos_id), int(task.tokenizer.pad_id)
  _check_or_write_meta(directory, _meta(settings, task, meta_extra or {}))
  select = None
  written = []
  base_rng = jax.random.PRNGKey(settings.seed)
  for chunk in range(process_index, settings.num_chunks, process_count):
    path = chunk_path(directory, chunk)
    if path.exists():
      continue
    if select is None:  # compile only when there is work left
      select = make_chunk_selector(lm, settings, eos_id=eos_id, pad_id=pad_id)
    first = chunk * settings.chunk_size
    count = min(settings.chunk_size, settings.num_prompts - first)
    batch = task.train_batch(chunk, settings.chunk_size)
    # The full chunk is sampled (one compiled shape) and the rows past num_prompts dropped.
    rows = select(params, batch["prompt"], batch["prompt_mask"],
                  jax.random.fold_in(base_rng, chunk))
    rows.update(index=np.arange(first, first + settings.chunk_size, dtype=np.int64),
                prompt=np.asarray(batch["prompt"], np.int32),
                prompt_mask=np.asarray(batch["prompt_mask"], np.int32),
                seed=np.full((settings.chunk_size,), settings.seed, np.int64))
    buffer = io.BytesIO()
    np.savez(buffer, **{key: rows[key][:count] for key in _ROW_KEYS})
    _write_atomic(path, buffer.getvalue())
    written.append(chunk)
    logging.info("sharpen_data: wrote chunk %d/%d (%d prompts) to %s", chunk + 1,
                 settings.num_chunks, count, path)
    if on_chunk_written is not None:
      on_chunk_written(chunk)
  return written


def read_dataset(directory: str | os.PathLike) -> dict[str, np.ndarray]:
  """Every row of a finished dataset, ordered by prompt index (see the module docstring).

  Raises:
    FileNotFoundError: no meta.json, or chunks are missing (named).
  """
  missing = missing_chunks(directory)
  if missing:
    shown = ", ".join(str(c) for c in missing[:5]) + (", ..." if len(missing) > 5 else "")
    raise FileNotFoundError(f"The sharpen dataset in {directory} lacks {len(missing)} chunk(s) "
                            f"({shown}); rerun the generate stage to finish it.")
  meta = read_meta(directory)
  parts = []
  for chunk in range(GenerateSettings(**meta["settings"]).num_chunks):
    with np.load(io.BytesIO(chunk_path(directory, chunk).read_bytes())) as arrays:
      parts.append({key: arrays[key] for key in _ROW_KEYS})
  data = {key: np.concatenate([part[key] for part in parts]) for key in _ROW_KEYS}
  order = np.argsort(data["index"], kind="stable")
  data = {key: value[order] for key, value in data.items()}
  expected = np.arange(meta["settings"]["num_prompts"])
  if not np.array_equal(data["index"], expected):
    raise ValueError(f"The sharpen dataset in {directory} does not hold prompts 0 .. "
                     f"{len(expected) - 1} exactly once; delete it and generate it again.")
  return data


def dataset_stats(data: dict[str, np.ndarray]) -> dict[str, float]:
  """The spec's dataset metrics: mean self-reward of selected vs sampled responses, etc."""
  return {"num_prompts": float(len(data["index"])),
          "bon_reward": float(data["score"].mean()),
          "sample_reward": float(data["sample_score"].mean()),
          "bon_log_likelihood": float(data["log_likelihood"].mean()),
          "sample_log_likelihood": float(data["sample_log_likelihood"].mean()),
          "response_length": float(data["length"].mean()),
          "sample_length": float(data["sample_length"].mean()),
          "truncation_rate": float(data["truncated"].mean()),
          "sample_truncation_rate": float(data["sample_truncated"].mean()),
          "mean_num_samples": float(data["num_samples"].mean())}


def run_stage(config: ml_collections.ConfigDict, workdir: str, *, base_source: str
              ) -> dict[str, float]:
  """The pipeline's generate stage: WORKDIR/sharpen_data from `base_source`, on every host.

  Reads the prompts' task from `config.data` (or `config.data.base` when that is the
  "sharpened" task), the settings from `config.objective` (a sharpening config) and
  `config.seed`. Hosts split the chunks, then wait for each other, so every host returns only
  once the dataset is complete.

  Returns:
    `dataset_stats` of the finished dataset.
  """
  from jaxsi import pretrained  # pylint: disable=g-import-not-at-top  (heavy: orbax)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  data_config = config.data.base if config.data.name == "sharpened" else config.data
  task = tasks_lib.get_task(data_config)
  directory = epath.Path(workdir) / DATA_DIRNAME
  settings = settings_from_config(config.objective, seed=int(config.seed),
                                  response_width=task.max_response_len)
  meta_extra = {"base": str(base_source)}
  if is_complete(directory):
    _check_or_write_meta(directory, _meta(settings, task, meta_extra))  # same settings?
  else:
    lm, params = pretrained.load(base_source)
    generate(task, lm, params, directory, settings, meta_extra=meta_extra)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("jaxsi_sharpen_data")
  return dataset_stats(read_dataset(directory))
