"""A jaxsi-trained checkpoint exported to Hugging Face loads in transformers; init_from works."""

import os

import jax
import numpy as np
import pytest
import torch
import transformers

from jaxsi import config as config_lib
from jaxsi import export
from jaxsi import pretrained
from jaxsi import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(spec, **overrides):
  items = [("train.progress", "false")] + [(k, str(v)) for k, v in overrides.items()]
  return config_lib.load(os.path.join(ROOT, spec), items)


@pytest.fixture(scope="module")
def t5_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("t5run"))
  config = _load("configs/xsum_sft.py:tiny", **{"train.steps": 2, "train.eval_every": 0,
                                                 "train.checkpoint_every": 0,
                                                 "eval.at_end": False})
  trainer.train(config, workdir)
  return workdir


def test_trained_t5_exports_and_loads_in_transformers(t5_run, tmp_path):
  out = str(tmp_path / "hf")
  assert export.main([t5_run, out]) == 0
  lm, params, config = pretrained.load_workdir(t5_run)
  # training moved the weights away from a fresh init, so this is a trained checkpoint
  fresh = lm.init(jax.random.PRNGKey(config.seed))
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params),
                                                      jax.tree.leaves(fresh)))
  hf = transformers.T5ForConditionalGeneration.from_pretrained(out).eval()
  rng = np.random.default_rng(0)
  prompt = rng.integers(3, 90, size=(2, 7)).astype(np.int32)
  prompt_mask = np.ones_like(prompt)
  prompt_mask[1, :3] = 0                      # left padding
  response = rng.integers(3, 90, size=(2, 5)).astype(np.int32)
  batch = {"prompt": prompt, "prompt_mask": prompt_mask, "response": response,
           "response_mask": np.ones_like(response)}
  ours = np.asarray(lm.logits(params, batch))
  decoder_input = np.concatenate([np.zeros((2, 1), np.int32), response[:, :-1]], axis=1)
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(prompt, dtype=torch.long),
                attention_mask=torch.tensor(prompt_mask, dtype=torch.long),
                decoder_input_ids=torch.tensor(decoder_input, dtype=torch.long)).logits.numpy()
  width = min(ours.shape[-1], theirs.shape[-1])
  np.testing.assert_allclose(ours[..., :width], theirs[..., :width], atol=1e-4, rtol=1e-4)


def test_export_of_a_non_run_is_a_clear_error(tmp_path, capsys):
  assert export.main([str(tmp_path), str(tmp_path / "out")]) == 2
  assert "is not a jaxsi run directory" in capsys.readouterr().err


def test_init_from_hf_directory_starts_from_those_weights(tmp_path):
  source_run = str(tmp_path / "a")
  trainer.train(_load("configs/arithmetic_sft.py:tiny", **{"train.steps": 3,
                                                           "eval.at_end": False}), source_run)
  hf_dir = str(tmp_path / "hf")
  assert export.main([source_run, hf_dir]) == 0
  _, exported, _ = pretrained.load_workdir(source_run)

  config = _load("configs/arithmetic_sft.py:tiny", init_from=hf_dir)
  run = trainer.setup(config, str(tmp_path / "b"))
  state, step = trainer.restore_or_init(run)
  assert step == 0
  for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  run.checkpointer.close()


def test_init_from_mismatched_model_names_the_leaf(tmp_path):
  source_run = str(tmp_path / "a")
  trainer.train(_load("configs/arithmetic_sft.py:tiny", **{"train.steps": 3,
                                                           "eval.at_end": False}), source_run)
  config = _load("configs/arithmetic_sft.py:tiny", init_from=source_run, **{"model.d_ff": 96})
  run = trainer.setup(config, str(tmp_path / "b"))
  with pytest.raises(config_lib.ConfigError, match=r"Parameter \['layer_0'\]\['mlp'\]\['wi'\]\['bias'\] from .* has shape "
                     r"\(64,\) but the configured model expects \(96,\)"):
    trainer.restore_or_init(run)
  run.checkpointer.close()
