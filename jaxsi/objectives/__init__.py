"""Training objectives, chosen by name from the config.

Each objective module has `make_loss_fn(lm, objective_cfg, **extras)` returning
`loss_fn(params, frozen, batch, rng, step) -> (loss, metrics)`; this registry maps
`objective_cfg.name` to it. A new objective adds one entry to `_FACTORIES`.
"""

from __future__ import annotations

from typing import Any, Callable

import ml_collections

from jaxsi.objectives import gkd
from jaxsi.objectives import sequencematch
from jaxsi.objectives import sft
from jaxsi.objectives import sharpening

LossFn = Callable[..., tuple[Any, dict[str, Any]]]

_FACTORIES: dict[str, Callable[..., LossFn]] = {
    "gkd": gkd.make_loss_fn,
    "sequencematch": sequencematch.make_loss_fn,
    "sft": sft.make_loss_fn,
    "sharpening": sharpening.make_loss_fn,
}


def names() -> tuple[str, ...]:
  """The registered objective names, sorted."""
  return tuple(sorted(_FACTORIES))


def make_loss_fn(objective_cfg: ml_collections.ConfigDict, lm: Any, **extras: Any) -> LossFn:
  """Builds the loss function of the objective named `objective_cfg.name`.

  Args:
    objective_cfg: the objective's config; its `name` selects the objective.
    lm: the `LanguageModel` being trained.
    **extras: passed on to the objective's factory (e.g. a teacher model).

  Returns:
    `loss_fn(params, frozen, batch, rng, step) -> (loss, metrics)`.
  """
  name = getattr(objective_cfg, "name", None)
  if name not in _FACTORIES:
    raise ValueError(f"Unknown objective name {name!r}; expected one of {', '.join(names())}.")
  return _FACTORIES[name](lm, objective_cfg, **extras)
