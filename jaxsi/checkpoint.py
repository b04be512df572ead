"""Checkpoints under WORKDIR/checkpoints: orbax CheckpointManager around the train state.

Each step directory holds four items:
  state    the TrainState (sharded arrays, orbax's standard format)
  config   the resolved experiment config (JSON)
  metrics  the latest train/eval metrics (JSON)
  data     the data position and any other host-side state needed to resume exactly (JSON)

Saves are asynchronous. The manager keeps the last `keep` steps plus, when `best_metric` is set,
the best step by that eval metric. Restores go onto whatever mesh the caller's abstract state
carries, so a run can resume on a different device count. A latest step that cannot be read
(corrupted, half-written) is skipped with a warning and the previous one is used.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_managers

ITEMS = ("state", "config", "metrics", "data")


def _jsonable(tree: Any) -> Any:
  return json.loads(json.dumps(tree, default=lambda x: x.item() if hasattr(x, "item") else str(x)))


class Checkpointer:
  """Saves and restores training checkpoints in `directory`.

  Args:
    directory: where step subdirectories go (created if missing).
    keep: how many of the most recent steps to keep.
    best_metric: name of a metric in the saved metrics (e.g. "eval/accuracy") whose best
      step is also kept; None keeps only the latest ones.
    best_mode: "max" or "min" for `best_metric`.
    async_save: write in a background thread while training continues.
  """

  def __init__(self, directory: str, *, keep: int = 3, best_metric: str | None = None,
               best_mode: str = "max", async_save: bool = True):
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}.")
    self.directory = os.path.abspath(directory) if "://" not in directory else directory
    self.best_metric = best_metric
    policies = [ocp_managers.LatestN(n=keep)]
    if best_metric:
      # A step saved before any eval ranks last, rather than failing the save.
      missing = float("inf") if best_mode == "min" else float("-inf")
      policies.append(ocp_managers.BestN(
          get_metric_fn=lambda metrics: float(metrics.get(best_metric, missing)),
          reverse=best_mode == "min", n=1, keep_checkpoints_without_metrics=True))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save,
        create=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  def all_steps(self) -> list[int]:
    """Steps present on disk, ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest step on disk, or None."""
    return self._manager.latest_step()

  def save(self, step: int, state: Any, *, config: dict, metrics: dict | None = None,
           data: dict | None = None, force: bool = False) -> bool:
    """Starts saving `state` and its side items at `step`. Returns whether a save started.

    A step that is already on disk is never overwritten.
    """
    if step in self._manager.all_steps():
      return False
    metrics = _jsonable(metrics or {})
    saved = self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            config=ocp.args.JsonSave(_jsonable(config)),
            metrics=ocp.args.JsonSave(metrics),
            data=ocp.args.JsonSave(_jsonable(data or {})),
        ),
        metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))} or None,
        force=force,
    )
    return bool(saved)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any, dict]:
    """Restores the newest readable step (or exactly `step`).

    Args:
      abstract_state: pytree of `jax.ShapeDtypeStruct` with `.sharding` set: the target layout.
      step: a specific step; None means the latest that can be read.

    Returns:
      (step, state, side) where side holds the "config", "metrics" and "data" items.

    Raises:
      FileNotFoundError: no checkpoint exists (or none could be read).
    """
    candidates = [step] if step is not None else list(reversed(self.all_steps()))
    if not candidates:
      raise FileNotFoundError(f"No checkpoint found in {self.directory}.")
    errors = []
    for candidate in candidates:
      try:
        restored = self._manager.restore(
            candidate,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                config=ocp.args.JsonRestore(),
                metrics=ocp.args.JsonRestore(),
                data=ocp.args.JsonRestore(),
            ))
      except Exception as e:  # noqa: BLE001 - any unreadable step falls back to the previous.
        if step is not None:
          raise
        logging.warning("Checkpoint step %d in %s cannot be read (%s: %s); trying the previous one.",
                        candidate, self.directory, type(e).__name__, str(e).splitlines()[0][:200])
        errors.append(candidate)
        continue
      side = {k: restored[k] or {} for k in ("config", "metrics", "data")}
      return candidate, restored["state"], side
    raise FileNotFoundError(
        f"No readable checkpoint in {self.directory} (steps {errors} failed to restore: damaged, or "
        "saved with a different model or optimizer config than this run's).")

  def restore_params(self, abstract_params: Any, step: int) -> Any:
    """Only the parameters of step `step`'s train state; the optimizer state is never read.

    A `Checkpointer` that restored parameters this way cannot `restore` a whole state (orbax
    fixes an item's handler at first use): use a fresh one.

    Args:
      abstract_params: pytree of `jax.ShapeDtypeStruct` with `.sharding` set: the target layout.
      step: the checkpoint step.

    Returns:
      The parameters, laid out as `abstract_params` says.
    """
    item = {"params": abstract_params}
    restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True)))
    return restored["state"]["params"]

  def read_json(self, step: int, item: str) -> dict:
    """Reads a JSON side item of `step` without touching the state."""
    return self._manager.restore(step, args=ocp.args.Composite(
        **{item: ocp.args.JsonRestore()}))[item] or {}

  def wait(self) -> None:
    """Blocks until pending asynchronous saves have finished."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Finishes pending saves and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_with_shardings(abstract_tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings (for `Checkpointer.restore`)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_tree, shardings)
