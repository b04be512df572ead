"""Command line: look inside a run without a notebook.

  python -m jaxsi.inspect PATH                       # parameter tree, steps, sizes (metadata only)
  python -m jaxsi.inspect PATH --filter 'attn'       # only leaves whose name matches the regex
  python -m jaxsi.inspect PATH --stats [--opt_state] # per-leaf L2 norm, min, max, mean, NaN, Inf
  python -m jaxsi.inspect PATH --config              # the resolved config stored with the step
  python -m jaxsi.inspect PATH --metrics [--columns train/loss,eval/accuracy]
  python -m jaxsi.inspect PATH --plot curves.png     # train loss and eval curves
  python -m jaxsi.inspect PATH --sample "In base 7, what is -13 + 22?"
  python -m jaxsi.inspect PATH --diff OTHER_PATH     # leaf-by-leaf comparison of two checkpoints

PATH is a run workdir, its `checkpoints/` directory or one step directory
(`WORKDIR/checkpoints/1000`); `--step N` picks a step (default: the latest). The default view
reads only orbax metadata (names, shapes, dtypes), so it is instant even for a model that
would not fit in host memory; `--stats`, `--diff` and `--sample` read arrays onto the host
(CPU), a bounded group of leaves at a time.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import re
import sys
from typing import Any, Iterable, Iterator, Sequence

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jaxsi import checkpoint as checkpoint_lib

USAGE = ("python -m jaxsi.inspect PATH [--step N] [--filter RE] [--stats] [--opt_state] "
         "[--config] [--metrics] [--columns A,B] [--plot OUT.png] [--sample PROMPT] "
         "[--diff OTHER]")
PATH_HINT = ("pass a run workdir, its checkpoints/ directory or one step directory "
             "(e.g. WORKDIR/checkpoints/1000)")
# Arrays are restored onto the host in groups of at most this many bytes, so --stats and
# --diff work on checkpoints larger than host memory.
RESTORE_GROUP_BYTES = 1 << 30
# Columns --metrics shows when --columns is not given (those present in the file), followed
# by every eval/ column.
DEFAULT_METRIC_COLUMNS = ("train/loss", "train/grad_norm", "train/lr", "train/tokens_per_s")


class InspectError(ValueError):
  """A path, step, flag or file that cannot be inspected; the message is one sentence."""


# ----------------------------------------------------------------------------- locating


@dataclasses.dataclass(frozen=True)
class RunPaths:
  """Where a run's pieces live, derived from the PATH given on the command line.

  Attributes:
    workdir: the run directory (holds metrics.jsonl), or None when PATH sits elsewhere.
    checkpoints_dir: the directory of step subdirectories, or None when there is none.
    step_from_path: the step when PATH is one step directory, else None.
  """

  workdir: epath.Path | None
  checkpoints_dir: epath.Path | None
  step_from_path: int | None


def _committed_steps(checkpoints_dir: epath.Path) -> list[int]:
  """Finalized steps in `checkpoints_dir`, ascending (half-written ones are skipped)."""
  return sorted(ocp.path.step.checkpoint_steps(checkpoints_dir))


def resolve_paths(path: str) -> RunPaths:
  """Works out which of workdir / checkpoints dir / step dir `path` is.

  Raises:
    InspectError: the path does not exist or holds neither checkpoints nor metrics.
  """
  root = epath.Path(path)
  if not root.exists():
    raise InspectError(f"Path {path!r} does not exist; {PATH_HINT}.")
  if not root.is_dir():
    raise InspectError(f"Path {path!r} is a file, not a directory; {PATH_HINT}.")
  if (root / "checkpoints").is_dir():
    return RunPaths(root, root / "checkpoints", None)
  if root.name.isdigit() and (root / "state").is_dir():
    return RunPaths(root.parent.parent, root.parent, int(root.name))
  if _committed_steps(root):
    return RunPaths(root.parent, root, None)
  if (root / "metrics.jsonl").exists():
    return RunPaths(root, None, None)
  raise InspectError(f"Path {path!r} holds no jaxsi checkpoint and no metrics.jsonl; "
                     f"{PATH_HINT}.")


# ----------------------------------------------------------------------------- leaves


@dataclasses.dataclass(frozen=True)
class Leaf:
  """One array of the saved TrainState, described from metadata alone.

  Attributes:
    name: "/"-joined tree path, e.g. "params/layer_0/attn/query/kernel".
    keys: the tree path as dict keys and list indices (for partial restores).
    shape: the global shape.
    dtype: the stored dtype.
  """

  name: str
  keys: tuple[str | int, ...]
  shape: tuple[int, ...]
  dtype: np.dtype

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def nbytes(self) -> int:
    return self.size * self.dtype.itemsize

  @property
  def part(self) -> str:
    """The TrainState field the leaf belongs to: "params", "opt_state" or "step"."""
    return str(self.keys[0])


def _key_of(entry: Any) -> str | int:
  for attribute in ("key", "idx", "name"):
    if hasattr(entry, attribute):
      return getattr(entry, attribute)
  return str(entry)


def leaves_of(metadata_tree: Any) -> list[Leaf]:
  """The array leaves of a TrainState metadata tree (or of any tree of shaped leaves)."""
  leaves = []
  for path, value in jax.tree_util.tree_flatten_with_path(metadata_tree)[0]:
    if not hasattr(value, "shape"):
      continue
    keys = tuple(_key_of(entry) for entry in path)
    leaves.append(Leaf(name="/".join(str(k) for k in keys), keys=keys,
                       shape=tuple(int(d) for d in value.shape), dtype=np.dtype(value.dtype)))
  return leaves


def select(leaves: Iterable[Leaf], parts: Sequence[str], pattern: str | None) -> list[Leaf]:
  """Leaves of the TrainState `parts` whose name matches `pattern` (regex search)."""
  try:
    regex = re.compile(pattern) if pattern else None
  except re.error as e:
    raise InspectError(f"--filter {pattern!r} is not a valid regular expression ({e}); "
                       "pass a Python regex such as 'layer_0/.*kernel'.") from None
  return [leaf for leaf in leaves
          if leaf.part in parts and (regex is None or regex.search(leaf.name))]


def _get(tree: Any, keys: Sequence[str | int]) -> Any:
  for key in keys:
    tree = tree[key]
  return tree


def _restore_groups(leaves: Sequence[Leaf], max_bytes: int) -> Iterator[list[Leaf]]:
  group: list[Leaf] = []
  group_bytes = 0
  for leaf in leaves:
    if group and group_bytes + leaf.nbytes > max_bytes:
      yield group
      group, group_bytes = [], 0
    group.append(leaf)
    group_bytes += leaf.nbytes
  if group:
    yield group


# ----------------------------------------------------------------------------- reading


class CheckpointReader:
  """One step of a run's checkpoints: metadata, JSON side items, and arrays on the host.

  Args:
    path: a run workdir, its checkpoints directory or one step directory.
    step: the step to read; None means the latest (or the step directory's own step).

  Raises:
    InspectError: no checkpoint there, or `step` is not one of the saved steps.
  """

  def __init__(self, path: str, step: int | None = None):
    self.paths = resolve_paths(path)
    if self.paths.checkpoints_dir is None:
      raise InspectError(f"Path {path!r} holds no checkpoint (only metrics.jsonl); {PATH_HINT}.")
    self.steps = _committed_steps(self.paths.checkpoints_dir)
    if not self.steps:
      raise InspectError(f"{self.paths.checkpoints_dir} holds no finished checkpoint; "
                         f"{PATH_HINT}.")
    from_path = self.paths.step_from_path
    if step is not None and from_path is not None and step != from_path:
      raise InspectError(f"--step {step} disagrees with the step directory {path!r} "
                         f"(step {from_path}); drop --step or pass the run's workdir.")
    chosen = step if step is not None else from_path if from_path is not None else self.steps[-1]
    if chosen not in self.steps:
      raise InspectError(f"Step {chosen} is not in {self.paths.checkpoints_dir}; available steps: "
                         f"{', '.join(str(s) for s in self.steps)}.")
    self.step = chosen
    self.state_dir = self.paths.checkpoints_dir / str(chosen) / "state"

  @property
  def latest_step(self) -> int:
    return self.steps[-1]

  @functools.cached_property
  def _handler(self) -> ocp.PyTreeCheckpointHandler:
    return ocp.PyTreeCheckpointHandler()

  @functools.cached_property
  def metadata_tree(self) -> Any:
    """The saved TrainState as a tree of orbax ArrayMetadata (shapes, dtypes; no values)."""
    try:
      return self._handler.metadata(self.state_dir).tree
    except (OSError, ValueError) as e:
      reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
      raise InspectError(f"The state of step {self.step} in {self.paths.checkpoints_dir} cannot be "
                         f"read ({reason}); it may be damaged, so pick another step with "
                         "--step.") from None

  @functools.cached_property
  def leaves(self) -> list[Leaf]:
    """Every array leaf of the saved TrainState, in tree order."""
    return leaves_of(self.metadata_tree)

  @functools.cached_property
  def _manager(self) -> ocp.CheckpointManager:
    # Read-only: inspecting a run must never delete or create anything in it. Orbax logs three
    # warnings saying so, which would only clutter the output.
    absl_logger = logging.getLogger("absl")
    previous_level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
      return ocp.CheckpointManager(
          self.paths.checkpoints_dir, options=ocp.CheckpointManagerOptions(read_only=True),
          item_names=checkpoint_lib.ITEMS)
    finally:
      absl_logger.setLevel(previous_level)

  def side_item(self, item: str, step: int | None = None) -> dict:
    """A JSON item saved next to the state ("config", "metrics" or "data")."""
    step = self.step if step is None else step
    restored = self._manager.restore(step, args=ocp.args.Composite(
        **{item: ocp.args.JsonRestore()}))
    return restored[item] or {}

  def close(self) -> None:
    """Releases the orbax objects this reader opened."""
    if "_manager" in self.__dict__:
      self._manager.close()
    if "_handler" in self.__dict__:
      self._handler.close()

  def __enter__(self) -> "CheckpointReader":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def iter_arrays(self, leaves: Sequence[Leaf], *, max_bytes: int = RESTORE_GROUP_BYTES
                  ) -> Iterator[tuple[Leaf, np.ndarray]]:
    """Yields (leaf, NumPy array) for `leaves`, restoring a group of them at a time.

    Leaves outside the group are orbax PLACEHOLDERs, so nothing else is read from disk.
    """
    for group in _restore_groups(leaves, max_bytes):
      wanted = {leaf.keys for leaf in group}

      def keep_or_skip(path, value, wanted=wanted):
        if tuple(_key_of(entry) for entry in path) in wanted:
          return value
        return ocp.PLACEHOLDER

      item = jax.tree_util.tree_map_with_path(keep_or_skip, self.metadata_tree)
      restore_args = jax.tree.map(
          lambda value: value if value is ocp.PLACEHOLDER
          else ocp.RestoreArgs(restore_type=np.ndarray), item)
      restored = self._handler.restore(
          self.state_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args))
      for leaf in group:
        yield leaf, np.asarray(_get(restored, leaf.keys))

  def params(self) -> Any:
    """The parameter tree as NumPy arrays (nested dicts, as the model's `init` makes them)."""
    params_leaves = [leaf for leaf in self.leaves if leaf.part == "params"]
    flat = dict(self.iter_arrays(params_leaves))
    tree: dict = {}
    for leaf, array in flat.items():
      node = tree
      for key in leaf.keys[1:-1]:
        node = node.setdefault(key, {})
      node[leaf.keys[-1]] = array
    return tree


# ----------------------------------------------------------------------------- formatting


def format_number(value: Any) -> str:
  """Integers with thousands separators, floats with 6 significant digits, "" for None."""
  if value is None:
    return ""
  if isinstance(value, (bool, np.bool_)):
    return str(value)
  if isinstance(value, (int, np.integer)):
    return f"{int(value):,}"
  if isinstance(value, (float, np.floating)):
    return f"{float(value):.6g}"
  return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A plain-text table: numeric columns right-aligned, text left-aligned."""
  cells = [[format_number(value) for value in row] for row in rows]
  numeric = [all(isinstance(row[i], (int, float, np.number)) or row[i] is None for row in rows)
             for i in range(len(headers))]
  widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]

  def line(values: Sequence[str]) -> str:
    return "  ".join(v.rjust(w) if right else v.ljust(w)
                     for v, w, right in zip(values, widths, numeric)).rstrip()

  out = [line(headers), line(["-" * w for w in widths])]
  out.extend(line(row) for row in cells)
  return "\n".join(out)


def format_bytes(num_bytes: int) -> str:
  for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
    if num_bytes >= scale:
      return f"{num_bytes / scale:.2f} {unit}"
  return f"{num_bytes} B"


def _shape_text(shape: Sequence[int]) -> str:
  return str(tuple(shape))


# ----------------------------------------------------------------------------- views


def describe(reader: CheckpointReader, pattern: str | None = None) -> str:
  """The default view, from metadata alone: steps, parameter tree and sizes."""
  config = reader.side_item("config")
  best_metric = (config.get("checkpoint") or {}).get("best_metric") or None
  step_rows = []
  for step in reader.steps:
    metrics = reader.side_item("metrics", step)
    marks = ", ".join(mark for mark, on in (("latest", step == reader.latest_step),
                                            ("shown", step == reader.step)) if on)
    row = [step, marks, metrics.get("train/loss")]
    if best_metric:
      row.append(metrics.get(best_metric))
    step_rows.append(row)
  step_headers = ["step", "", "train/loss"] + ([best_metric] if best_metric else [])

  all_params = [leaf for leaf in reader.leaves if leaf.part == "params"]
  shown = select(reader.leaves, ("params",), pattern)
  opt_state = [leaf for leaf in reader.leaves if leaf.part == "opt_state"]
  total = sum(leaf.size for leaf in all_params)

  lines = [f"checkpoints: {reader.paths.checkpoints_dir}", "",
           format_table(step_headers, step_rows), "",
           f"parameters at step {reader.step}:",
           format_table(["name", "shape", "dtype", "size"],
                        [[leaf.name, _shape_text(leaf.shape), str(leaf.dtype), leaf.size]
                         for leaf in shown]), ""]
  if pattern:
    lines.append(f"matching {pattern!r}: {len(shown)} of {len(all_params)} leaves, "
                 f"{sum(leaf.size for leaf in shown):,} of {total:,} parameters")
  lines.append(f"total parameters: {total:,} in {len(all_params)} leaves "
               f"({format_bytes(sum(leaf.nbytes for leaf in all_params))})")
  lines.append(f"optimizer state: {sum(leaf.size for leaf in opt_state):,} values in "
               f"{len(opt_state)} leaves ({format_bytes(sum(leaf.nbytes for leaf in opt_state))})")
  return "\n".join(lines)


@dataclasses.dataclass
class LeafStats:
  """Summary statistics of one array (min, max and mean over its finite values)."""

  size: int
  l2_norm: float
  min: float | None
  max: float | None
  mean: float | None
  num_nan: int
  num_inf: int
  finite_sum: float = 0.0
  num_finite: int = 0


def leaf_stats(array: np.ndarray) -> LeafStats:
  """L2 norm, min, max, mean (finite values, in float64), NaN and Inf counts of `array`."""
  values = np.asarray(array).astype(np.float64).ravel()
  finite = values[np.isfinite(values)]
  return LeafStats(
      size=values.size,
      l2_norm=float(np.sqrt(np.sum(np.square(values)))),  # NaN or Inf when those are present
      min=float(finite.min()) if finite.size else None,
      max=float(finite.max()) if finite.size else None,
      mean=float(finite.mean()) if finite.size else None,
      num_nan=int(np.isnan(values).sum()),
      num_inf=int(np.isinf(values).sum()),
      finite_sum=float(finite.sum()),
      num_finite=int(finite.size))


def total_stats(stats: Sequence[LeafStats]) -> LeafStats:
  """Statistics of all leaves together (the L2 norm is the global norm)."""
  mins = [s.min for s in stats if s.min is not None]
  maxs = [s.max for s in stats if s.max is not None]
  num_finite = sum(s.num_finite for s in stats)
  finite_sum = sum(s.finite_sum for s in stats)
  return LeafStats(
      size=sum(s.size for s in stats),
      l2_norm=math.sqrt(sum(s.l2_norm ** 2 for s in stats)),
      min=min(mins) if mins else None, max=max(maxs) if maxs else None,
      mean=finite_sum / num_finite if num_finite else None,
      num_nan=sum(s.num_nan for s in stats), num_inf=sum(s.num_inf for s in stats),
      finite_sum=finite_sum, num_finite=num_finite)


def compute_stats(reader: CheckpointReader, leaves: Sequence[Leaf]) -> dict[str, LeafStats]:
  """Per-leaf statistics, by leaf name, reading a bounded group of arrays at a time."""
  return {leaf.name: leaf_stats(array) for leaf, array in reader.iter_arrays(leaves)}


def stats_view(reader: CheckpointReader, leaves: Sequence[Leaf]) -> str:
  stats = compute_stats(reader, leaves)
  total = total_stats(list(stats.values()))
  headers = ["name", "size", "l2_norm", "min", "max", "mean", "nan", "inf"]

  def row(name: str, s: LeafStats) -> list:
    return [name, s.size, s.l2_norm, s.min, s.max, s.mean, s.num_nan, s.num_inf]

  rows = [row(name, s) for name, s in stats.items()] + [row("TOTAL", total)]
  return f"statistics at step {reader.step} (min, max, mean over finite values):\n" + \
      format_table(headers, rows)


@dataclasses.dataclass
class LeafDiff:
  """How one leaf differs between checkpoints A and B."""

  name: str
  max_abs_diff: float
  relative_l2_diff: float  # ||a - b|| / ||a||


def diff_arrays(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
  """(max |a - b|, ||a - b|| / ||a||) in float64; the relative diff is 0 for a == b == 0."""
  a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
  delta = a64 - b64
  max_abs = float(np.max(np.abs(delta))) if delta.size else 0.0
  delta_norm = float(np.linalg.norm(delta.ravel()))
  a_norm = float(np.linalg.norm(a64.ravel()))
  relative = delta_norm / a_norm if a_norm else (0.0 if delta_norm == 0 else float("inf"))
  return max_abs, relative


@dataclasses.dataclass
class CheckpointDiff:
  """The comparison of the selected leaves of two checkpoints."""

  diffs: list[LeafDiff]
  mismatches: list[tuple[str, str, str]]  # (name, A's shape/dtype, B's shape/dtype)
  only_in_a: list[str]
  only_in_b: list[str]


def compare(reader_a: CheckpointReader, reader_b: CheckpointReader, parts: Sequence[str],
            pattern: str | None) -> CheckpointDiff:
  """Compares two checkpoints leaf by leaf (leaves are matched by name)."""
  leaves_a = {leaf.name: leaf for leaf in select(reader_a.leaves, parts, pattern)}
  leaves_b = {leaf.name: leaf for leaf in select(reader_b.leaves, parts, pattern)}
  common, mismatches = [], []
  for name, leaf in leaves_a.items():
    other = leaves_b.get(name)
    if other is None:
      continue
    if (leaf.shape, leaf.dtype) == (other.shape, other.dtype):
      common.append(name)
    else:
      mismatches.append((name, f"{_shape_text(leaf.shape)} {leaf.dtype}",
                         f"{_shape_text(other.shape)} {other.dtype}"))
  pairs = zip(reader_a.iter_arrays([leaves_a[n] for n in common]),
              reader_b.iter_arrays([leaves_b[n] for n in common]))
  diffs = [LeafDiff(leaf.name, *diff_arrays(a, b)) for (leaf, a), (_, b) in pairs]
  return CheckpointDiff(diffs, mismatches,
                        only_in_a=[n for n in leaves_a if n not in leaves_b],
                        only_in_b=[n for n in leaves_b if n not in leaves_a])


def diff_view(reader_a: CheckpointReader, reader_b: CheckpointReader, result: CheckpointDiff
              ) -> str:
  a_name = f"A = {reader_a.paths.checkpoints_dir} step {reader_a.step}"
  b_name = f"B = {reader_b.paths.checkpoints_dir} step {reader_b.step}"
  lines = [a_name, b_name, "",
           format_table(["name", "max_abs_diff", "relative_l2_diff"],
                        [[d.name, d.max_abs_diff, d.relative_l2_diff] for d in result.diffs])]
  if result.mismatches:
    lines += ["", "shape/dtype mismatches:",
              format_table(["name", "A", "B"], [list(m) for m in result.mismatches])]
  for label, names in (("only in A", result.only_in_a), ("only in B", result.only_in_b)):
    if names:
      lines += ["", f"{label}:"] + [f"  {name}" for name in names]
  identical = sum(1 for d in result.diffs if d.max_abs_diff == 0)
  summary = (f"compared {len(result.diffs)} leaves: {identical} identical, "
             f"{len(result.diffs) - identical} differ")
  if result.diffs:
    worst = max(result.diffs, key=lambda d: d.max_abs_diff)
    summary += f"; max abs diff {worst.max_abs_diff:.6g} ({worst.name})"
  summary += (f"; {len(result.mismatches)} shape/dtype mismatches; "
              f"{len(result.only_in_a)} only in A; {len(result.only_in_b)} only in B")
  return "\n".join(lines + ["", summary])


# ----------------------------------------------------------------------------- metrics


def read_metrics(paths: RunPaths) -> list[dict]:
  """The rows of WORKDIR/metrics.jsonl."""
  if paths.workdir is None or not (paths.workdir / "metrics.jsonl").exists():
    where = paths.workdir or "this path"
    raise InspectError(f"No metrics.jsonl in {where}; --metrics and --plot read the file "
                       "python -m jaxsi.train writes in the run's workdir, so pass that workdir.")
  # Read through epath rather than metrics_writer.read, so gs:// workdirs work too.
  text = (paths.workdir / "metrics.jsonl").read_text()
  return [json.loads(line) for line in text.splitlines() if line.strip()]


def merge_by_step(rows: Sequence[dict]) -> list[dict]:
  """One dict per step (train and eval lines of a step merged), ascending by step."""
  merged: dict[int, dict] = {}
  for row in rows:
    merged.setdefault(int(row["step"]), {}).update(row)
  return [merged[step] for step in sorted(merged)]


def metric_columns(rows: Sequence[dict], requested: Sequence[str] | None) -> list[str]:
  """The columns to show: `requested` (checked), else the defaults present plus eval/*."""
  available = sorted({key for row in rows for key in row if key != "step"})
  if requested:
    unknown = [c for c in requested if c not in available]
    if unknown:
      raise InspectError(f"--columns {','.join(unknown)} not in metrics.jsonl; available "
                         f"columns are {', '.join(available)}.")
    return list(requested)
  return ([c for c in DEFAULT_METRIC_COLUMNS if c in available] +
          [c for c in available if c.startswith("eval/")])


def _as_float(value: Any) -> float | None:
  if value is None:
    return None
  return float(value)  # "nan"/"inf" strings as MetricsWriter stores them parse too


def metrics_view(rows: Sequence[dict], columns: Sequence[str] | None) -> str:
  merged = merge_by_step(rows)
  chosen = metric_columns(merged, columns)
  table = [[row["step"]] + [_as_float(row.get(c)) for c in chosen] for row in merged]
  return format_table(["step"] + chosen, table)


def plot_metrics(rows: Sequence[dict], out_path: str) -> None:
  """Writes a PNG: train loss by step, and every eval/ metric by step when there are any."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")  # no display needed
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  merged = merge_by_step(rows)
  loss = [(r["step"], _as_float(r["train/loss"])) for r in merged if "train/loss" in r]
  eval_names = sorted({k for r in merged for k in r if k.startswith("eval/")})
  if not loss and not eval_names:
    raise InspectError("metrics.jsonl has no train/loss or eval/ values to plot yet; "
                       "wait for the first logged step.")
  panels = int(bool(loss)) + int(bool(eval_names))
  figure, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
  axes = list(axes[0])
  if loss:
    ax = axes.pop(0)
    ax.plot(*zip(*loss), label="train/loss")
    ax.set(title="train loss", xlabel="step", ylabel="loss")
    ax.grid(alpha=0.3)
  if eval_names:
    ax = axes.pop(0)
    for name in eval_names:
      points = [(r["step"], _as_float(r[name])) for r in merged if name in r]
      ax.plot(*zip(*points), marker="o", label=name)
    ax.set(title="eval", xlabel="step")
    ax.legend()
    ax.grid(alpha=0.3)
  figure.tight_layout()
  try:
    figure.savefig(out_path, format="png", dpi=100)
  except OSError as e:
    raise InspectError(f"--plot {out_path!r} cannot be written ({e.strerror}); pass a path in "
                       "a writable directory.") from None
  finally:
    plt.close(figure)


# ----------------------------------------------------------------------------- sampling


def sample_text(reader: CheckpointReader, prompt: str, max_new_tokens: int | None = None) -> str:
  """Greedy-decodes `prompt` (`jaxsi.sampling.greedy`) with the checkpoint's params on the CPU.

  The model comes from the stored config; the prompt is tokenized with the task's tokenizer
  the way tasks frame prompts (BOS when the tokenizer has one, EOS when `data.prompt_eos`) and
  left-padded to `data.max_prompt_len`, exactly like an eval batch.
  """
  # Imported here: the model and tokenizer stack is only needed by this view.
  from jaxsi import models  # pylint: disable=g-import-not-at-top
  from jaxsi import sampling  # pylint: disable=g-import-not-at-top
  from jaxsi.data import batching, tokenizers  # pylint: disable=g-import-not-at-top

  config = reader.side_item("config")
  if "model" not in config or "data" not in config:
    raise InspectError(f"The config stored at step {reader.step} has no model/data section; "
                       "--sample needs a checkpoint written by python -m jaxsi.train.")
  data = config["data"]
  lm = models.build(ml_collections.ConfigDict(config["model"]))
  try:
    tokenizer = tokenizers.get_tokenizer(data["tokenizer"])
    ids = tokenizer.encode(prompt, add_bos=tokenizer.bos_id is not None,
                           add_eos=bool(data.get("prompt_eos", False)))
  except ValueError as e:
    raise InspectError(str(e)) from None
  width = int(data["max_prompt_len"])
  if len(ids) > width:
    raise InspectError(f"The prompt has {len(ids)} tokens, more than data.max_prompt_len={width} "
                       "the model was trained with; pass a shorter --sample prompt.")
  batch = batching.pack([ids], max_prompt_len=width, pad_id=tokenizer.pad_id)
  max_new_tokens = max_new_tokens or int(config["eval"]["max_new_tokens"])
  model_max_len = config["model"].get("max_len")
  if config["model"].get("family") == "decoder" and model_max_len and \
      width + max_new_tokens > model_max_len:
    raise InspectError(f"--max_new_tokens {max_new_tokens} plus the prompt width {width} exceeds "
                       f"the model's max_len={model_max_len}; pass --max_new_tokens <= "
                       f"{model_max_len - width}.")
  cpu = jax.local_devices(backend="cpu")[0]
  params = jax.device_put(reader.params(), cpu)
  decode = jax.jit(functools.partial(sampling.greedy, lm, max_new_tokens=max_new_tokens,
                                     eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id))
  out = decode(params, jax.device_put(batch["prompt"], cpu),
               jax.device_put(batch["prompt_mask"], cpu))
  return tokenizer.decode(np.asarray(out.tokens[0]))


# ----------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m jaxsi.inspect", usage=USAGE,
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("path", help="run workdir, its checkpoints/ dir, or one step dir")
  parser.add_argument("--step", type=int, help="step to read (default: the latest)")
  parser.add_argument("--filter", dest="pattern", metavar="RE",
                      help="only leaves whose name matches this regex")
  parser.add_argument("--stats", action="store_true", help="per-leaf statistics (reads arrays)")
  parser.add_argument("--opt_state", action="store_true",
                      help="include optimizer-state leaves in --stats and --diff")
  parser.add_argument("--config", action="store_true", help="print the stored config")
  parser.add_argument("--metrics", action="store_true", help="print metrics.jsonl as a table")
  parser.add_argument("--columns", help="comma-separated metric columns for --metrics")
  parser.add_argument("--plot", metavar="OUT.png", help="write train/eval curves to a PNG")
  parser.add_argument("--sample", metavar="PROMPT", help="greedy-decode PROMPT with the params")
  parser.add_argument("--max_new_tokens", type=int,
                      help="tokens --sample generates (default: eval.max_new_tokens)")
  parser.add_argument("--diff", metavar="OTHER", help="compare with another checkpoint path")
  return parser.parse_args(argv)


def run(args: argparse.Namespace) -> str:
  """Builds the requested views as text; raises InspectError on bad input."""
  if args.max_new_tokens is not None and args.max_new_tokens < 1:
    raise InspectError(f"--max_new_tokens {args.max_new_tokens} is invalid; pass a positive "
                       "integer.")
  only_metrics = (args.metrics or args.plot) and not (
      args.stats or args.config or args.sample is not None or args.diff)
  if only_metrics:
    return "\n\n".join(_metrics_sections(args, resolve_paths(args.path)))
  with CheckpointReader(args.path, args.step) as reader:
    return "\n\n".join(_checkpoint_sections(args, reader))


def _metrics_sections(args: argparse.Namespace, paths: RunPaths) -> list[str]:
  rows = read_metrics(paths)
  sections = []
  if args.metrics:
    columns = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None
    sections.append(metrics_view(rows, columns))
  if args.plot:
    plot_metrics(rows, args.plot)
    sections.append(f"wrote {args.plot}")
  return sections


def _checkpoint_sections(args: argparse.Namespace, reader: CheckpointReader) -> list[str]:
  parts = ("params", "opt_state") if args.opt_state else ("params",)
  sections = []
  if not (args.stats or args.config or args.metrics or args.plot or args.sample is not None
          or args.diff):
    sections.append(describe(reader, args.pattern))
  if args.config:
    sections.append(f"config stored at step {reader.step}:\n" +
                    json.dumps(reader.side_item("config"), indent=2, sort_keys=True))
  if args.stats:
    leaves = select(reader.leaves, parts, args.pattern)
    if not leaves:
      raise InspectError(f"--filter {args.pattern!r} matches no leaf; run without flags to see "
                         "the names.")
    sections.append(stats_view(reader, leaves))
  if args.metrics or args.plot:
    sections.extend(_metrics_sections(args, reader.paths))
  if args.sample is not None:
    sections.append(f"sample at step {reader.step}:\n" +
                    sample_text(reader, args.sample, args.max_new_tokens))
  if args.diff:
    with CheckpointReader(args.diff) as other:
      sections.append(diff_view(reader, other, compare(reader, other, parts, args.pattern)))
  return sections


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  # Inspection is host work: never grab (or wait for) an accelerator another job is using.
  jax.config.update("jax_platforms", "cpu")
  try:
    print(run(args))
  except InspectError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
