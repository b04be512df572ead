"""Multi-stage runs: make the missing prerequisites, then the main stage.

A config with a `pipeline` section describes the stages its objective needs when no trained
models are given.

Distillation (GKD; `pipeline.teacher_init_from` / `student_init_from` let those SFT stages
start from pretrained checkpoints, e.g. hub T5s, instead of a random init):

  WORKDIR/teacher/      SFT of `config.teacher.model`      (when teacher.source is empty)
  WORKDIR/student_sft/  SFT of `config.model`              (when init_from is empty)
  WORKDIR/              the main objective, from those two

SFT-Sharpening (objective "sharpening", mode "sft", offline; spec/sharpening.md):

  WORKDIR/base/          SFT of `config.model` on the task for `pipeline.base_steps` steps
                         (when base.source and init_from are empty; from
                         `pipeline.base_init_from` or scratch)
  WORKDIR/sharpen_data/  generate: best-of-N of the base on the first training prompts
                         (`jaxsi.sharpen_data.run_stage`; skipped when data is "sharpened"
                         with a path already)
  WORKDIR/               sharpen: SFT from the base on the "sharpened" task (data.path =
                         WORKDIR/sharpen_data, data.base = the original data config); then,
                         when `eval.best_of_n.ns` is set, the best-of-N eval of the sharpened
                         model (and of the base, `with_base`) as `eval/bon...` rows of
                         WORKDIR/metrics.jsonl at the final step (`jaxsi.evals.best_of_n`)

The base model is `base.source` (or `init_from`): it is both the sampler/scorer of the
generate stage and the start of the sharpen stage's SFT. Modes "rlhf" and "xpo" and online
"sft" sample inside the training loop and have no generate stage: they run as one stage from
the base.

A stage whose workdir already holds its final checkpoint (a complete dataset for generate) is
reused, a partly made one resumes, so rerunning the same command after an interruption
continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections

from jaxsi import metrics_writer
from jaxsi import pretrained
from jaxsi import trainer
from jaxsi.objectives import sft

@dataclasses.dataclass
class Stage:
  """One step of a pipeline.

  Attributes:
    name: e.g. "teacher", "base", "generate", "sharpen".
    config: the locked config it runs with.
    workdir: its run directory (generate: the run whose sharpen_data/ it fills).
    kind: "train" (`trainer.train`) or "generate" (`jaxsi.sharpen_data.run_stage` from the
      base model `config.base.source`).
  """

  name: str
  config: ml_collections.ConfigDict
  workdir: str
  kind: str = "train"


def _sft_stage(config: ml_collections.ConfigDict, model: ml_collections.ConfigDict, steps: int,
               lr: float, init_from: str) -> ml_collections.ConfigDict:
  """The main config turned into an SFT run of `model` for `steps` steps from `init_from`."""
  stage = ml_collections.ConfigDict(config.to_dict())  # a plain, unlocked copy
  stage.model = ml_collections.ConfigDict(model.to_dict())
  stage.objective = sft.default_objective_config()
  # A large-vocabulary run's prerequisites need the chunked loss as much as its main stage.
  stage.objective.vocab_chunk_size = config.objective.get("vocab_chunk_size", 0)
  stage.init_from = init_from
  stage.train.steps = steps
  stage.optim.total_steps = steps
  stage.optim.lr = lr
  del stage["pipeline"]
  for section in ("teacher", "base"):
    if section in stage:
      del stage[section]
  if stage.data.name == "sharpened":  # the prerequisites train on the task itself
    stage.data = ml_collections.ConfigDict(stage.data.base.to_dict())
  if "best_of_n" in stage.eval:
    del stage.eval["best_of_n"]
  stage.lock()
  return stage


def is_sharpening(config: ml_collections.ConfigDict) -> bool:
  """Whether `config` trains a Sharpening objective (the base / generate / sharpen stages)."""
  return config.objective.get("name") == "sharpening"


def _generates_data(config: ml_collections.ConfigDict) -> bool:
  """Offline SFT-Sharpening: the SFT stage reads a dataset the generate stage makes."""
  objective = config.objective
  return objective.mode == "sft" and not objective.online


def _sharpening_stages(config: ml_collections.ConfigDict, workdir: str) -> list[Stage]:
  """base (when no base model is given), generate (offline SFT only), sharpen."""
  from jaxsi import sharpen_data  # pylint: disable=g-import-not-at-top  (imports the sampler)
  from jaxsi.data import sharpened  # pylint: disable=g-import-not-at-top

  if "base" not in config or "source" not in config.base:
    raise ValueError("A sharpening pipeline needs a `base` section with `source` (the base "
                     "model: a jaxsi run or Hugging Face checkpoint; empty: train one).")
  plan = config.pipeline
  out = []
  base_source = config.base.source or config.init_from
  if not base_source:
    if not plan.base_steps:
      raise ValueError("base.source and init_from are empty and pipeline.base_steps is 0: give "
                       "a base model (--config.base.source=...) or steps to train one.")
    base_dir = os.path.join(workdir, "base")
    out.append(Stage("base", _sft_stage(config, config.model, plan.base_steps, plan.base_lr,
                                        plan.get("base_init_from", "")), base_dir))
    base_source = base_dir
  main = ml_collections.ConfigDict(config.to_dict())
  main.base.source = base_source
  main.init_from = config.init_from or base_source
  # A "sharpened" data config with a path names a dataset made elsewhere: no generate stage.
  generate = _generates_data(config) and not (config.data.name == sharpened.NAME
                                               and config.data.path)
  if generate:
    if config.data.name == sharpened.NAME:
      data = ml_collections.ConfigDict(config.data.to_dict())
    else:
      data = sharpened.default_data_config()
      data.base = ml_collections.ConfigDict(config.data.to_dict())
      data.seed = config.seed
      data.drop_truncated = config.objective.drop_truncated
    data.path = os.path.join(workdir, sharpen_data.DATA_DIRNAME)
    main.data = data
  main.lock()
  if generate:
    out.append(Stage("generate", main, workdir, kind="generate"))
  out.append(Stage("sharpen", main, workdir))
  return out


def stages(config: ml_collections.ConfigDict, workdir: str) -> list[Stage]:
  """The stages of `config` in order; the last one is the main objective."""
  if is_sharpening(config):
    return _sharpening_stages(config, workdir)
  plan = config.pipeline
  out = []
  teacher_source = config.teacher.source
  if not teacher_source:
    if not plan.teacher_steps:
      raise ValueError("teacher.source is empty and pipeline.teacher_steps is 0: give a teacher "
                       "(--config.teacher.source=...) or steps to train one.")
    teacher_dir = os.path.join(workdir, "teacher")
    out.append(Stage("teacher", _sft_stage(config, config.teacher.model, plan.teacher_steps,
                                           plan.sft_lr, plan.get("teacher_init_from", "")),
                     teacher_dir))
    teacher_source = teacher_dir
  init_from = config.init_from
  if not init_from and plan.student_sft_steps:
    student_dir = os.path.join(workdir, "student_sft")
    out.append(Stage("student_sft", _sft_stage(config, config.model, plan.student_sft_steps,
                                               plan.sft_lr, plan.get("student_init_from", "")),
                     student_dir))
    init_from = student_dir
  main = ml_collections.ConfigDict(config.to_dict())
  main.teacher.source = teacher_source
  main.init_from = init_from
  main.lock()
  out.append(Stage("distill", main, workdir))
  return out


def finished(stage: Stage) -> bool:
  """Whether the stage's workdir holds its final checkpoint (generate: a complete dataset)."""
  if stage.kind == "generate":
    from jaxsi import sharpen_data  # pylint: disable=g-import-not-at-top
    return sharpen_data.is_complete(os.path.join(stage.workdir, sharpen_data.DATA_DIRNAME))
  if not pretrained.is_workdir(stage.workdir):
    return False
  try:
    step, _ = pretrained.stored_config(stage.workdir)
  except FileNotFoundError:
    return False
  return step >= stage.config.train.steps


