"""Multi-stage runs: train the missing prerequisites, then the main stage.

A config with a `pipeline` section describes the stages a distillation needs when no
trained models are given (`pipeline.teacher_init_from` / `student_init_from` let those SFT
stages start from pretrained checkpoints, e.g. hub T5s, instead of a random init):

  WORKDIR/teacher/      SFT of `config.teacher.model`      (when teacher.source is empty)
  WORKDIR/student_sft/  SFT of `config.model`              (when init_from is empty)
  WORKDIR/              the main objective, from those two

A stage whose workdir already holds its final checkpoint is reused, a partly trained one
resumes, so rerunning the same command after an interruption continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections

from jaxsi import pretrained
from jaxsi import trainer
from jaxsi.objectives import sft


@dataclasses.dataclass
class Stage:
  """One training run of a pipeline."""

  name: str
  config: ml_collections.ConfigDict
  workdir: str


def _sft_stage(config: ml_collections.ConfigDict, model: ml_collections.ConfigDict, steps: int,
               lr: float, init_from: str) -> ml_collections.ConfigDict:
  """The main config turned into an SFT run of `model` for `steps` steps from `init_from`."""
  stage = ml_collections.ConfigDict(config.to_dict())  # a plain, unlocked copy
  stage.model = ml_collections.ConfigDict(model.to_dict())
  stage.objective = sft.default_objective_config()
  stage.init_from = init_from
  stage.train.steps = steps
  stage.optim.total_steps = steps
  stage.optim.lr = lr
  del stage["pipeline"]
  if "teacher" in stage:
    del stage["teacher"]
  stage.lock()
  return stage


def stages(config: ml_collections.ConfigDict, workdir: str) -> list[Stage]:
  """The stages of `config` in order; the last one is the main objective."""
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
  """Whether the stage's workdir holds its final checkpoint."""
  if not pretrained.is_workdir(stage.workdir):
    return False
  try:
    step, _ = pretrained.stored_config(stage.workdir)
  except FileNotFoundError:
    return False
  return step >= stage.config.train.steps


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Runs the stages in order, reusing finished ones. Returns the main stage's metrics."""
  trainer.check_workdir(workdir)
  all_stages = stages(config, workdir)
  metrics: dict[str, float] = {}
  for index, stage in enumerate(all_stages, 1):
    is_main_stage = index == len(all_stages)
    if not is_main_stage and finished(stage):
      if jax.process_index() == 0:
        print(f"[{index}/{len(all_stages)}] {stage.name}: finished in {stage.workdir}, reusing it")
      continue
    if jax.process_index() == 0:
      print(f"[{index}/{len(all_stages)}] {stage.name}: {stage.config.objective.name} for "
            f"{stage.config.train.steps} steps -> {stage.workdir}")
    metrics = trainer.train(stage.config, stage.workdir)
  return metrics
