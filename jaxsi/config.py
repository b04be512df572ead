"""Loading experiment configs: `path/to/config.py[:variant]` plus `--config.a.b=value` overrides.

A config file defines `get_config(arg: str | None) -> ml_collections.ConfigDict`. Overrides are
checked against the loaded config: an unknown key or a value of the wrong type fails with one
sentence naming it and what would be accepted. The result is locked, so code cannot add keys by
accident after loading.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
from typing import Any, Sequence

import ml_collections


class ConfigError(ValueError):
  """A config file, variant, key or value that cannot be used."""


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Imports `path.py[:arg]` and returns `get_config(arg)`.

  Args:
    spec: a path to a Python file, optionally followed by `:arg` (a variant name).

  Raises:
    ConfigError: the file is missing or has no `get_config`.
  """
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"Config file {path!r} does not exist; pass --config=configs/NAME.py[:variant].")
  name = "jaxsi_config_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"Config file {path!r} defines no get_config(arg) function.")
  config = module.get_config(arg or None)
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"get_config in {path!r} returned {type(config).__name__}, not a ConfigDict.")
  return config


def _parse_value(key: str, text: str, current: Any) -> Any:
  """Parses `text` into the type of the current value of `key`."""
  lowered = text.strip().lower()
  if lowered in ("none", "null"):
    return None
  if isinstance(current, bool):
    if lowered in ("true", "1", "yes"):
      return True
    if lowered in ("false", "0", "no"):
      return False
    raise ConfigError(f"--config.{key} expects a bool (true/false), got {text!r}.")
  if isinstance(current, int):
    try:
      return int(text)
    except ValueError:
      try:
        as_float = float(text)
      except ValueError:
        as_float = None
      if as_float is not None and as_float.is_integer():
        return int(as_float)
      raise ConfigError(f"--config.{key} expects an int, got {text!r}.") from None
  if isinstance(current, float):
    try:
      return float(text)
    except ValueError:
      raise ConfigError(f"--config.{key} expects a float, got {text!r}.") from None
  if isinstance(current, (tuple, list)):
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      raise ConfigError(f"--config.{key} expects a tuple like (1, 2), got {text!r}.") from None
    if not isinstance(value, (tuple, list)):
      value = (value,)
    return type(current)(value)
  if current is None:
    # Unknown type: accept Python literals, else keep the string.
    try:
      return ast.literal_eval(text)
    except (ValueError, SyntaxError):
      return text
  return text


def apply_override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
  """Sets `config.<key>` (dotted) from a command-line string, checking the key and the type.

  Raises:
    ConfigError: the key does not exist or the value has the wrong type.
  """
  parts = key.split(".")
  node = config
  for depth, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      where = ".".join(parts[:depth]) or "the top level"
      valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      raise ConfigError(
          f"Unknown config key {key!r}: {part!r} is not a key at {where}; valid keys there are "
          f"{', '.join(valid)}.")
    if depth < len(parts) - 1:
      node = node[part]
  leaf = parts[-1]
  current = node[leaf]
  if isinstance(current, ml_collections.ConfigDict):
    raise ConfigError(f"--config.{key} is a section, not a value; set one of its keys: "
                      f"{', '.join(sorted(current.keys()))}.")
  with node.unlocked():
    node[leaf] = _parse_value(key, text, current)


def load(spec: str, overrides: Sequence[tuple[str, str]] = ()) -> ml_collections.ConfigDict:
  """Loads a config file, applies `(dotted_key, value_text)` overrides, validates and locks it."""
  config = load_config_file(spec)
  for key, text in overrides:
    apply_override(config, key, text)
  config.lock()
  return config


def to_json(config: ml_collections.ConfigDict) -> str:
  """The resolved config as JSON text (what checkpoints store)."""
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def base_config(*, model: ml_collections.ConfigDict, data: ml_collections.ConfigDict
                ) -> ml_collections.ConfigDict:
  """Every section of an experiment config with its defaults.

  Each library module owns the defaults of its own section (model, data, optim, objective);
  this function only assembles them and adds the run-level sections. Experiment files in
  `configs/` start from it and change what they need.
  """
  from jaxsi import optim
  from jaxsi.objectives import sft

  config = ml_collections.ConfigDict()
  config.seed = 0
  # Start from trained weights instead of a random init: a jaxsi workdir or a Hugging Face
  # checkpoint (directory or hub id). Ignored when the workdir already holds a checkpoint.
  config.init_from = ""
  config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  config.model = model
  config.data = data
  config.optim = optim.default_optim_config()
  config.objective = sft.default_objective_config()
  config.train = ml_collections.ConfigDict({
      "steps": 1000,
      "batch_size": 64,
      "log_every": 20,
      "eval_every": 0,         # 0: only at the end
      "checkpoint_every": 200,
      "progress": True,
  })
  config.eval = ml_collections.ConfigDict({
      "num_examples": 200,
      "batch_size": 200,
      "max_new_tokens": 16,
      # 0 = greedy ("eval/accuracy"); others sample ("eval/accuracy_t1" for 1.0).
      "temperatures": (0.0,),
      "at_end": True,
  })
  config.checkpoint = ml_collections.ConfigDict({
      "keep": 2,
      "best_metric": "eval/accuracy",
      "best_mode": "max",
      "async_save": True,
  })
  config.log = ml_collections.ConfigDict({"tensorboard": False})
  return config


def check_keys(config: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict, *,
               owner: str, start_from: str) -> None:
  """Raises a ValueError unless `config` has exactly the keys of `defaults` (top level).

  Args:
    config: a section of a config, e.g. an objective.
    defaults: the section's defaults, whose keys are the valid ones.
    owner: the section's name for the message, e.g. "GKD".
    start_from: the function that builds `defaults`, named in the message.
  """
  expected = set(defaults.keys())
  unknown = sorted(set(config.keys()) - expected)
  if unknown:
    raise ValueError(f"{owner} config has unknown keys {unknown}; valid keys are "
                     f"{sorted(expected)}.")
  missing = sorted(expected - set(config.keys()))
  if missing:
    raise ValueError(f"{owner} config lacks keys {missing}; start from {start_from}().")


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
  """Separates `--config.KEY=VALUE` (or `--config.KEY VALUE`) overrides from other arguments.

  Returns:
    (the other arguments, the (KEY, VALUE) overrides in command-line order).

  Raises:
    ConfigError: an override without a value.
  """
  overrides: list[tuple[str, str]] = []
  rest: list[str] = []
  args = iter(argv)
  for arg in args:
    if not arg.startswith("--config."):
      rest.append(arg)
      continue
    key, eq, value = arg[len("--config."):].partition("=")
    if not eq:
      value = next(args, None)
      if value is None:
        raise ConfigError(f"Override --config.{key} has no value; write --config.{key}=VALUE.")
    overrides.append((key, value))
  return rest, overrides
