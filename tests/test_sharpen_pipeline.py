"""SFT-Sharpening end to end: base SFT, the generate stage, SFT on it, the best-of-N eval."""

import os

import numpy as np
import pytest

from jaxsi import config as config_lib
from jaxsi import metrics_writer
from jaxsi import pipeline
from jaxsi import pretrained
from jaxsi import sharpen_data
from jaxsi.data import tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs/arithmetic_sharpen.py:tiny")


def _config(**overrides):
  items = [("train.progress", "false"), ("checkpoint.async_save", "false")]
  return config_lib.load(CONFIG, items + [(k, str(v)) for k, v in overrides.items()])


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("sharpen"))
  metrics = pipeline.run(_config(), workdir)
  return workdir, metrics


def test_stages_are_base_generate_sharpen(tmp_path):
  config = _config()
  workdir = str(tmp_path)
  base, generate, sharpen = pipeline.stages(config, workdir)
  assert [(s.name, s.kind) for s in (base, generate, sharpen)] == [
      ("base", "train"), ("generate", "generate"), ("sharpen", "train")]
  assert base.workdir == os.path.join(workdir, "base")
  assert base.config.objective.name == "sft" and base.config.train.steps == 3
  assert base.config.data.to_dict() == config.data.to_dict()
  assert base.config.optim.lr == config.pipeline.base_lr
  assert generate.config is sharpen.config and sharpen.workdir == workdir
  main = sharpen.config
  assert main.base.source == main.init_from == base.workdir
  assert main.data.name == "sharpened"
  assert main.data.path == os.path.join(workdir, "sharpen_data")
  assert main.data.base.to_dict() == config.data.to_dict()
  assert main.objective.to_dict() == config.objective.to_dict()


def test_the_base_stage_keeps_the_chunked_loss(tmp_path):
  base = pipeline.stages(_config(**{"objective.vocab_chunk_size": 2}), str(tmp_path))[0]
  assert base.config.objective.name == "sft" and base.config.objective.vocab_chunk_size == 2


def test_a_given_base_or_dataset_skips_those_stages(tmp_path):
  stages = pipeline.stages(_config(**{"base.source": "/models/b"}), str(tmp_path))
  assert [s.name for s in stages] == ["generate", "sharpen"]
  assert stages[-1].config.init_from == stages[-1].config.base.source == "/models/b"
  stages = pipeline.stages(_config(init_from="/models/c"), str(tmp_path))
  assert stages[-1].config.base.source == "/models/c"
  # The rlhf mode samples inside the loop: one stage from the base.
  stages = pipeline.stages(_config(**{"objective.mode": "rlhf", "base.source": "/b"}),
                           str(tmp_path))
  assert [s.name for s in stages] == ["sharpen"]
  assert stages[0].config.data.name == "arithmetic"


def test_no_base_and_no_base_steps_is_one_sentence(tmp_path):
  with pytest.raises(ValueError, match=r"base.source and init_from are empty and "
                     r"pipeline.base_steps is 0"):
    pipeline.run(_config(**{"pipeline.base_steps": 0}), str(tmp_path))


def test_pipeline_trains_generates_sharpens_and_evaluates(pipeline_run):
  workdir, metrics = pipeline_run
  config = _config()
  # base: an SFT run of its own
  assert pretrained.stored_config(os.path.join(workdir, "base"))[0] == 3
  # generate: the best of N = 4 samples of the base for each of the 24 first train prompts
  data = sharpen_data.read_dataset(os.path.join(workdir, "sharpen_data"))
  np.testing.assert_array_equal(data["index"], np.arange(24))
  np.testing.assert_array_equal(data["num_samples"], 4)
  assert sharpen_data.read_meta(os.path.join(workdir, "sharpen_data"))["base"] == os.path.join(
      workdir, "base")
  task = tasks.get_task(config.data)
  np.testing.assert_array_equal(data["prompt"][:16], task.train_batch(0, 16)["prompt"])
  assert np.all(data["score"] >= data["sample_score"] - 1e-5)
  # sharpen: SFT from the base on the sharpened task, in WORKDIR
  step, stored = pretrained.stored_config(workdir)
  assert step == 4 and stored.data.name == "sharpened"
  assert stored.init_from == os.path.join(workdir, "base")
  rows = metrics_writer.read(workdir)
  generated = [r for r in rows if "sharpen_data/bon_reward" in r]
  assert len(generated) == 1 and generated[0]["step"] == 0
  assert generated[0]["sharpen_data/bon_reward"] == pytest.approx(float(data["score"].mean()))
  assert [r["step"] for r in rows if "train/loss" in r] == [2, 4]
  # the best-of-N eval of the sharpened model and of the base, once, at the final step
  bon_rows = [r for r in rows if any(k.startswith("eval/bon") for k in r)]
  assert len(bon_rows) == 1 and bon_rows[0]["step"] == 4
  row = bon_rows[0]
  for prefix in ("eval/bon/", "eval/bon_base/"):
    for n in (1, 2, 4):
      assert f"{prefix}accuracy_bon{n}" in row and f"{prefix}accuracy_bon{n}_norm" in row
      assert 0.0 <= row[f"{prefix}coverage{n}"] <= 1.0
    assert row[f"{prefix}num_examples"] == 16
    assert row[f"{prefix}reward_bon4"] >= row[f"{prefix}reward_bon1"] - 1e-5
  assert row["eval/bon_train/num_examples"] == 8
  # the base scored by itself: its greedy answers' log-likelihood is the base's own
  assert row["eval/bon_base/base_log_likelihood_greedy"] == pytest.approx(
      row["eval/bon_base/log_likelihood_greedy"], abs=1e-4)
  # greedy accuracy agrees with the trainer's own eval loop (same 16 examples)
  assert row["eval/bon/accuracy_greedy"] == pytest.approx(metrics["eval/accuracy"])
  assert metrics["eval/bon/accuracy_bon4"] == pytest.approx(row["eval/bon/accuracy_bon4"])


