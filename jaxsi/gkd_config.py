"""Building a T5 GKD experiment config on top of the task's SFT config.

The XSum, WMT and GSM8K GKD configs differ only in the task's SFT file, the hub ids, the
divergence and the schedule; everything else (teacher and pipeline sections, the paper's
batch and optimizer, the tiny CPU variant) is built here once.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import ml_collections

from jaxsi import config as config_lib
from jaxsi.objectives import gkd

T5_VARIANTS = ("t5_small", "t5_base", "t5_large", "tiny")


def _sft_config(sft_file: str, variant: str) -> ml_collections.ConfigDict:
  """The matching SFT run: the model, data, optimizer and eval the GKD run shares."""
  return config_lib.load_config_file(f"{sft_file}:{variant}")


def t5_distillation(sft_file: str, variant: str | None, *, teacher_id: str,
                    student_ids: Mapping[str, str], divergence: str, beta: float | None = None,
                    steps: int, warmup_steps: int, temperatures: Sequence[float],
                    best_metric: str, train_overrides: Mapping[str, int] | None = None
                    ) -> ml_collections.ConfigDict:
  """A GKD config: a T5-XL teacher distilled into the `variant` student of `sft_file`.

  Args:
    sft_file: path of the task's SFT config (its variants name the T5 sizes and "tiny").
    variant: the student size, one of T5_VARIANTS (None = "t5_small").
    teacher_id, student_ids: the default `teacher.source` and `init_from` (hub ids); replace
      them by SFT runs to reproduce the paper.
    divergence, beta: the objective's divergence (on-policy, λ = 1).
    steps, warmup_steps: Adafactor at 3e-4 with linear warmup, then constant.
    temperatures: eval decoding temperatures (0 = greedy).
    best_metric: the eval metric that ranks checkpoints.
    train_overrides: other `train.*` values (e.g. eval_every).
  """
  variant = variant or "t5_small"
  if variant not in T5_VARIANTS:
    name = os.path.basename(sft_file).replace("_sft", "_gkd")
    raise ValueError(f"Unknown variant {variant!r} of {name}; choose from "
                     f"{', '.join(T5_VARIANTS)}.")
  tiny = variant == "tiny"
  config = _sft_config(sft_file, variant)

  config.teacher = ml_collections.ConfigDict()
  config.teacher.source = "" if tiny else teacher_id
  # Read only when the pipeline trains the teacher (teacher.source empty).
  config.teacher.model = _sft_config(sft_file, "tiny" if tiny else "t5_xl").model
  config.init_from = "" if tiny else student_ids[variant]
  config.pipeline = ml_collections.ConfigDict({
      "teacher_steps": 0,
      "student_sft_steps": 0,
      "sft_lr": 3e-4,
      # With teacher.source="" and teacher_steps > 0, the teacher's SFT starts from this
      # checkpoint (e.g. the hub T5-XL); likewise student_init_from for the student's SFT.
      "teacher_init_from": "",
      "student_init_from": "",
  })

  config.objective = gkd.default_objective_config()
  config.objective.divergence = divergence
  if beta is not None:
    config.objective.beta = beta
  config.objective.lam = 1.0

  config.train.steps = steps           # optim.total_steps follows (a shared reference)
  config.train.batch_size = 32
  for key, value in (train_overrides or {}).items():
    config.train[key] = value
  config.optim.name = "adafactor"
  config.optim.lr = 3e-4
  config.optim.schedule = "constant"
  config.optim.warmup_steps = warmup_steps
  config.eval.temperatures = tuple(temperatures)
  config.checkpoint.best_metric = best_metric
  config.checkpoint.best_mode = "max"

  if tiny:
    # The teacher is the SFT file's tiny model; the student is smaller still.
    config.model.update(d_model=32, num_layers=1, num_decoder_layers=1, num_heads=2,
                        head_dim=16, d_ff=64)
    config.pipeline.update(teacher_steps=4, student_sft_steps=4, sft_lr=1e-3)
    config.train.steps = 4
    config.train.batch_size = 8
    config.train.log_every = 2
    config.train.eval_every = 0
    config.train.checkpoint_every = 2
    config.optim.warmup_steps = 1
    config.eval.num_examples = 8
    config.eval.batch_size = 8
  return config