def _generate(stage: Stage, announce: str) -> None:
  """Runs the generate stage (every host) and logs the dataset's metrics at step 0."""
  from jaxsi import sharpen_data  # pylint: disable=g-import-not-at-top

  fresh = not finished(stage)
  # Also when finished: run_stage then only checks that meta.json matches these settings.
  stats = sharpen_data.run_stage(stage.config, stage.workdir,
                                 base_source=stage.config.base.source)
  if jax.process_index() == 0:
    print(announce + " " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(stats.items())))
    if fresh:  # step 0 rows survive the SFT run's metrics.jsonl handling
      metrics_writer.MetricsWriter(stage.workdir).write(
          0, {f"sharpen_data/{k}": v for k, v in stats.items()})


def _best_of_n_eval(stage: Stage) -> dict[str, float]:
  """The best-of-N eval after the sharpen stage, logged at its final step (computed once)."""
  from jaxsi.evals import best_of_n  # pylint: disable=g-import-not-at-top

  config = stage.config
  if not best_of_n.enabled(config):
    return {}
  step = config.train.steps
  path = os.path.join(stage.workdir, "metrics.jsonl")
  if os.path.exists(path):  # a rerun of a finished pipeline reuses the logged values
    for row in metrics_writer.read(stage.workdir):
      if row.get("step") == step and any(k.startswith("eval/bon") for k in row):
        metrics = {k: float(v) for k, v in row.items() if k.startswith("eval/bon")}
        if jax.process_index() == 0:
          print(best_of_n_summary(metrics))
        return metrics
  base = config.base.source
  metrics = {f"eval/{k}": v for k, v in best_of_n.run(config, stage.workdir,
                                                      base_source=base).items()}
  if config.eval.best_of_n.with_base:
    metrics.update({f"eval/{k.replace('bon', 'bon_base', 1)}": v
                    for k, v in best_of_n.run(config, base, base_source=base).items()})
  if jax.process_index() == 0:
    metrics_writer.MetricsWriter(stage.workdir).write(step, metrics)
    print(best_of_n_summary(metrics))
  return metrics


