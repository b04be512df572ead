"""Command line: MLE, BC and SequenceMatch across noise levels, over several seeds.

  python -m jaxsi.tools.sm_sweep --config=configs/arithmetic_sm.py --workdir=runs/sm_sweep \
      --seeds=0,1,2 [--noise=0,0.1,0.2] [--methods=mle,bc,sm] [--config.KEY=VALUE ...]
  python -m jaxsi.tools.sm_sweep --config=configs/owt_sm.py:small --workdir=runs/sm_text ...

Every arm trains the config's model on the config's data with its optimizer, steps, batch and
evals (greedy and temperature 1); only the objective differs:

  mle          MLE without backspace: the SFT objective (NLL of the data responses, per-sequence
               mean) on a model that has no <bksp> action; evals decode plainly.
  bc_noise{p}  BC: the SequenceMatch objective with noise_prob=p and bc_steps = train.steps, so
               β = 1 throughout: weighted NLL of the noise-augmented action sequences (data
               rows only; the replay buffer is never filled). p = 0: MLE on the backspace
               layout, with the <bksp> row never a target.
  sm_noise{p}  SequenceMatch with noise_prob=p and the config's schedule: objective.bc_steps
               steps of BC, then β·L_BC + (1 − β)·L_SM on half data, half model samples.

Each arm runs once per seed s (the seed drives the init, the noise, sampling and dropout) in
WORKDIR/{arm}/seed{s}. An SM run's first bc_steps steps are BC steps on the same data,
noise and seed as the BC run of its noise level, so when both arms run, the SM run continues
from a copy of the BC run's checkpoint at step bc_steps instead of recomputing them (the
paired runs then differ only in the SM phase).

Results, mean ± sample std over seeds, go to WORKDIR/results.json and WORKDIR/results.md:
exact-match accuracy (%) for the arithmetic task; distinct-n and repetition rates of the
generations (`jaxsi.evals.metrics`) for the text continuation task, with the held-out
continuations of the data as a reference row. Each run's CPU time (`time.process_time`, all
threads) is stored with it in WORKDIR/{arm}/seed{s}/sweep.json (a segment cut short by an
interruption is not counted); the table reports their sum.
Rerunning the same command reuses every finished run without recomputing it. The runs share a
persistent JAX compilation cache (WORKDIR/compilation_cache): runs of one arm compile the same
programs, so only the first seed pays for most compiles.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from typing import Any, Sequence

from jaxsi.tools import gkd_sweep

METHODS = ("mle", "bc", "sm")
RUN_FILE = "sweep.json"
ACCURACY = ("eval/accuracy", "eval/accuracy_t1")
# (column title, metric) of the text tables; each table is one decoding temperature.
TEXT_COLUMNS = (("distinct-1", "distinct_1"), ("distinct-2", "distinct_2"),
                ("distinct-3", "distinct_3"), ("distinct-4", "distinct_4"),
                ("rep-1", "rep_1"), ("rep-2", "rep_2"), ("rep-4", "rep_4"),
                ("words", "mean_words"))
TEXT_TASK = "text_continuation"


def arms(methods: Sequence[str], noises: Sequence[float]) -> list[tuple[str, str, float]]:
  """(arm name, method, noise_prob) in table order: mle, then bc and sm at each noise level."""
  out = [("mle", "mle", 0.0)] if "mle" in methods else []
  for method in ("bc", "sm"):
    if method in methods:
      out += [(f"{method}_noise{noise:g}", method, noise) for noise in noises]
  return out


def describe(arm: str) -> str:
  """The table label of an arm name."""
  if arm == "mle":
    return "MLE, no backspace (SFT)"
  method, _, noise = arm.partition("_noise")
  return f"{'BC' if method == 'bc' else 'SequenceMatch'}, noise {noise}"


def arm_config(config, method: str, noise: float, seed: int):
  """The main (SequenceMatch) config turned into one arm's run."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from jaxsi.objectives import sft  # pylint: disable=g-import-not-at-top
  run = ml_collections.ConfigDict(config.to_dict())
  if method == "mle":
    run.objective = sft.default_objective_config()
  else:
    run.objective.noise_prob = float(noise)
    if method == "bc":
      run.objective.bc_steps = max(int(run.train.steps), int(run.objective.bc_steps))
  run.seed = seed
  run.eval.temperatures = (0.0, 1.0)
  run.train.eval_every = 0
  run.lock()
  return run


