"""Command line: compare GKD and its baselines from one SFT'd student, over several seeds.

  python -m jaxsi.tools.gkd_sweep --config=configs/arithmetic_gkd.py --workdir=runs/gkd_sweep \
      --seeds=0,1,2 [--methods=sft,supervised_kd,...] [--config.KEY=VALUE ...]

The teacher and the student's SFT start are trained once (the config's pipeline stages, or
taken from teacher.source / init_from); every method then continues from that same student
for the config's number of steps, once per seed (the seed drives the lambda coin, sampling and
dropout). Each run evaluates greedy and temperature-1 accuracy. Results go to
WORKDIR/results.json and WORKDIR/results.md (a table of mean ± sample std over seeds).
"""

from __future__ import annotations

import os
import statistics
import sys
from typing import Sequence

# name -> objective overrides; the order is the table's.
METHODS: dict[str, dict[str, object]] = {
    "sft": {"preset": "sft"},
    "supervised_kd": {"preset": "supervised_kd"},
    "mixed_fkl": {"preset": "", "lam": 0.5, "divergence": "forward_kl"},
    "on_policy_fkl": {"preset": "", "lam": 1.0, "divergence": "forward_kl"},
    "on_policy_rkl": {"preset": "", "lam": 1.0, "divergence": "reverse_kl"},
    "on_policy_jsd0.1": {"preset": "", "lam": 1.0, "divergence": "jsd", "beta": 0.1},
    "on_policy_jsd0.5": {"preset": "", "lam": 1.0, "divergence": "jsd", "beta": 0.5},
    "on_policy_jsd0.9": {"preset": "", "lam": 1.0, "divergence": "jsd", "beta": 0.9},
}
DESCRIPTIONS = {
    "sft": "continued SFT (NLL on dataset answers)",
    "supervised_kd": "supervised KD (λ = 0, forward KL)",
    "mixed_fkl": "mixed (λ = 0.5, forward KL)",
    "on_policy_fkl": "on-policy GKD (λ = 1, forward KL)",
    "on_policy_rkl": "on-policy GKD (λ = 1, reverse KL)",
    "on_policy_jsd0.1": "on-policy GKD (λ = 1, JSD 0.1)",
    "on_policy_jsd0.5": "on-policy GKD (λ = 1, JSD 0.5)",
    "on_policy_jsd0.9": "on-policy GKD (λ = 1, JSD 0.9)",
}
METRICS = ("eval/accuracy", "eval/accuracy_t1")


def method_config(config, method: str, seed: int, teacher: str, student: str):
  """The main config turned into one method's run from the shared teacher and student."""
  import ml_collections
  run = ml_collections.ConfigDict(config.to_dict())
  for key, value in METHODS[method].items():
    run.objective[key] = value
  run.seed = seed
  run.teacher.source = teacher
  run.init_from = student
  run.eval.temperatures = (0.0, 1.0)
  run.train.eval_every = 0
  del run["pipeline"]
  run.lock()
  return run


def summarize(values: Sequence[float]) -> tuple[float, float]:
  """(mean, sample standard deviation; 0 for one value)."""
  values = list(values)
  return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def markdown_table(results: dict) -> str:
  """The results as a Markdown table of mean ± std over seeds, in percent."""
  lines = ["| model / method | greedy accuracy (%) | temperature-1 accuracy (%) | seeds |",
           "|---|---|---|---|"]
  for name, row in results["rows"].items():
    cells = []
    for metric in METRICS:
      mean, std = summarize(row[metric])
      cells.append(f"{100 * mean:.1f} ± {100 * std:.1f}")
    label = DESCRIPTIONS.get(name, name)
    lines.append(f"| {label} | {cells[0]} | {cells[1]} | {len(row[METRICS[0]])} |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  from jaxsi.tools import sweep_cli
  parser = sweep_cli.parser("python -m jaxsi.tools.gkd_sweep", "methods", METHODS)
  args, overrides, methods, seeds = sweep_cli.parse(parser, argv, "methods", METHODS)

  from jaxsi import mesh as mesh_lib
  from jaxsi import pipeline
  from jaxsi import trainer
  mesh_lib.maybe_initialize_distributed()
  config = sweep_cli.load_config(args.config, overrides)
  if config is None:
    return 2

  stages = pipeline.stages(config, args.workdir)
  for stage in stages[:-1]:
    if not pipeline.finished(stage):
      print(f"{stage.name}: training -> {stage.workdir}", flush=True)
      trainer.train(stage.config, stage.workdir)
  main_stage = stages[-1].config
  teacher, student = main_stage.teacher.source, main_stage.init_from

  results = {"config": args.config, "overrides": overrides, "seeds": seeds, "rows": {}}
  for label, source in (("teacher", teacher), ("student (SFT start)", student)):
    eval_config = ml_config_with_temperatures(source)
    metrics = trainer.evaluate_only(eval_config, source)
    results["rows"][label] = {m: [metrics[m]] for m in METRICS}
  for method in methods:
    row = {m: [] for m in METRICS}
    for seed in seeds:
      workdir = os.path.join(args.workdir, method, f"seed{seed}")
      print(f"{method} seed {seed} -> {workdir}", flush=True)
      metrics = trainer.train(method_config(main_stage, method, seed, teacher, student), workdir)
      for m in METRICS:
        row[m].append(metrics[m])
    results["rows"][method] = row
  sweep_cli.write_results(args.workdir, results, markdown_table(results))
  return 0


def ml_config_with_temperatures(workdir: str):
  """A finished run's stored config, set to evaluate greedy and temperature-1 accuracy."""
  from jaxsi import pretrained
  _, config = pretrained.stored_config(workdir)
  config.eval.temperatures = (0.0, 1.0)
  config.lock()
  return config


if __name__ == "__main__":
  sys.exit(main())