def best_of_n_summary(metrics: dict[str, float]) -> str:
  """A few lines comparing the sharpened model with the base (the eval/bon... metrics)."""
  lines = []
  for label, prefix in (("sharpened", "eval/bon/"), ("base", "eval/bon_base/")):
    values = {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}
    if not values:
      continue
    bons = sorted((int(k[len("accuracy_bon"):]), v) for k, v in values.items()
                  if k.startswith("accuracy_bon") and not k.endswith("_norm"))
    shown = [f"greedy={values.get('accuracy_greedy', float('nan')):.3f}",
             f"sampled={values.get('accuracy_sampled', float('nan')):.3f}"]
    shown += [f"bon{n}={v:.3f}" for n, v in bons]
    shown.append(f"log p_base(greedy)={values.get('base_log_likelihood_greedy', float('nan')):.3f}")
    lines.append(f"best-of-N eval, {label}: " + ", ".join(shown))
  return "\n".join(lines)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Runs the stages in order, reusing finished ones. Returns the main stage's metrics.

  For SFT-Sharpening the returned metrics include the best-of-N eval's `eval/bon...` values.
  """
  trainer.check_workdir(workdir)
  all_stages = stages(config, workdir)
  metrics: dict[str, float] = {}
  for index, stage in enumerate(all_stages, 1):
    is_main_stage = index == len(all_stages)
    where = f"[{index}/{len(all_stages)}] {stage.name}:"
    if stage.kind == "generate":
      _generate(stage, where)
      continue
    if not is_main_stage and finished(stage):
      if jax.process_index() == 0:
        print(f"{where} finished in {stage.workdir}, reusing it")
      continue
    if jax.process_index() == 0:
      print(f"{where} {stage.config.objective.name} for {stage.config.train.steps} steps -> "
            f"{stage.workdir}")
    metrics = trainer.train(stage.config, stage.workdir)
    if is_main_stage and is_sharpening(stage.config):
      metrics = {**metrics, **_best_of_n_eval(stage)}
  return metrics
