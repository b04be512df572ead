"""Sequence-level rewards for GKD + RL, chosen by name from the config.

A reward maps decoded texts to one float per row, on the host:

  fn = get_reward("rouge2")               # or "exact_match", "rougeL", "my_pkg.rewards:score"
  r_B = fn(predictions, targets)          # np.ndarray [B] float32

Built in: "exact_match" (1.0 when prediction and target are equal after stripping
surrounding whitespace, else 0.0) and "rouge2" / "rougeL" (the rouge-score F-measure in
[0, 1], Porter stemming as in `jaxsi.evals.metrics`). "module:function" imports a user
function with the same signature; its output is checked and cast to float32.
"""

from __future__ import annotations

import importlib
from typing import Callable, Sequence

import numpy as np
from rouge_score import rouge_scorer

RewardFn = Callable[[Sequence[str], Sequence[str]], np.ndarray]


def _check_pairs(predictions: Sequence[str], targets: Sequence[str]) -> None:
  if len(predictions) != len(targets):
    raise ValueError(f"Got {len(predictions)} predictions for {len(targets)} targets; a reward "
                     "needs one target per prediction.")
  for what, texts in (("prediction", predictions), ("target", targets)):
    for index, text in enumerate(texts):
      if not isinstance(text, str):
        raise ValueError(f"The {what} at index {index} is a {type(text).__name__}, not a str; "
                         "decode token ids to text before computing rewards.")


def exact_match(predictions: Sequence[str], targets: Sequence[str]) -> np.ndarray:
  """[B] float32: 1.0 where prediction.strip() == target.strip(), else 0.0."""
  _check_pairs(predictions, targets)
  return np.asarray([p.strip() == t.strip() for p, t in zip(predictions, targets)], np.float32)


def _rouge(rouge_type: str) -> RewardFn:
  scorer = rouge_scorer.RougeScorer([rouge_type], use_stemmer=True)

  def reward(predictions: Sequence[str], targets: Sequence[str]) -> np.ndarray:
    _check_pairs(predictions, targets)
    # rouge-score takes (target, prediction), in that order.
    return np.asarray([scorer.score(t, p)[rouge_type].fmeasure
                       for p, t in zip(predictions, targets)], np.float32)

  reward.__name__ = rouge_type
  reward.__doc__ = f"[B] float32: the {rouge_type} F-measure of each prediction, in [0, 1]."
  return reward


_BUILTIN: dict[str, Callable[[], RewardFn]] = {
    "exact_match": lambda: exact_match,
    "rouge2": lambda: _rouge("rouge2"),
    "rougeL": lambda: _rouge("rougeL"),
}


def names() -> tuple[str, ...]:
  """The built-in reward names, sorted."""
  return tuple(sorted(_BUILTIN))


def _import(spec: str) -> Callable[..., object]:
  module_name, _, function_name = spec.partition(":")
  if not module_name or not function_name:
    raise ValueError(f"Reward {spec!r} is not 'module:function'; expected one of "
                     f"{', '.join(names())} or 'package.module:function'.")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(f"Reward {spec!r}: module {module_name!r} cannot be imported ({e}).") from e
  function = getattr(module, function_name, None)
  if not callable(function):
    raise ValueError(f"Reward {spec!r}: module {module_name!r} has no function "
                     f"{function_name!r}.")
  return function


def _checked(spec: str, function: Callable[..., object]) -> RewardFn:
  """Wraps a user reward so a wrong output fails with a clear sentence."""

  def reward(predictions: Sequence[str], targets: Sequence[str]) -> np.ndarray:
    _check_pairs(predictions, targets)
    values = np.asarray(function(list(predictions), list(targets)), dtype=np.float32)
    if values.shape != (len(predictions),):
      raise ValueError(f"Reward {spec!r} returned shape {values.shape}; expected one value per "
                       f"prediction, shape ({len(predictions)},).")
    if not np.all(np.isfinite(values)):
      raise ValueError(f"Reward {spec!r} returned non-finite values {values.tolist()}; rewards "
                       "must be finite floats.")
    return values

  reward.__name__ = spec
  return reward


def get_reward(name: str) -> RewardFn:
  """Returns the reward `fn(predictions, targets) -> np.ndarray [B] float32` named `name`.

  Args:
    name: a built-in name ("exact_match", "rouge2", "rougeL") or "module:function", a user
      function taking (list[str], list[str]) and returning B numbers.

  Raises:
    ValueError: unknown name, unimportable module or missing function.
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f"Reward name {name!r} is empty or not a string; expected one of "
                     f"{', '.join(names())} or 'module:function'.")
  if name in _BUILTIN:
    return _BUILTIN[name]()
  if ":" not in name:
    raise ValueError(f"Unknown reward {name!r}; expected one of {', '.join(names())} or "
                     "'module:function'.")
  return _checked(name, _import(name))
