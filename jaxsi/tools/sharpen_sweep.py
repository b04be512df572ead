"""Command line: reproduce Sharpening's two findings on arithmetic, over several seeds.

  python -m jaxsi.tools.sharpen_sweep --config=configs/arithmetic_sharpen.py \
      --workdir=runs/sharpen_sweep --seeds=0,1,2 [--variants=sum,norm] [--config.KEY=VALUE ...]

Per seed s (the seed drives the base's init, every sampler draw and the SFT order):

  WORKDIR/seed{s}/base/   the config's under-trained base (SFT for pipeline.base_steps steps),
                          or the given base.source, shared by the variants of the seed;
  WORKDIR/seed{s}/{v}/    for each variant v, the pipeline's generate and sharpen stages from
                          that base: "sum" selects best-of-N by log π_base(y|x), "norm" by its
                          per-token mean (objective.normalize); each ends with the best-of-N eval
                          (`jaxsi.evals.best_of_n`, settings from eval.best_of_n).

Results, mean ± sample std over seeds, in WORKDIR/results.json and WORKDIR/results.md:

  1. inference-time sharpening of the base: greedy and temperature-1 accuracy, best-of-N
     accuracy by likelihood (sum and length-normalized) and coverage (pass@N) for each N of
     eval.best_of_n.ns, from one draw of max(N) samples per prompt;
  2. SFT-Sharpening: greedy and temperature-1 accuracy and the mean log-likelihood of the
     greedy answers, under the base (the self-reward) and under the model itself, on held-out
     and on training prompts, for the base and each sharpened model.

Rerunning the same command reuses every finished stage and eval.
"""

from __future__ import annotations

import os
import statistics
import sys
from typing import Sequence

# variant -> objective overrides; the order is the table's.
VARIANTS: dict[str, dict[str, object]] = {
    "sum": {"normalize": False},
    "norm": {"normalize": True},
}
DESCRIPTIONS = {
    "base": "base (under-trained SFT)",
    "sum": "SFT-Sharpening, best-of-N by log π_base(y\\|x)",
    "norm": "SFT-Sharpening, best-of-N by log π_base(y\\|x) per token",
}
# (column title, metric of the best-of-N eval, scale) of the SFT-Sharpening table.
SFT_COLUMNS = (
    ("greedy acc. (%)", "bon/accuracy_greedy", 100.0),
    ("T=1 acc. (%)", "bon/accuracy_sampled", 100.0),
    ("greedy acc., train (%)", "bon_train/accuracy_greedy", 100.0),
    ("log π_base(ŷ) held-out", "bon/base_log_likelihood_greedy", 1.0),
    ("log π_base(ŷ) train", "bon_train/base_log_likelihood_greedy", 1.0),
    ("log π(ŷ) held-out", "bon/log_likelihood_greedy", 1.0),
    ("log π(ŷ) train", "bon_train/log_likelihood_greedy", 1.0),
)


def summarize(values: Sequence[float]) -> tuple[float, float]:
  """(mean, sample standard deviation; 0 for one value)."""
  values = list(values)
  return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _cell(values: Sequence[float], scale: float, digits: int) -> str:
  mean, std = summarize([scale * v for v in values])
  return f"{mean:.{digits}f} ± {std:.{digits}f}"


