"""Every experiment config in configs/ loads in every variant; the SFT configs carry the paper's
settings and their tiny variants build offline."""

import importlib.util
import pathlib

import pytest

from jaxsi import config as config_lib
from jaxsi import models
from jaxsi.data import tasks

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"
CONFIG_FILES = sorted(CONFIG_DIR.glob("*.py"))
SFT_CONFIGS = ("xsum_sft", "wmt_sft", "gsm8k_sft")


def _variants(path):
  """The module-level VARIANTS of a config file; files without one are loaded as they are."""
  spec = importlib.util.spec_from_file_location("variants_of_" + path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return getattr(module, "VARIANTS", ("",))


CASES = [(path, variant) for path in CONFIG_FILES for variant in _variants(path)]


def _load(name, variant=""):
  return config_lib.load(f"{CONFIG_DIR / name}.py" + (f":{variant}" if variant else ""))


def test_the_sft_configs_are_discovered():
  assert {path.stem for path in CONFIG_FILES} >= set(SFT_CONFIGS)


@pytest.mark.parametrize("path, variant", CASES,
                         ids=[f"{path.stem}:{variant}" for path, variant in CASES])
def test_every_config_variant_loads_and_builds_its_model(path, variant):
  config = config_lib.load(f"{path}:{variant}" if variant else str(path))
  assert {"model", "data", "optim", "objective", "train", "eval", "checkpoint"} <= set(config)
  with pytest.raises(AttributeError):
    config.not_a_key = 1  # locked
  # No stray or missing data keys: the task's own defaults define the section.
  assert set(config.data) == set(tasks.default_data_config(config.data.name))
  assert models.build(config.model).vocab_size == config.model.vocab_size


@pytest.mark.parametrize("name", SFT_CONFIGS)
def test_unknown_variant_lists_the_variants(name):
  with pytest.raises(ValueError, match=rf"Unknown variant 't5_huge' of {name}\.py; choose from "
                     r"t5_small, t5_base, t5_large, t5_xl, tiny\."):
    _load(name, "t5_huge")


@pytest.mark.parametrize("name, task, lengths, steps, warmup, best", [
    ("xsum_sft", "xsum", (1024, 64), 40_000, 2_000, "eval/rouge2"),
    ("wmt_sft", "wmt14_translate/de-en", (80, 80), 100_000, 5_000, "eval/bleu"),
    ("gsm8k_sft", "gsm8k", (512, 320), 5_000, 500, "eval/accuracy"),
])
def test_full_size_variants_carry_the_paper_settings(name, task, lengths, steps, warmup, best):
  default = _load(name)
  assert default.model.d_model == _load(name, "t5_small").model.d_model == 512
  for size, d_model in (("t5_base", 768), ("t5_large", 1024), ("t5_xl", 2048)):
    config = _load(name, size)
    assert config.model.d_model == d_model
    assert config.data.tokenizer.startswith("google/") and size[3:] in config.data.tokenizer
  config = _load(name, "t5_large")
  assert config.data.name == task and config.data.mock is False
  assert (config.data.max_prompt_len, config.data.max_response_len) == lengths
  assert config.eval.max_new_tokens == lengths[1]
  assert (config.train.batch_size, config.optim.name, config.optim.lr) == (32, "adafactor", 3e-4)
  assert (config.train.steps, config.optim.total_steps) == (steps, steps)
  assert config.optim.warmup_steps == warmup and config.optim.schedule == "constant"
  assert config.model.dropout_rate == 0.0 and config.model.num_real_tokens == 32100
  assert config.checkpoint.best_metric == best


@pytest.mark.parametrize("name", SFT_CONFIGS)
def test_tiny_variants_build_their_task_offline_and_fit_the_model(name):
  config = _load(name, "tiny")
  assert config.data.mock and config.data.tokenizer == "char"
  task = tasks.get_task(config.data)
  assert task.tokenizer.vocab_size <= config.model.vocab_size
  assert "eval/" + task.headline_metric == config.checkpoint.best_metric
  batch = task.train_batch(config.train.steps - 1, config.train.batch_size)
  assert batch["prompt"].shape == (config.train.batch_size, config.data.max_prompt_len)
  assert batch["response"].shape == (config.train.batch_size, config.data.max_response_len)
  assert len(task.eval_examples(config.eval.num_examples)) == config.eval.num_examples
