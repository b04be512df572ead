"""Command line: python -m jaxsi.train --config=configs/NAME.py[:variant] --workdir=DIR [--config.k=v ...].

Modes: `train` (default; resumes automatically when WORKDIR holds a checkpoint) and `eval`
(restores the latest checkpoint and runs the eval set).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

USAGE = ("python -m jaxsi.train --config=configs/NAME.py[:variant] --workdir=DIR "
         "[--mode=train|eval] [--config.KEY=VALUE ...]")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[tuple[str, str]]]:
  """Splits argv into known flags and `--config.KEY=VALUE` overrides (in order)."""
  parser = argparse.ArgumentParser(prog="python -m jaxsi.train", usage=USAGE)
  parser.add_argument("--config", required=True, help="config file, optionally with :variant")
  parser.add_argument("--workdir", required=True, help="run directory (local path or gs://...)")
  parser.add_argument("--mode", default="train", choices=("train", "eval"))
  parser.add_argument("--print_config", action="store_true", help="print the resolved config and exit")
  parser.add_argument("--log_level", default="WARNING")
  from jaxsi.config import ConfigError, split_overrides  # light: no jax import
  try:
    rest, overrides = split_overrides(argv)
  except ConfigError as e:
    parser.error(str(e))
  return parser.parse_args(rest), overrides


def main(argv: list[str] | None = None) -> int:
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(message)s")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

  # Imports after flag parsing keep `--help` and flag errors fast.
  from jaxsi import config as config_lib
  from jaxsi import mesh as mesh_lib
  from jaxsi import trainer

  try:
    config = config_lib.load(args.config, overrides)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  mesh_lib.maybe_initialize_distributed()
  import jax
  if jax.process_index() == 0:
    print(f"jaxsi: {args.mode} {args.config} -> {args.workdir} on {jax.device_count()} "
          f"{jax.devices()[0].platform} device(s), {jax.process_count()} process(es)")
    if args.print_config:
      print(config_lib.to_json(config))
      return 0
  try:
    if args.mode == "eval":
      trainer.evaluate_only(config, args.workdir)
    else:
      if "pipeline" in config:
        from jaxsi import pipeline
        metrics = pipeline.run(config, args.workdir)
      else:
        metrics = trainer.train(config, args.workdir)
      if jax.process_index() == 0 and metrics:
        # best-of-N evals add ~100 eval/bon... keys; the pipeline prints their summary itself
        shown = {k: v for k, v in sorted(metrics.items())
                 if k.startswith(("eval/", "train/loss")) and not k.startswith("eval/bon")}
        print("done: " + ", ".join(f"{k}={v:.4f}" for k, v in shown.items()))
  except (config_lib.ConfigError, trainer.TrainingError, FileNotFoundError, ValueError) as e:
    # Bad input ends in one sentence; --log_level=DEBUG shows where it was raised.
    logging.debug("traceback", exc_info=True)
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
