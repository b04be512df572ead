"""GKD through the trainer: the stage pipeline, on-policy sampling, and bad teachers."""

import os

import pytest

from jaxsi import config as config_lib
from jaxsi import metrics_writer
from jaxsi import pipeline
from jaxsi import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs/arithmetic_gkd.py:tiny")


def _config(**overrides):
  items = [("train.progress", "false")] + [(k, str(v)) for k, v in overrides.items()]
  return config_lib.load(CONFIG, items)


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("gkd"))
  metrics = pipeline.run(_config(), workdir)
  return workdir, metrics


def test_pipeline_trains_teacher_student_then_distills(pipeline_run):
  workdir, metrics = pipeline_run
  for stage in ("teacher", "student_sft"):
    rows = metrics_writer.read(os.path.join(workdir, stage))
    assert rows[-1]["step"] == 3 and "eval/accuracy" in rows[-1]
  rows = [r for r in metrics_writer.read(workdir) if "train/loss" in r]
  assert [r["step"] for r in rows] == [2, 4]
  for row in rows:  # lam = 1: every step trained on student samples
    assert row["train/on_policy_fraction"] == 1.0
    assert 0.0 < row["train/sampling_time_share"] < 1.0
    assert 1.0 <= row["train/response_length"] <= 4.0
    assert row["train/teacher_nll"] > 0.0
  assert "eval/accuracy" in metrics


def test_teacher_and_student_sft_stages_keep_the_chunked_loss(tmp_path):
  stages = pipeline.stages(_config(**{"objective.vocab_chunk_size": 3}), str(tmp_path))
  assert [s.name for s in stages] == ["teacher", "student_sft", "distill"]
  for stage in stages[:2]:
    assert stage.config.objective.name == "sft"
    assert stage.config.objective.vocab_chunk_size == 3, stage.name
  assert stages[2].config.objective.vocab_chunk_size == 3


def test_rerun_reuses_finished_stages(pipeline_run, capsys):
  workdir, _ = pipeline_run
  stages = pipeline.stages(_config(), workdir)
  assert [s.name for s in stages] == ["teacher", "student_sft", "distill"]
  assert pipeline.finished(stages[0]) and pipeline.finished(stages[1])
  assert stages[2].config.teacher.source == os.path.join(workdir, "teacher")
  assert stages[2].config.init_from == os.path.join(workdir, "student_sft")


def test_supervised_kd_never_samples(pipeline_run, tmp_path):
  workdir, _ = pipeline_run
  config = _config(**{"teacher.source": os.path.join(workdir, "teacher"),
                      "init_from": os.path.join(workdir, "student_sft"),
                      "objective.preset": "supervised_kd"})
  trainer.train(config, str(tmp_path / "kd"))
  rows = [r for r in metrics_writer.read(str(tmp_path / "kd")) if "train/loss" in r]
  assert rows and all(r["train/on_policy_fraction"] == 0.0 for r in rows)


def test_missing_teacher_is_a_clear_error(tmp_path):
  config = _config(**{"teacher.source": str(tmp_path / "nowhere")})
  with pytest.raises(FileNotFoundError, match="neither a jaxsi run"):
    trainer.train(config, str(tmp_path / "run"))


def test_teacher_vocabulary_mismatch_is_a_clear_error(pipeline_run, tmp_path):
  workdir, _ = pipeline_run
  config = _config(**{"teacher.source": os.path.join(workdir, "teacher"),
                      "model.vocab_size": 256})
  with pytest.raises(config_lib.ConfigError, match=r"Teacher vocabulary width 128 .* differs from "
                     r"the student's model.vocab_size=256"):
    trainer.train(config, str(tmp_path / "run"))