def _first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
  """The first dotted key where two JSON-like trees differ (None when equal)."""
  if isinstance(a, dict) and isinstance(b, dict):
    for key in sorted(set(a) | set(b)):
      found = _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
      if found:
        return found
    return None
  return None if a == b else prefix.rstrip(".")


def _read_record(workdir: str) -> dict:
  path = os.path.join(workdir, RUN_FILE)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _write_record(workdir: str, record: dict) -> None:
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, RUN_FILE)
  with open(path + ".tmp", "w") as f:
    json.dump(record, f, indent=2)
  os.replace(path + ".tmp", path)


def _latest_step(workdir: str) -> int | None:
  from jaxsi import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return None
  checkpointer = checkpoint_lib.Checkpointer(directory)
  try:
    return checkpointer.latest_step()
  finally:
    checkpointer.close()


def _train(run, workdir: str, *, stop_at: int | None = None) -> dict:
  """Trains (or continues) one run, adding its CPU time to WORKDIR/sweep.json.

  A run whose record says it finished is returned as it is (its config must be `run`'s).

  Returns the run's record: {"config", "cpu_seconds", "wall_seconds", "finished",
  "metrics" (final, when finished), "forked_from" (optional)}.
  """
  from jaxsi import trainer  # pylint: disable=g-import-not-at-top
  config_dict = json.loads(json.dumps(run.to_dict(), default=str))
  record = _read_record(workdir)
  if "config" in record:
    different = _first_difference(record["config"], config_dict)
    if different:
      raise ValueError(f"{workdir} holds a run with a different config (first difference: "
                       f"{different}); pass a fresh --workdir or remove that run.")
    if record.get("finished"):
      return record
  record = {"config": config_dict, "cpu_seconds": 0.0, "wall_seconds": 0.0,
            "finished": False, **{k: v for k, v in record.items() if k != "config"}}
  cpu, wall = time.process_time(), time.perf_counter()
  metrics = trainer.train(run, workdir, stop_at=stop_at)
  record["cpu_seconds"] += time.process_time() - cpu
  record["wall_seconds"] += time.perf_counter() - wall
  if stop_at is None:
    record.update(finished=True, metrics=metrics)
  _write_record(workdir, record)
  return record


def _fork(source: str, step: int, target: str) -> bool:
  """Copies `source`'s checkpoint at `step` into `target` (a run without checkpoints)."""
  checkpoint = os.path.join(source, "checkpoints", str(step))
  if _latest_step(target) is not None or not os.path.isdir(checkpoint):
    return False
  shutil.copytree(checkpoint, os.path.join(target, "checkpoints", str(step)))
  if os.path.exists(os.path.join(source, "metrics.jsonl")):
    shutil.copy(os.path.join(source, "metrics.jsonl"), os.path.join(target, "metrics.jsonl"))
  return True


def prepare_forks(config, arm_list: Sequence[tuple[str, str, float]], seed: int,
                  workdir: str) -> None:
  """Trains each BC run of the seed to the SM runs' bc_steps and forks the SM runs there.

  An SM run that already has a checkpoint, or whose BC run is past bc_steps without a
  checkpoint there, is left alone (it then trains its BC steps itself).
  """
  names = {name for name, _, _ in arm_list}
  for name, method, noise in arm_list:
    bc_name = f"bc_noise{noise:g}"
    if method != "sm" or bc_name not in names:
      continue
    bc_steps = int(arm_config(config, "sm", noise, seed).objective.bc_steps)
    bc_dir = os.path.join(workdir, bc_name, f"seed{seed}")
    sm_dir = os.path.join(workdir, name, f"seed{seed}")
    if not 0 < bc_steps < config.train.steps or _latest_step(sm_dir) is not None:
      continue
    latest = _latest_step(bc_dir)
    if latest is None or latest < bc_steps:
      print(f"{bc_name} seed {seed} -> {bc_dir} (to step {bc_steps}, shared with {name})",
            flush=True)
      _train(arm_config(config, "bc", noise, seed), bc_dir, stop_at=bc_steps)
    if _fork(bc_dir, bc_steps, sm_dir):
      _write_record(sm_dir, {"forked_from": f"{bc_dir} at step {bc_steps}"})


