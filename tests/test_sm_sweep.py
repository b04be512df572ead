"""The SequenceMatch sweep: arm configs, tables, and a tiny end-to-end sweep that is reused."""

import json
import os
import statistics

import pytest

from jaxsi import config as config_lib
from jaxsi import metrics_writer
from jaxsi import trainer
from jaxsi.tools import sm_sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs/arithmetic_sm.py:tiny")


@pytest.fixture(scope="module")
def main_config():
  return config_lib.load(os.path.join(ROOT, "configs/arithmetic_sm.py:small"))


def test_arm_configs_differ_only_in_the_objective(main_config):
  mle = sm_sweep.arm_config(main_config, "mle", 0.0, seed=2)
  bc = sm_sweep.arm_config(main_config, "bc", 0.1, seed=2)
  sm = sm_sweep.arm_config(main_config, "sm", 0.2, seed=2)
  assert mle.objective.name == "sft"
  assert (bc.objective.noise_prob, bc.objective.bc_steps) == (0.1, main_config.train.steps)
  assert (sm.objective.noise_prob, sm.objective.bc_steps) == (
      0.2, main_config.objective.bc_steps)
  for run in (mle, bc, sm):
    assert run.seed == 2 and tuple(run.eval.temperatures) == (0.0, 1.0)
    for section in ("model", "data", "optim"):
      assert run[section].to_dict() == main_config[section].to_dict()
    assert run.train.steps == main_config.train.steps
    assert run.train.batch_size == main_config.train.batch_size
  assert [name for name, _, _ in sm_sweep.arms(["sm", "mle", "bc"], [0.0, 0.1])] == [
      "mle", "bc_noise0", "bc_noise0.1", "sm_noise0", "sm_noise0.1"]
  assert sm_sweep.describe("sm_noise0.1") == "SequenceMatch, noise 0.1"


def test_text_tables_report_mean_and_sample_std():
  values = {f"eval/{key}{suffix}": [0.5, 0.7] for _, key in sm_sweep.TEXT_COLUMNS
            for suffix in ("", "_t1")}
  table = sm_sweep.text_tables({"data": {k: [v[0]] for k, v in values.items()},
                                "mle": values}).splitlines()
  std = statistics.stdev([0.5, 0.7])
  assert table[0] == "Generations, temperature-1 sampling:"
  assert table[4].startswith("| data (held-out continuations) | 0.500 | 0.500 |")
  assert table[4].endswith("| 0.5 | — |")
  assert table[5].startswith(f"| MLE, no backspace (SFT) | 0.600 ± {std:.3f} |")
  assert table[5].endswith(f"| 0.6 ± {std:.1f} | 2 |")
  assert "Generations, greedy decoding:" in table


def test_tiny_sweep_runs_every_arm_forks_sm_from_bc_and_is_reused(tmp_path, capsys,
                                                                  monkeypatch):
  monkeypatch.setenv("JAXSI_PEAK_FLOPS", "0")  # no MFU: skips the matmul peak measurement
  workdir = str(tmp_path)
  argv = [f"--config={CONFIG}", f"--workdir={workdir}", "--seeds=0", "--noise=0.2",
          "--methods=bc,sm",
          "--compilation_cache=", "--config.train.progress=false",
          "--config.train.checkpoint_every=0", "--config.eval.num_examples=8",
          "--config.eval.batch_size=8"]
  assert sm_sweep.main(argv) == 0
  table = open(os.path.join(workdir, "results.md")).read()
  assert table in capsys.readouterr().out
  lines = table.splitlines()
  assert lines[0].startswith("| model / method | greedy accuracy (%)")
  assert [line.split(" | ")[0] for line in lines[2:4]] == [
      "| BC, noise 0.2", "| SequenceMatch, noise 0.2"]
  assert lines[-1].startswith("CPU time: ") and lines[-1].endswith("for the 2 runs "
                                                                   "(sum of each run's "
                                                                   "time.process_time).")
  results = json.load(open(os.path.join(workdir, "results.json")))
  assert results["cpu_minutes"]["num_runs"] == 2 and results["cpu_minutes"]["runs"] > 0
  record = json.load(open(os.path.join(workdir, "sm_noise0.2/seed0/sweep.json")))
  assert record["finished"] and record["forked_from"].endswith("seed0 at step 2")
  assert results["rows"]["sm_noise0.2"]["eval/accuracy"] == [record["metrics"]["eval/accuracy"]]
  # The SM run resumed at the fork: its history holds the BC run's first two steps.
  rows = metrics_writer.read(os.path.join(workdir, "sm_noise0.2/seed0"))
  bc_rows = metrics_writer.read(os.path.join(workdir, "bc_noise0.2/seed0"))
  assert [r for r in rows if r["step"] <= 2] == [r for r in bc_rows if r["step"] <= 2]
  assert max(r["step"] for r in rows) == 6

  # A rerun trains nothing and prints the same table.
  def no_training(*args, **kwargs):
    raise AssertionError("a finished run was trained again")
  monkeypatch.setattr(trainer, "train", no_training)
  assert sm_sweep.main(argv) == 0
  assert table in capsys.readouterr().out
  # A changed config is refused rather than mixed into the old runs.
  with pytest.raises(ValueError, match="first difference: optim.lr"):
    sm_sweep.main(argv + ["--config.optim.lr=0.5"])