def variant_config(config, variant: str, seed: int, base_source: str, *, with_base: bool):
  """The main config turned into one variant's generate + sharpen run from a trained base."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  run = ml_collections.ConfigDict(config.to_dict())
  for key, value in VARIANTS[variant].items():
    run.objective[key] = value
  run.seed = seed
  run.base.source = base_source
  run.init_from = ""
  run.eval.best_of_n.with_base = with_base
  run.lock()
  return run


def collect(per_seed: dict[int, dict[str, dict[str, float]]], variants: Sequence[str]) -> dict:
  """{"base": {metric: [per seed]}, variant: {...}} from each seed's pipeline metrics.

  `per_seed[s][v]` holds the `eval/...` metrics of variant v's run; the base's come from the
  first variant's `eval/bon_base...` keys.
  """
  rows: dict[str, dict[str, list[float]]] = {}
  for seed in sorted(per_seed):
    runs = per_seed[seed]
    first = runs[variants[0]]
    base = {k.replace("eval/bon_base", "bon", 1): v for k, v in first.items()
            if k.startswith("eval/bon_base")}
    for name, metrics in [("base", base)] + [
        (v, {k[len("eval/"):]: x for k, x in runs[v].items()
             if k.startswith(("eval/bon/", "eval/bon_train/"))}) for v in variants]:
      for key, value in metrics.items():
        rows.setdefault(name, {}).setdefault(key, []).append(float(value))
  return rows


def markdown_tables(rows: dict, ns: Sequence[int], num_seeds: int) -> str:
  """Both result tables as Markdown (mean ± std over seeds)."""
  base = rows["base"]
  lines = [f"Inference-time sharpening of the base (held-out prompts, {num_seeds} seed(s)): "
           f"greedy {_cell(base['bon/accuracy_greedy'], 100, 1)} %, temperature-1 sampling "
           f"{_cell(base['bon/accuracy_sampled'], 100, 1)} %.", "",
           "| N | best-of-N, sum (%) | best-of-N, length-normalized (%) | coverage pass@N (%) "
           "| length of selected (sum / norm.) |",
           "|---|---|---|---|---|"]
  for n in ns:
    lengths = (f"{summarize(base[f'bon/length_bon{n}'])[0]:.2f} / "
               f"{summarize(base[f'bon/length_bon{n}_norm'])[0]:.2f}")
    lines.append(f"| {n} | {_cell(base[f'bon/accuracy_bon{n}'], 100, 1)} "
                 f"| {_cell(base[f'bon/accuracy_bon{n}_norm'], 100, 1)} "
                 f"| {_cell(base[f'bon/coverage{n}'], 100, 1)} | {lengths} |")
  lines += ["", f"SFT-Sharpening ({num_seeds} seed(s)); ŷ = the model's greedy answer, "
            "log-likelihoods in nats per answer:", "",
            "| model | " + " | ".join(title for title, _, _ in SFT_COLUMNS) + " |",
            "|---" * (len(SFT_COLUMNS) + 1) + "|"]
  for name, metrics in rows.items():
    cells = [(_cell(metrics[key], scale, 1 if scale == 100.0 else 3) if key in metrics else "—")
             for _, key, scale in SFT_COLUMNS]
    lines.append(f"| {DESCRIPTIONS.get(name, name)} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  from jaxsi import config as config_lib  # pylint: disable=g-import-not-at-top
  from jaxsi.tools import sweep_cli  # pylint: disable=g-import-not-at-top
  parser = sweep_cli.parser("python -m jaxsi.tools.sharpen_sweep", "variants", VARIANTS)
  args, overrides, variants, seeds = sweep_cli.parse(parser, argv, "variants", VARIANTS)

  from jaxsi import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from jaxsi import pipeline  # pylint: disable=g-import-not-at-top
  from jaxsi import trainer  # pylint: disable=g-import-not-at-top
  from jaxsi.evals import best_of_n  # pylint: disable=g-import-not-at-top
  mesh_lib.maybe_initialize_distributed()
  config = sweep_cli.load_config(args.config, overrides)
  if config is None:
    return 2
  if not pipeline.is_sharpening(config) or not best_of_n.enabled(config):
    print("error: the sweep needs a sharpening config with eval.best_of_n.ns set (e.g. "
          "configs/arithmetic_sharpen.py).", file=sys.stderr)
    return 2

  per_seed: dict[int, dict[str, dict[str, float]]] = {}
  for seed in seeds:
    seed_dir = os.path.join(args.workdir, f"seed{seed}")
    seeded = config_lib.load(args.config, [*overrides, ("seed", str(seed))])
    base_stages = [s for s in pipeline.stages(seeded, seed_dir) if s.name == "base"]
    for stage in base_stages:
      if not pipeline.finished(stage):
        print(f"seed {seed}: base -> {stage.workdir}", flush=True)
        trainer.train(stage.config, stage.workdir)
    base_source = base_stages[0].workdir if base_stages else (config.base.source
                                                              or config.init_from)
    per_seed[seed] = {}
    for index, variant in enumerate(variants):
      workdir = os.path.join(seed_dir, variant)
      print(f"seed {seed}: {variant} -> {workdir}", flush=True)
      run = variant_config(config, variant, seed, base_source, with_base=index == 0)
      per_seed[seed][variant] = pipeline.run(run, workdir)

  rows = collect(per_seed, variants)
  ns = best_of_n.check_ns(config.eval.best_of_n.ns)
  results = {"config": args.config, "overrides": overrides, "seeds": seeds,
             "variants": variants, "ns": list(ns), "rows": rows}
  sweep_cli.write_results(args.workdir, results, markdown_tables(rows, ns, len(seeds)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