def run_seed(config, arm_list: Sequence[tuple[str, str, float]], seed: int, workdir: str
             ) -> dict[str, dict]:
  """Runs (or reuses) every arm of one seed; returns {arm: its record}."""
  prepare_forks(config, arm_list, seed, workdir)
  records: dict[str, dict] = {}
  for name, method, noise in arm_list:
    run_dir = os.path.join(workdir, name, f"seed{seed}")
    forked_from = _read_record(run_dir).get("forked_from")
    print(f"{name} seed {seed} -> {run_dir}"
          + (f" (continues from {forked_from})" if forked_from else ""), flush=True)
    records[name] = _train(arm_config(config, method, noise, seed), run_dir)
    print(f"  {name} seed {seed}: {records[name]['cpu_seconds'] / 60:.2f} CPU-min", flush=True)
  return records


def _columns(task_name: str) -> list[str]:
  if task_name == TEXT_TASK:
    return [f"eval/{metric}{suffix}" for suffix in ("", "_t1") for _, metric in TEXT_COLUMNS]
  return list(ACCURACY)


def collect(per_seed: dict[int, dict[str, dict]], columns: Sequence[str]) -> dict:
  """{arm: {metric: [value per seed]}} from the runs' final metrics."""
  rows: dict[str, dict[str, list[float]]] = {}
  for seed in sorted(per_seed):
    for name, record in per_seed[seed].items():
      for metric in columns:
        rows.setdefault(name, {}).setdefault(metric, []).append(float(record["metrics"][metric]))
  return rows


def reference_row(config) -> dict[str, list[float]]:
  """The text metrics of the held-out continuations themselves (the data's own diversity)."""
  from jaxsi.data import tasks  # pylint: disable=g-import-not-at-top
  task = tasks.get_task(config.data)
  examples = task.eval_examples(config.eval.num_examples)
  scores = task.score([example.target_text for example in examples], examples)
  return {f"eval/{key}{suffix}": [float(value)] for key, value in scores.items()
          for suffix in ("", "_t1")}


def _cell(values: Sequence[float], scale: float = 1.0, digits: int = 3) -> str:
  mean, std = gkd_sweep.summarize([scale * v for v in values])
  return f"{mean:.{digits}f} ± {std:.{digits}f}"


def text_tables(rows: dict) -> str:
  """The text results as two Markdown tables (temperature 1, then greedy)."""
  lines = []
  for title, suffix in (("temperature-1 sampling", "_t1"), ("greedy decoding", "")):
    lines += [f"Generations, {title}:", "",
              "| model / method | " + " | ".join(t for t, _ in TEXT_COLUMNS) + " | seeds |",
              "|---" * (len(TEXT_COLUMNS) + 2) + "|"]
    for name, metrics in rows.items():
      values = [metrics[f"eval/{key}{suffix}"] for _, key in TEXT_COLUMNS]
      digits = [1 if key == "mean_words" else 3 for _, key in TEXT_COLUMNS]
      if name == "data":  # one fixed set of texts: no seeds, no spread
        cells = [f"{v[0]:.{d}f}" for v, d in zip(values, digits)]
        lines.append("| data (held-out continuations) | " + " | ".join(cells) + " | — |")
      else:
        cells = [_cell(v, digits=d) for v, d in zip(values, digits)]
        lines.append(f"| {describe(name)} | " + " | ".join(cells) + f" | {len(values[0])} |")
    lines.append("")
  return "\n".join(lines).rstrip()


