"""What every sweep tool's command line shares: its flags, loading the config, writing results.

  parser = sweep_cli.parser("python -m jaxsi.tools.gkd_sweep", "methods", METHODS)
  parser.add_argument(...)                     # the tool's own flags
  args, overrides, arms, seeds = sweep_cli.parse(parser, argv, "methods", METHODS)

  config = sweep_cli.load_config(args.config, overrides)   # None after printing the error
  ...
  sweep_cli.write_results(args.workdir, results, markdown_text)   # process 0 only

`--config.KEY=VALUE` overrides are split off first (`jaxsi.config.split_overrides`) and passed
to every run of the sweep. Bad values end the program through `parser.error` with one sentence.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence


def parser(prog: str, arms_flag: str, arms: Sequence[str]) -> argparse.ArgumentParser:
  """An ArgumentParser with --config, --workdir, --seeds (default 0,1,2) and --`arms_flag`."""
  result = argparse.ArgumentParser(prog=prog)
  result.add_argument("--config", required=True)
  result.add_argument("--workdir", required=True)
  result.add_argument("--seeds", default="0,1,2")
  result.add_argument(f"--{arms_flag}", default=",".join(arms),
                      help=f"comma-separated subset of {', '.join(arms)}")
  return result


def parse(parser_: argparse.ArgumentParser, argv: list[str] | None, arms_flag: str,
          arms: Sequence[str]) -> tuple[argparse.Namespace, list[str], list[str], list[int]]:
  """Parses `argv` (default sys.argv[1:]).

  Returns:
    (args, overrides ["--config.KEY=VALUE", ...], chosen arms in the given order, seeds).
  """
  from jaxsi import config as config_lib  # pylint: disable=g-import-not-at-top
  try:
    rest, overrides = config_lib.split_overrides(sys.argv[1:] if argv is None else argv)
  except config_lib.ConfigError as e:
    parser_.error(str(e))
  args = parser_.parse_args(rest)
  chosen = [a for a in getattr(args, arms_flag).split(",") if a]
  unknown = [a for a in chosen if a not in arms]
  if unknown or not chosen:
    parser_.error(f"unknown {arms_flag[:-1]} {unknown[0] if unknown else ''!r}; choose from "
                  f"{', '.join(arms)}.")
  try:
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  except ValueError:
    parser_.error(f"--seeds={args.seeds!r} is invalid; pass integers like 0,1,2.")
  if not seeds:
    parser_.error("--seeds is empty; pass at least one seed, e.g. --seeds=0.")
  return args, overrides, chosen, seeds


def load_config(spec: str, overrides: list) -> Any:
  """The resolved config, or None after printing `error: <one sentence>` to stderr."""
  from jaxsi import config as config_lib  # pylint: disable=g-import-not-at-top
  try:
    return config_lib.load(spec, overrides)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return None


def write_results(workdir: str, results: dict[str, Any], text: str) -> None:
  """On process 0: WORKDIR/results.json (`results`), WORKDIR/results.md (`text`), then prints it."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    return
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(text + "\n")
  print(text)
