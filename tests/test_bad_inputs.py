"""Every bad input ends in one clear sentence, and a failing run never loses a good checkpoint.

The README's "Bad inputs" table quotes these messages; keep them in sync.
"""

import os

import pytest

from jaxsi import checkpoint as checkpoint_lib
from jaxsi import config as config_lib
from jaxsi import pipeline
from jaxsi import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(spec="configs/arithmetic_sft.py:tiny", **overrides):
  items = [("train.progress", "false")] + [(k, str(v)) for k, v in overrides.items()]
  return config_lib.load(os.path.join(ROOT, spec), items)


def _one_sentence(message: str) -> None:
  assert "\n" not in message and message.endswith(".")


def test_unknown_config_key():
  with pytest.raises(config_lib.ConfigError) as err:
    _config(no_such_key=1)
  assert str(err.value).startswith("Unknown config key 'no_such_key'")
  _one_sentence(str(err.value))


def test_wrong_value_type():
  with pytest.raises(config_lib.ConfigError, match=r"--config.optim.lr expects a float, got 'fast'."):
    _config(**{"optim.lr": "fast"})


def test_missing_teacher_checkpoint(tmp_path):
  config = _config("configs/arithmetic_gkd.py:tiny", **{"teacher.source": str(tmp_path / "gone")})
  with pytest.raises(FileNotFoundError) as err:
    trainer.train(config, str(tmp_path / "run"))
  assert "is neither a jaxsi run (no checkpoints/) nor a Hugging Face checkpoint" in str(err.value)
  _one_sentence(str(err.value))


def test_teacher_workdir_without_checkpoint(tmp_path):
  (tmp_path / "teacher" / "checkpoints").mkdir(parents=True)
  config = _config("configs/arithmetic_gkd.py:tiny",
                   **{"teacher.source": str(tmp_path / "teacher")})
  with pytest.raises(FileNotFoundError, match="has no checkpoint; train it first"):
    trainer.train(config, str(tmp_path / "run"))


def test_missing_init_from(tmp_path):
  config = _config(init_from=str(tmp_path / "nothing_here"))
  with pytest.raises(FileNotFoundError, match="is neither a jaxsi run"):
    trainer.train(config, str(tmp_path / "run"))


def test_no_teacher_and_no_teacher_steps(tmp_path):
  config = _config("configs/arithmetic_gkd.py:tiny", **{"pipeline.teacher_steps": 0})
  with pytest.raises(ValueError, match=r"teacher.source is empty and pipeline.teacher_steps is 0"):
    pipeline.run(config, str(tmp_path / "run"))


def test_model_too_small_for_the_tokenizer(tmp_path):
  with pytest.raises(config_lib.ConfigError,
                     match=r"The tokenizer has 98 tokens but model.vocab_size is 64"):
    trainer.train(_config(**{"model.vocab_size": 64}), str(tmp_path / "run"))


def test_empty_dataset(tmp_path):
  with pytest.raises(config_lib.ConfigError, match=r"The eval set of task 'arithmetic' is empty"):
    trainer.train(_config(**{"eval.num_examples": 0}), str(tmp_path / "run"))


def test_empty_tfds_split(tmp_path):
  config = _config("configs/xsum_sft.py:tiny", **{"data.mock_num_examples": 0})
  with pytest.raises(ValueError, match=r"Split '.*' of TFDS dataset 'xsum' is empty"):
    trainer.train(config, str(tmp_path / "run"))


def test_sequence_longer_than_the_model_allows(tmp_path):
  with pytest.raises(config_lib.ConfigError) as err:
    trainer.train(_config(**{"model.max_len": 16}), str(tmp_path / "run"))
  assert "Prompt + response need 33 positions" in str(err.value)
  assert "model.max_len=16" in str(err.value)
  _one_sentence(str(err.value))


def test_batch_not_divisible_by_the_mesh(tmp_path):
  with pytest.raises(config_lib.ConfigError, match=r"train.batch_size=12 must be divisible by the "
                     r"data x fsdp mesh size \(8\)"):
    trainer.train(_config(**{"train.batch_size": 12}), str(tmp_path / "run"))


def test_unwritable_workdir(tmp_path):
  (tmp_path / "file").write_text("x")
  with pytest.raises(trainer.TrainingError, match=r"is not writable .*; pass --workdir="):
    trainer.train(_config(), str(tmp_path / "file" / "run"))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  workdir = str(tmp_path / "run")
  # A sane first stretch that checkpoints at step 4 ...
  trainer.train(_config(), workdir, stop_at=4)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  assert checkpoint_lib.Checkpointer(ckpt_dir).all_steps() == [4]
  # ... then an absurd learning rate blows the loss up; the run stops, step 4 survives.
  config = _config(**{"optim.lr": 1e30})
  with pytest.raises(trainer.TrainingError) as err:
    trainer.train(config, workdir)
  message = str(err.value)
  assert message.startswith("The loss became")
  assert "The last good checkpoint (step 4) is kept" in message
  _one_sentence(message)
  assert checkpoint_lib.Checkpointer(ckpt_dir).all_steps() == [4]
