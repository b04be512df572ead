"""The SFT-Sharpening generate stage (resumable, host-sharded shards) and the "sharpened" task."""

import dataclasses
import os

import jax
import numpy as np
import pytest

from jaxsi import sharpen_data
from jaxsi.data import sharpened
from jaxsi.data import tasks
from jaxsi.models import decoder
from jaxsi.objectives import sharpening

SETTINGS = sharpen_data.GenerateSettings(num_prompts=10, chunk_size=4, n=3, max_new_tokens=3,
                                         seed=11)


def _data_config():
  config = tasks.default_data_config("arithmetic")
  config.digits = 1
  return config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  task = tasks.get_task(_data_config())
  cfg = decoder.default_config("gpt2")
  cfg.update(vocab_size=104, num_real_tokens=task.tokenizer.vocab_size, d_model=16,
             num_layers=1, num_heads=2, num_kv_heads=2, head_dim=8, d_ff=32, max_len=40)
  lm = decoder.DecoderLM(cfg)
  leaves, treedef = jax.tree.flatten(lm.init(jax.random.key(0)))
  rng = np.random.default_rng(0)
  params = jax.tree.unflatten(
      treedef, [x + 0.5 * rng.normal(size=x.shape).astype(np.float32) for x in leaves])
  reference = tmp_path_factory.mktemp("reference")
  written = sharpen_data.generate(task, lm, params, reference, SETTINGS)
  return task, lm, params, reference, written


def test_uninterrupted_run_covers_every_prompt_with_its_best_of_n(setup):
  task, lm, params, reference, written = setup
  assert written == [0, 1, 2]
  assert sorted(os.listdir(reference)) == ["chunk-000000.npz", "chunk-000001.npz",
                                           "chunk-000002.npz", "meta.json"]
  data = sharpen_data.read_dataset(reference)
  np.testing.assert_array_equal(data["index"], np.arange(10))
  # Prompt i is row i % 4 of the task's train batch i // 4 of size 4.
  for chunk in range(3):
    batch = task.train_batch(chunk, 4)
    rows = slice(4 * chunk, min(4 * chunk + 4, 10))
    count = rows.stop - rows.start
    np.testing.assert_array_equal(data["prompt"][rows], batch["prompt"][:count])
    np.testing.assert_array_equal(data["prompt_mask"][rows], batch["prompt_mask"][:count])
  assert data["response"].shape == (10, 3)
  np.testing.assert_array_equal(data["num_samples"], 3)
  np.testing.assert_array_equal(data["seed"], 11)
  np.testing.assert_array_equal(data["length"], data["response_mask"].sum(axis=1))
  np.testing.assert_array_equal(data["truncated"], data["length"] == 3)
  # Stored scores are the self-rewards of the stored responses (teacher-forced recomputation).
  rescored = sharpening.self_reward(lm, params, {k: data[k] for k in (
      "prompt", "prompt_mask", "response", "response_mask")}, eos_id=task.tokenizer.eos_id)
  np.testing.assert_allclose(data["score"], np.asarray(rescored), atol=1e-4)
  np.testing.assert_allclose(data["log_likelihood"], data["score"])
  # The best of N is at least the mean of the N, strictly somewhere.
  assert np.all(data["score"] >= data["sample_score"] - 1e-5)
  assert np.any(data["score"] > data["sample_score"] + 1e-3)
  stats = sharpen_data.dataset_stats(data)
  assert stats["num_prompts"] == 10 and stats["bon_reward"] > stats["sample_reward"]
  assert sharpen_data.is_complete(reference)


class Interrupt(Exception):
  pass


def _read_all(directory):
  return sharpen_data.read_dataset(directory)


def _assert_same_dataset(a, b):
  assert set(a) == set(b)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_interrupted_then_resumed_on_two_hosts_equals_the_uninterrupted_run(setup, tmp_path):
  task, lm, params, reference, _ = setup
  want = _read_all(reference)

  def stop_after_first(chunk):
    raise Interrupt(chunk)

  with pytest.raises(Interrupt):
    sharpen_data.generate(task, lm, params, tmp_path, SETTINGS, on_chunk_written=stop_after_first)
  assert sharpen_data.missing_chunks(tmp_path) == [1, 2]
  assert not sharpen_data.is_complete(tmp_path)
  # A write cut short leaves only a temporary, never a final file.
  stale = tmp_path / ".chunk-000001.npz.tmp-deadbeef"
  stale.write_bytes(b"half a chunk")
  with pytest.raises(FileNotFoundError, match=r"lacks 2 chunk\(s\) \(1, 2\); rerun the generate"):
    _read_all(tmp_path)

  # Resume with two hosts: disjoint chunks, finished ones skipped.
  assert sharpen_data.generate(task, lm, params, tmp_path, SETTINGS, process_index=1,
                               process_count=2) == [1]
  assert sharpen_data.generate(task, lm, params, tmp_path, SETTINGS, process_index=0,
                               process_count=2) == [2]
  assert not stale.exists()
  _assert_same_dataset(_read_all(tmp_path), want)

  # A lost last chunk is made again, nothing else.
  os.remove(sharpen_data.chunk_path(tmp_path, 2))
  assert sharpen_data.generate(task, lm, params, tmp_path, SETTINGS) == [2]
  _assert_same_dataset(_read_all(tmp_path), want)
  assert sharpen_data.generate(task, lm, params, tmp_path, SETTINGS) == []


