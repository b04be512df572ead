"""python -m jaxsi.inspect on one tiny trained run (8 fake devices, checkpoints at steps 4 and 8)."""

import json
import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from orbax.checkpoint._src.handlers import base_pytree_checkpoint_handler
from orbax.checkpoint._src.serialization import serialization

from jaxsi import checkpoint as checkpoint_lib
from jaxsi import config as config_lib
from jaxsi import inspect as inspect_lib
from jaxsi import metrics_writer
from jaxsi import models
from jaxsi import trainer
from jaxsi.data import tasks
from jaxsi.evals import loop as eval_loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs/arithmetic_sft.py:tiny")


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _restore_state(workdir: str, step: int) -> dict[str, np.ndarray]:
  """The saved TrainState through the project's own checkpoint code: {leaf name: array}."""
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    state = checkpointer._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))["state"]
  finally:
    checkpointer.close()
  return {_path_name(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("inspect_run"))
  config = config_lib.load(CONFIG, [("train.progress", "false")])
  trainer.train(config, workdir)
  return workdir


@pytest.fixture(scope="module")
def saved(run_dir):
  return {step: _restore_state(run_dir, step) for step in (4, 8)}


def _main(capsys, *argv):
  code = inspect_lib.main(list(argv))
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def test_tree_listing_matches_the_saved_params(run_dir, saved, capsys):
  params = {name: array for name, array in saved[8].items() if name.startswith("params/")}
  opt_values = sum(a.size for name, a in saved[8].items() if name.startswith("opt_state/"))
  with inspect_lib.CheckpointReader(run_dir) as reader:
    listed = {leaf.name: leaf for leaf in reader.leaves if leaf.part == "params"}
    assert reader.steps == [4, 8] and reader.step == 8
  assert set(listed) == set(params)
  for name, array in params.items():
    assert listed[name].shape == array.shape and listed[name].dtype == array.dtype
  total = sum(a.size for a in params.values())

  code, out, _ = _main(capsys, run_dir)
  assert code == 0
  assert f"total parameters: {total:,} in {len(params)} leaves" in out
  assert f"optimizer state: {opt_values:,} values" in out
  for name, array in params.items():
    row = next(line for line in out.splitlines() if line.startswith(name + " "))
    assert row.split()[-1] == f"{array.size:,}" and str(tuple(array.shape)) in row
  step_rows = [line.split() for line in out.splitlines() if line[:4].strip() in ("4", "8")]
  assert [row[0] for row in step_rows] == ["4", "8"] and "latest," in step_rows[1]

  code, out, _ = _main(capsys, run_dir, "--filter", "layer_1/mlp/.*kernel")
  kernels = ["params/layer_1/mlp/wi/kernel", "params/layer_1/mlp/wo/kernel"]
  shown = [line.split()[0] for line in out.splitlines() if line.startswith("params/")]
  assert shown == kernels
  assert f"{sum(params[k].size for k in kernels):,} of {total:,} parameters" in out


def test_metadata_view_never_reads_arrays(run_dir, capsys, monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("array data was read")

  for owner, attribute in ((ocp.PyTreeCheckpointHandler, "restore"),
                           (ocp.StandardCheckpointHandler, "restore"),
                           (base_pytree_checkpoint_handler.BasePyTreeCheckpointHandler, "restore"),
                           (serialization, "async_deserialize")):
    monkeypatch.setattr(owner, attribute, refuse)
  code, out, _ = _main(capsys, run_dir)
  assert code == 0 and "total parameters: " in out
  # The same guard stops the views that do read arrays, so it really sits on the read path.
  with pytest.raises(AssertionError, match="array data was read"):
    inspect_lib.main([run_dir, "--stats"])


def test_stats_equal_numpy_on_the_restored_arrays(run_dir, saved, capsys):
  with inspect_lib.CheckpointReader(run_dir) as reader:
    leaves = inspect_lib.select(reader.leaves, ("params", "opt_state"), None)
    stats = inspect_lib.compute_stats(reader, leaves)
  assert set(stats) == {n for n in saved[8] if n.startswith(("params/", "opt_state/"))}
  for name, s in stats.items():
    array = saved[8][name].astype(np.float64)
    np.testing.assert_allclose(s.l2_norm, np.linalg.norm(array.ravel()), rtol=1e-12)
    assert (s.min, s.max) == (array.min(), array.max())
    np.testing.assert_allclose(s.mean, array.mean(), rtol=1e-12, atol=1e-300)
    assert (s.num_nan, s.num_inf, s.size) == (0, 0, array.size)
  # The params' global norm is what the train step logged as param_norm at step 8.
  param_norm = inspect_lib.total_stats([s for n, s in stats.items() if n.startswith("params/")])
  logged = [r for r in metrics_writer.read(run_dir) if r["step"] == 8 and "train/param_norm" in r]
  np.testing.assert_allclose(param_norm.l2_norm, logged[0]["train/param_norm"], rtol=1e-5)

  code, out, _ = _main(capsys, run_dir, "--stats", "--filter", "final_norm/scale")
  scale = saved[8]["params/final_norm/scale"].astype(np.float64)
  row = next(line.split() for line in out.splitlines() if line.startswith("params/"))
  assert code == 0 and row[0] == "params/final_norm/scale"
  assert float(row[2]) == pytest.approx(np.linalg.norm(scale), rel=1e-5)
  assert row[-2:] == ["0", "0"]


def test_leaf_stats_count_nan_and_inf_and_skip_them_in_min_max_mean():
  s = inspect_lib.leaf_stats(np.array([1.0, -2.0, np.nan, np.inf, -np.inf, 4.0], np.float32))
  assert (s.num_nan, s.num_inf, s.size) == (1, 2, 6)
  assert (s.min, s.max, s.mean) == (-2.0, 4.0, 1.0)
  assert np.isnan(s.l2_norm)


def test_config_and_metrics_views(run_dir, capsys):
  code, out, _ = _main(capsys, run_dir, "--config")
  assert code == 0 and out.startswith("config stored at step 8:")
  with open(os.path.join(run_dir, "config.json")) as f:
    assert json.loads(out.split("\n", 1)[1]) == json.load(f)

  code, out, _ = _main(capsys, run_dir, "--metrics")
  lines = out.strip().splitlines()
  assert lines[0].split() == ["step", "train/loss", "train/grad_norm", "train/lr",
                              "train/tokens_per_s", "eval/accuracy"]
  rows = metrics_writer.read(run_dir)
  losses = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
  evals = {r["step"]: r["eval/accuracy"] for r in rows if "eval/accuracy" in r}
  table = [line.split() for line in lines[2:]]
  assert [int(row[0]) for row in table] == [2, 4, 6, 8]
  for row in table:
    assert float(row[1]) == pytest.approx(losses[int(row[0])], rel=1e-5)
  assert float(table[-1][-1]) == pytest.approx(evals[8]) and len(table[0]) == 5  # no eval at 2

  code, out, _ = _main(capsys, run_dir, "--metrics", "--columns", "eval/accuracy")
  assert [line.split() for line in out.strip().splitlines()][0] == ["step", "eval/accuracy"]
  code, _, err = _main(capsys, run_dir, "--metrics", "--columns", "train/nope")
  assert code == 1 and "train/nope" in err and "train/loss" in err


def test_plot_writes_a_png(run_dir, tmp_path, capsys):
  out_path = tmp_path / "curves.png"
  code, out, _ = _main(capsys, run_dir, "--plot", str(out_path))
  assert code == 0 and f"wrote {out_path}" in out
  data = out_path.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_sample_reproduces_the_eval_prediction(run_dir, saved, capsys):
  with open(os.path.join(run_dir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  task = tasks.get_task(config.data)
  lm = models.build(config.model)
  example = task.eval_examples(1)[0]
  decode = eval_loop.make_decoder(lm, max_new_tokens=config.eval.max_new_tokens,
                                  eos_id=task.tokenizer.eos_id, pad_id=task.tokenizer.pad_id)
  params = {}
  for name, array in saved[8].items():
    if name.startswith("params/"):
      node = params
      *parents, leaf = name.split("/")[1:]
      for key in parents:
        node = node.setdefault(key, {})
      node[leaf] = array
  batch = task.pack([example], with_response=False)
  out = decode(params, batch["prompt"], batch["prompt_mask"], jax.random.PRNGKey(0), 0.0)
  expected = task.tokenizer.decode(np.asarray(out.tokens[0]))

  code, out, _ = _main(capsys, run_dir, "--sample", example.prompt_text)
  header, text = out.rstrip("\n").split("\n", 1)
  assert code == 0 and header == "sample at step 8:"
  assert text == expected

  code, _, err = _main(capsys, run_dir, "--sample", "x" * 200)
  assert code == 1 and "max_prompt_len=29" in err


def test_diff_with_itself_and_with_another_step(run_dir, saved, capsys):
  step_4 = os.path.join(run_dir, "checkpoints", "4")
  with inspect_lib.CheckpointReader(run_dir) as a, inspect_lib.CheckpointReader(run_dir) as b:
    same = inspect_lib.compare(a, b, ("params", "opt_state"), None)
  assert same.diffs and all(d.max_abs_diff == 0 and d.relative_l2_diff == 0 for d in same.diffs)
  assert not (same.mismatches or same.only_in_a or same.only_in_b)

  with inspect_lib.CheckpointReader(run_dir) as a, inspect_lib.CheckpointReader(step_4) as b:
    assert b.step == 4
    result = inspect_lib.compare(a, b, ("params",), None)
  for d in result.diffs:
    a8, a4 = saved[8][d.name].astype(np.float64), saved[4][d.name].astype(np.float64)
    assert d.max_abs_diff == np.max(np.abs(a8 - a4))
    np.testing.assert_allclose(d.relative_l2_diff,
                               np.linalg.norm(a8 - a4) / np.linalg.norm(a8), rtol=1e-12)
  overall = max(np.max(np.abs(saved[8][n] - saved[4][n]).astype(np.float64))
                for n in saved[8] if n.startswith("params/"))
  assert overall > 0

  code, out, _ = _main(capsys, run_dir, "--diff", step_4)
  summary = out.strip().splitlines()[-1]
  assert code == 0 and summary.startswith(f"compared {len(result.diffs)} leaves: 0 identical")
  assert f"max abs diff {overall:.6g}" in summary


def test_diff_reports_missing_and_mismatched_leaves():
  a = inspect_lib.leaves_of({"params": {"w": jax.ShapeDtypeStruct((2, 3), np.float32),
                                        "b": jax.ShapeDtypeStruct((3,), np.float32)}})
  b = inspect_lib.leaves_of({"params": {"w": jax.ShapeDtypeStruct((3, 2), np.float32),
                                        "c": jax.ShapeDtypeStruct((3,), np.float32)}})

  class FakeReader:
    def __init__(self, leaves):
      self.leaves = leaves

    def iter_arrays(self, leaves):
      return iter([])

  result = inspect_lib.compare(FakeReader(a), FakeReader(b), ("params",), None)
  assert result.mismatches == [("params/w", "(2, 3) float32", "(3, 2) float32")]
  assert (result.only_in_a, result.only_in_b, result.diffs) == (["params/b"], ["params/c"], [])


def test_bad_paths_and_steps_fail_with_one_sentence(run_dir, tmp_path, capsys):
  def error(*argv):
    code, out, err = _main(capsys, *argv)
    assert code == 1 and out == "" and err.startswith("error: ")
    assert err.count("\n") == 1 and err.rstrip().endswith(".")
    return err

  missing = str(tmp_path / "nope")
  assert f"Path {missing!r} does not exist" in error(missing)
  assert "holds no jaxsi checkpoint" in error(str(tmp_path))
  assert "Step 5 is not in" in error(run_dir, "--step", "5") and "4, 8" in error(run_dir, "--step", "5")
  assert "disagrees with the step directory" in error(
      os.path.join(run_dir, "checkpoints", "8"), "--step", "4")
  assert "not a valid regular expression" in error(run_dir, "--filter", "(")
  assert "matches no leaf" in error(run_dir, "--stats", "--filter", "no_such_leaf")
