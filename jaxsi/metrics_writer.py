"""Metrics to WORKDIR/metrics.jsonl (one JSON object per line) and, optionally, TensorBoard."""

from __future__ import annotations

import json
import math
import os
from typing import Mapping

from etils import epath


def _is_remote(path: str) -> bool:
  return "://" in path


class MetricsWriter:
  """Appends `{"step": N, name: value, ...}` lines; only process 0 should create one.

  Local files are appended to; on object stores (gs://), which cannot append, the whole
  (small) file is rewritten on every write.

  Args:
    workdir: the run directory (local or gs://...).
    resume_step: on resume, lines with a step above this one (written after the checkpoint
      the run restarts from) are dropped so the file never holds two histories.
    tensorboard: also write TensorBoard event files under WORKDIR/tensorboard.
  """

  def __init__(self, workdir: str, *, resume_step: int | None = None, tensorboard: bool = False):
    self.path = epath.Path(workdir) / "metrics.jsonl"
    self._lines: list[str] = []
    if self.path.exists():
      lines = [line + "\n" for line in self.path.read_text().splitlines() if line.strip()]
      if resume_step is not None:
        lines = [line for line in lines if json.loads(line).get("step", 0) <= resume_step]
      self._lines = lines
      self.path.write_text("".join(lines))
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
    line = json.dumps(row) + "\n"
    self._lines.append(line)
    if _is_remote(str(self.path)):
      self.path.write_text("".join(self._lines))
    else:
      with open(self.path, "a") as f:
        f.write(line)
    if self._tb is not None:
      for key, value in metrics.items():
        self._tb.scalar(key, float(value), int(step))
      self._tb.flush()


def read(workdir_or_file: str) -> list[dict]:
  """All rows of a run's metrics.jsonl, in file order."""
  path = epath.Path(workdir_or_file)
  if path.is_dir():
    path = path / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
