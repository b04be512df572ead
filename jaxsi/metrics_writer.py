"""Metrics to WORKDIR/metrics.jsonl (one JSON object per line) and, optionally, TensorBoard."""

from __future__ import annotations

import json
import math
import os
from typing import Mapping


class MetricsWriter:
  """Appends `{"step": N, name: value, ...}` lines; only process 0 should create one.

  Args:
    workdir: the run directory.
    resume_step: on resume, lines with a step above this one (written after the checkpoint
      the run restarts from) are dropped so the file never holds two histories.
    tensorboard: also write TensorBoard event files under WORKDIR/tensorboard.
  """

  def __init__(self, workdir: str, *, resume_step: int | None = None, tensorboard: bool = False):
    self.path = os.path.join(workdir, "metrics.jsonl")
    if resume_step is not None and os.path.exists(self.path):
      with open(self.path) as f:
        kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resume_step]
      with open(self.path, "w") as f:
        f.writelines(kept)
    self._tb = None
    if tensorboard:
      from flax.metrics import tensorboard as flax_tb  # imports TensorFlow: only when asked.
      self._tb = flax_tb.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    """Writes one line for `step`; non-finite values are stored as strings ("nan", "inf")."""
    row = {"step": int(step)}
    for key, value in metrics.items():
      value = float(value)
      row[key] = value if math.isfinite(value) else str(value)
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for key, value in metrics.items():
        self._tb.scalar(key, float(value), int(step))
      self._tb.flush()


def read(workdir_or_file: str) -> list[dict]:
  """All rows of a run's metrics.jsonl, in file order."""
  path = workdir_or_file
  if os.path.isdir(path):
    path = os.path.join(path, "metrics.jsonl")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