def test_a_rerun_with_other_settings_fails_instead_of_mixing(setup, tmp_path):
  task, lm, params, reference, _ = setup
  other = dataclasses.replace(SETTINGS, n=4)
  with pytest.raises(ValueError, match=r"made with n=3, but this run asks for n=4"):
    sharpen_data.generate(task, lm, params, reference, other)
  with pytest.raises(FileNotFoundError, match=r"holds no sharpen dataset \(meta.json is missing\)"):
    sharpen_data.read_dataset(tmp_path)
  with pytest.raises(ValueError, match="Sharpen-data chunk_size=0 must be an integer >= 1"):
    dataclasses.replace(SETTINGS, chunk_size=0)


def test_adaptive_generation_records_each_prompts_n(setup, tmp_path):
  task, lm, params, _, _ = setup
  # k so large that the first sample always meets the rule, and so small that none does.
  for k, want_n in ((1e12, 1), (1e-12, 5)):
    settings = dataclasses.replace(SETTINGS, num_prompts=4, n=2, adaptive=True, adaptive_k=k,
                                   adaptive_n_max=5)
    directory = tmp_path / f"k{k}"
    sharpen_data.generate(task, lm, params, directory, settings)
    data = _read_all(directory)
    np.testing.assert_array_equal(data["num_samples"], want_n)
    if want_n == 1:
      np.testing.assert_allclose(data["sample_score"], data["score"], rtol=1e-6)
    else:
      assert np.all(data["score"] >= data["sample_score"] - 1e-5)


def test_settings_follow_the_objective_config():
  cfg = sharpening.default_objective_config()
  cfg.n, cfg.generate.num_prompts, cfg.generate.chunk_size = 8, 100, 10
  cfg.adaptive_n.enabled = True
  settings = sharpen_data.settings_from_config(cfg, seed=3, response_width=7)
  assert (settings.n, settings.num_prompts, settings.chunk_size, settings.num_chunks) == (
      8, 100, 10, 10)
  assert (settings.max_new_tokens, settings.seed, settings.adaptive) == (7, 3, True)


# ----------------------------------------------------------------------------- the task


def _task_config(path, shuffle):
  config = sharpened.default_data_config()
  config.path = str(path)
  config.base = _data_config()
  config.shuffle = shuffle
  return config


def test_sharpened_task_serves_the_dataset_deterministically(setup):
  base, _, _, reference, _ = setup
  data = _read_all(reference)
  assert set(sharpened.default_data_config()) == {"name", "path", "base", "shuffle", "seed",
                                                  "drop_truncated"}
  task = tasks.get_task(_task_config(reference, shuffle=False))
  assert isinstance(task, sharpened.SharpenedTask)
  assert (task.max_prompt_len, task.max_response_len) == (base.max_prompt_len,
                                                          max(base.max_response_len, 3))
  assert task.tokenizer is not None and task.headline_metric == "accuracy"
  width = task.max_response_len
  # In dataset order, wrapping into the next epoch: step 2 of size 4 is rows 8, 9, 0, 1.
  batch = task.train_batch(2, 4)
  rows = [8, 9, 0, 1]
  np.testing.assert_array_equal(batch["prompt"], data["prompt"][rows])
  np.testing.assert_array_equal(batch["response"][:, :3], data["response"][rows])
  np.testing.assert_array_equal(batch["response"][:, 3:], base.tokenizer.pad_id)
  np.testing.assert_array_equal(batch["response_mask"][:, :3], data["response_mask"][rows])
  assert batch["response"].shape == (4, width) and batch["response"].dtype == np.int32

  shuffled = tasks.get_task(_task_config(reference, shuffle=True))
  epoch = np.concatenate([shuffled.train_batch(step, 5)["prompt"] for step in (0, 1)])
  order = [np.flatnonzero((data["prompt"] == row).all(axis=1))[0] for row in epoch]
  assert sorted(order) == list(range(10)) and order != list(range(10))
  # A pure function of the step (a fresh instance agrees), split over hosts in order.
  again = tasks.get_task(_task_config(reference, shuffle=True)).train_batch(3, 4)
  halves = [shuffled.train_batch(3, 4, process_index=p, process_count=2) for p in (0, 1)]
  for key, value in again.items():
    np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), value)
  # Evaluation is the base task's.
  assert task.eval_examples(3) == base.eval_examples(3)
  assert task.score(["1"], base.eval_examples(1)) == base.score(["1"], base.eval_examples(1))


def test_sharpened_task_rejects_a_missing_or_foreign_dataset(setup, tmp_path):
  _, _, _, reference, _ = setup
  with pytest.raises(ValueError, match="data.path='' is invalid"):
    tasks.get_task(_task_config("", shuffle=True))
  with pytest.raises(FileNotFoundError, match="holds no sharpen dataset"):
    tasks.get_task(_task_config(tmp_path, shuffle=True))
  config = _task_config(reference, shuffle=True)
  config.base.digits = 2
  with pytest.raises(ValueError, match="has prompts of width 29 but data.base.max_prompt_len=31"):
    tasks.get_task(config)