def test_rerun_reuses_every_stage(pipeline_run, capsys):
  workdir, metrics = pipeline_run
  chunk = sharpen_data.chunk_path(os.path.join(workdir, "sharpen_data"), 0)
  written = os.path.getmtime(chunk)
  again = pipeline.run(_config(), workdir)
  out = capsys.readouterr().out
  assert "base: finished" in out and "best-of-N eval, base:" in out
  assert os.path.getmtime(chunk) == written
  rows = metrics_writer.read(workdir)
  assert len([r for r in rows if any(k.startswith("eval/bon") for k in r)]) == 1
  assert len([r for r in rows if "sharpen_data/bon_reward" in r]) == 1
  assert again["eval/bon/accuracy_bon2"] == metrics["eval/bon/accuracy_bon2"]


def test_changed_generate_settings_are_refused(pipeline_run):
  workdir, _ = pipeline_run
  with pytest.raises(ValueError, match=r"already holds a sharpen dataset made with n=4, but "
                     r"this run asks for n=8"):
    pipeline.run(_config(**{"objective.n": 8}), workdir)


def test_sweep_tables_report_mean_and_sample_std():
  from jaxsi.tools import sharpen_sweep
  run = lambda offset: {"eval/bon/accuracy_greedy": 0.5 + offset,
                        "eval/bon/accuracy_sampled": 0.3,
                        "eval/bon_train/base_log_likelihood_greedy": -1.0 - offset,
                        "eval/bon_base/accuracy_greedy": 0.4, "eval/bon_base/accuracy_sampled": 0.2,
                        "eval/bon_base/accuracy_bon2": 0.3 + offset,
                        "eval/bon_base/accuracy_bon2_norm": 0.35, "eval/bon_base/coverage2": 0.6,
                        "eval/bon_base/length_bon2": 2.0, "eval/bon_base/length_bon2_norm": 3.0,
                        "eval/accuracy": 0.5}
  per_seed = {0: {"sum": run(0.0)}, 1: {"sum": run(0.1)}, 2: {"sum": run(0.2)}}
  rows = sharpen_sweep.collect(per_seed, ["sum"])
  assert rows["sum"]["bon/accuracy_greedy"] == pytest.approx([0.5, 0.6, 0.7])
  assert rows["base"]["bon/accuracy_bon2"] == pytest.approx([0.3, 0.4, 0.5])
  assert "accuracy" not in rows["sum"]
  table = sharpen_sweep.markdown_tables(rows, (2,), 3).splitlines()
  assert table[0].startswith("Inference-time sharpening of the base (held-out prompts, 3 seed(s)):"
                             " greedy 40.0 ± 0.0 %, temperature-1 sampling 20.0 ± 0.0 %.")
  assert table[4] == "| 2 | 40.0 ± 10.0 | 35.0 ± 0.0 | 60.0 ± 0.0 | 2.00 / 3.00 |"
  sharpened = [line for line in table if line.startswith("| SFT-Sharpening, best-of-N by log")]
  assert sharpened[0].startswith("| SFT-Sharpening, best-of-N by log π_base(y\\|x) | "
                                 "60.0 ± 10.0 | 30.0 ± 0.0 | — | — | -1.100 ± 0.100 |")


def test_sweep_variant_configs_share_the_base():
  from jaxsi.tools import sharpen_sweep
  config = _config()
  run = sharpen_sweep.variant_config(config, "norm", 3, "/runs/seed3/base", with_base=False)
  assert run.objective.normalize is True and run.seed == 3
  assert run.base.source == "/runs/seed3/base" and run.init_from == ""
  assert run.eval.best_of_n.with_base is False
  stages = pipeline.stages(run, "/runs/seed3/norm")
  assert [s.name for s in stages] == ["generate", "sharpen"]
  assert stages[-1].config.init_from == "/runs/seed3/base"