def markdown(results: dict) -> str:
  """The results table(s) and a CPU-time line as Markdown."""
  rows = results["rows"]
  if results["task"] == TEXT_TASK:
    table = text_tables(rows)
  else:
    table = gkd_sweep.markdown_table(
        {"rows": {describe(name): metrics for name, metrics in rows.items()}})
  cpu = results["cpu_minutes"]
  return (table + f"\n\nCPU time: {cpu['runs']:.1f} CPU-minutes for the {cpu['num_runs']} "
          f"runs (sum of each run's time.process_time).")


def main(argv: list[str] | None = None) -> int:
  from jaxsi.tools import sweep_cli  # pylint: disable=g-import-not-at-top
  parser = sweep_cli.parser("python -m jaxsi.tools.sm_sweep", "methods", METHODS)
  parser.add_argument("--noise", default="0,0.1,0.2",
                      help="noise_prob levels of the BC and SM arms (comma-separated)")
  parser.add_argument("--compilation_cache", default=None,
                      help="persistent JAX compilation cache directory shared by the runs "
                           "(default WORKDIR/compilation_cache; '' turns it off)")
  args, overrides, methods, seeds = sweep_cli.parse(parser, argv, "methods", METHODS)
  try:
    noises = [float(p) for p in args.noise.split(",") if p.strip()]
  except ValueError:
    parser.error(f"--noise={args.noise!r} is invalid; pass numbers like --noise=0,0.1,0.2.")
  if any(not 0 <= p < 1 for p in noises) or (not noises and methods != ["mle"]):
    parser.error(f"--noise={args.noise!r} needs levels in [0, 1), e.g. --noise=0,0.1,0.2.")

  import jax  # pylint: disable=g-import-not-at-top
  from jaxsi import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  cache = (os.path.join(args.workdir, "compilation_cache") if args.compilation_cache is None
           else args.compilation_cache)
  if cache:
    # The runs of an arm differ only in data (seeds, parameters), so they share executables.
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  mesh_lib.maybe_initialize_distributed()
  config = sweep_cli.load_config(args.config, overrides)
  if config is None:
    return 2
  if config.objective.name != "sequencematch":
    print(f"error: the sweep needs a SequenceMatch config (objective.name='sequencematch'), got "
          f"{config.objective.name!r}; e.g. configs/arithmetic_sm.py.", file=sys.stderr)
    return 2

  if "sm" in methods and config.objective.bc_steps >= config.train.steps:
    print(f"error: objective.bc_steps={config.objective.bc_steps} >= train.steps="
          f"{config.train.steps}: the SequenceMatch runs would be BC only; lower "
          "--config.objective.bc_steps.", file=sys.stderr)
    return 2
  arm_list = arms(methods, noises)
  per_seed = {}
  for seed in seeds:
    per_seed[seed] = run_seed(config, arm_list, seed, args.workdir)

  task_name = config.data.name
  rows = collect(per_seed, _columns(task_name))
  if task_name == TEXT_TASK:
    rows = {"data": reference_row(config), **rows}
  run_cpu = sum(r["cpu_seconds"] for runs in per_seed.values() for r in runs.values())
  results = {"config": args.config, "overrides": overrides, "seeds": seeds, "noise": noises,
             "task": task_name, "rows": rows,
             "cpu_minutes": {"runs": run_cpu / 60,
                             "num_runs": sum(len(runs) for runs in per_seed.values()),
                             "this_process": time.process_time() / 60}}
  sweep_cli.write_results(args.workdir, results, markdown(results))
  if jax.process_index() == 0:
    print(f"This invocation: {results['cpu_minutes']['this_process']:.1f} CPU-minutes "
          "(time.process_time, imports and reused runs included).")
  return 0


if __name__ == "__main__":
  sys.exit(main())
