"""End to end: the CLI and trainer on the tiny arithmetic config (8 fake devices)."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxsi import checkpoint as checkpoint_lib
from jaxsi import config as config_lib
from jaxsi import metrics_writer
from jaxsi import trainer

CONFIG = "configs/arithmetic_sft.py:tiny"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
  items = [("train.progress", "false")] + [(k, str(v)) for k, v in overrides.items()]
  return config_lib.load(os.path.join(ROOT, CONFIG), items)


def _final_params(workdir):
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  step = ckpt.latest_step()
  state = ckpt._manager.restore(step, args=checkpoint_lib.ocp.args.Composite(
      state=checkpoint_lib.ocp.args.StandardRestore()))["state"]
  ckpt.close()
  return step, state


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("full"))
  metrics = trainer.train(_config(), workdir)
  return workdir, metrics


def test_run_writes_metrics_config_and_checkpoints(full_run):
  workdir, metrics = full_run
  rows = metrics_writer.read(workdir)
  evals = [r for r in rows if "eval/accuracy" in r]
  assert [r["step"] for r in evals] == [4, 8]
  assert 0.0 <= evals[-1]["eval/accuracy"] <= 1.0
  train_rows = [r for r in rows if "train/loss" in r]
  assert [r["step"] for r in train_rows] == [2, 4, 6, 8]
  assert all(np.isfinite(r["train/loss"]) and r["train/tokens_per_s"] > 0 for r in train_rows)
  assert train_rows[-1]["train/loss"] < train_rows[0]["train/loss"]
  assert metrics["eval/accuracy"] == evals[-1]["eval/accuracy"]
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["train"]["steps"] == 8
  assert sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))
                if d.isdigit()) == [4, 8]


def test_interrupted_run_resumes_to_bitwise_equal_params(full_run, tmp_path):
  full_dir, _ = full_run
  workdir = str(tmp_path / "resumed")
  trainer.train(_config(), workdir, stop_at=3)               # "preempted" after step 3
  assert checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints")).latest_step() == 3
  trainer.train(_config(), workdir)                          # the same command again
  step_a, state_a = _final_params(full_dir)
  step_b, state_b = _final_params(workdir)
  assert step_a == step_b == 8
  for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  steps = [r["step"] for r in metrics_writer.read(workdir) if "train/loss" in r]
  assert steps == sorted(set(steps))  # one history, no duplicated rows


def test_eval_mode_restores_and_scores(full_run):
  workdir, metrics = full_run
  result = trainer.evaluate_only(_config(), workdir)
  assert result["eval/accuracy"] == pytest.approx(metrics["eval/accuracy"])


def test_a_workdir_of_another_model_names_the_difference(full_run, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(full_run[0], workdir)
  layers = _config().model.num_layers
  with pytest.raises(config_lib.ConfigError) as error:
    trainer.train(_config(**{"model.num_layers": layers + 1}), workdir)
  message = str(error.value)
  assert message.startswith(f"{workdir}/checkpoints holds the checkpoints of a run with another "
                            "model or optimizer (model.num_layers: "
                            f"{layers} there, {layers + 1} here)"), message
  assert message.endswith(f"--config.init_from={workdir} starts it from those weights if the "
                          "model matches, in either layer layout)."), message


def test_eval_mode_without_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(trainer.TrainingError, match="No checkpoint in .* to evaluate"):
    trainer.evaluate_only(_config(), str(tmp_path / "empty"))


def test_unwritable_workdir_is_a_clear_error(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(trainer.TrainingError, match="is not writable"):
    trainer.train(_config(), str(blocker / "run"))


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "jaxsi.train", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_cli_unknown_key_fails_with_one_sentence(tmp_path):
  result = _cli(f"--config={CONFIG}", f"--workdir={tmp_path}", "--config.no_such_key=1")
  assert result.returncode == 2
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1
  assert lines[0].startswith("error: Unknown config key 'no_such_key'")
  assert "valid keys there are checkpoint, data, eval" in lines[0]
  assert not os.listdir(tmp_path)  # nothing ran


def test_cli_wrong_value_type_fails_with_one_sentence(tmp_path):
  result = _cli(f"--config={CONFIG}", f"--workdir={tmp_path}", "--config.train.steps=many")
  assert result.returncode == 2
  assert result.stderr.strip() == "error: --config.train.steps expects an int, got 'many'."
