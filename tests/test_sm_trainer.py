"""SequenceMatch through the trainer (8 fake devices): batches, buffer checkpoints, evals."""

import os

import chex
import jax
import numpy as np
import pytest

from jaxsi import checkpoint as checkpoint_lib
from jaxsi import config as config_lib
from jaxsi import metrics_writer
from jaxsi import sm_batches
from jaxsi import step as step_lib
from jaxsi import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs/arithmetic_sm.py:tiny")
# Step 0 is BC on data only; the buffer is refreshed before steps 1 and 3, so steps 1-3 mix
# data and model rows.
OVERRIDES = {"train.steps": 4, "optim.total_steps": 4, "train.log_every": 1,
             "objective.bc_steps": 1, "objective.sample_every": 2}


def _config(**overrides):
  items = [("train.progress", "false")] + [(k, str(v)) for k, v in
                                           {**OVERRIDES, **overrides}.items()]
  return config_lib.load(CONFIG, items)


def _checkpoint(workdir, step=None):
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  step = ckpt.latest_step() if step is None else step
  state = ckpt._manager.restore(step, args=checkpoint_lib.ocp.args.Composite(
      state=checkpoint_lib.ocp.args.StandardRestore()))["state"]
  data = ckpt.read_json(step, "data")
  ckpt.close()
  return step, state, data


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  """One uninterrupted run; its train step must trace once, its evals decode with <bksp>."""
  workdir = str(tmp_path_factory.mktemp("sm"))
  decoded = []
  make_train_step, make_eval_decoder = step_lib.make_train_step, sm_batches.make_eval_decoder

  def counted_train_step(*args, **kwargs):
    return chex.assert_max_traces(make_train_step(*args, **kwargs), n=1)

  def recording_eval_decoder(*args, **kwargs):
    decode = make_eval_decoder(*args, **kwargs)

    def record(*call_args):
      out = decode(*call_args)
      decoded.append(out)
      return out
    return record

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(step_lib, "make_train_step", counted_train_step)
    patch.setattr(sm_batches, "make_eval_decoder", recording_eval_decoder)
    chex.clear_trace_counter()
    metrics = trainer.train(_config(), workdir)
  return workdir, metrics, decoded


def test_batches_are_data_only_then_half_model_samples(full_run):
  workdir, metrics, _ = full_run
  rows = [r for r in metrics_writer.read(workdir) if "train/loss" in r]
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert [r["train/data_fraction"] for r in rows] == [1.0, 0.5, 0.5, 0.5]
  assert [r["train/refreshed"] for r in rows] == [0.0, 1.0, 0.0, 1.0]
  # 16 prompts sampled per refresh, into a buffer of 32.
  assert [r["train/buffer_rows"] for r in rows] == [0.0, 16.0, 16.0, 32.0]
  assert [r["train/beta"] for r in rows] == pytest.approx([1.0, 1.0, 0.6, 0.2])
  assert rows[0]["train/model_reward"] == 0.0 and rows[1]["train/model_reward"] != 0.0
  assert all(np.isfinite(r["train/loss"]) for r in rows)
  assert 0.0 <= metrics["eval/accuracy"] <= 1.0


def test_evals_score_the_materialized_text_of_backspace_generations(full_run):
  _, _, decoded = full_run
  assert decoded, "the final eval did not use the SequenceMatch decoder"
  out = decoded[-1]
  actions, actions_mask = np.asarray(out.actions), np.asarray(out.actions_mask)
  backspace_id = 98  # the char tokenizer's 98 ids, then <bksp>
  for row in range(actions.shape[0]):
    stack = []
    for action in actions[row][actions_mask[row] > 0]:
      stack = stack[:-1] if action == backspace_id else stack + [int(action)]
    np.testing.assert_array_equal(np.asarray(out.tokens)[row, :len(stack)], stack)
    assert int(out.length[row]) == len(stack)


def test_checkpoints_carry_the_replay_buffer(full_run):
  workdir, _, _ = full_run
  step, state, data = _checkpoint(workdir)
  assert step == 4 and data["step"] == 4
  buffer = data["objective"]["replay_buffer"]
  assert buffer["capacity"] == 32 and buffer["added"] == 32 and len(buffer["rows"]) == 32
  assert all(1 <= len(row["actions"]) <= buffer["actions_width"] for row in buffer["rows"])
  # The head kept its width: <bksp> took the first padding row of the 128.
  shapes = [np.shape(x) for x in jax.tree.leaves(state["params"])]
  assert (128, 32) in shapes and not any(129 in shape for shape in shapes)


def test_interrupted_run_resumes_the_buffer_and_matches(full_run, tmp_path):
  full_dir, _, _ = full_run
  workdir = str(tmp_path / "resumed")
  no_eval = {"eval.at_end": "false"}               # evals do not touch the parameters
  trainer.train(_config(**no_eval), workdir, stop_at=2)   # "preempted" after one refresh
  _, _, data = _checkpoint(workdir, 2)
  assert len(data["objective"]["replay_buffer"]["rows"]) == 16
  trainer.train(_config(**no_eval), workdir)              # the same command again
  step_a, state_a, data_a = _checkpoint(full_dir)
  step_b, state_b, data_b = _checkpoint(workdir)
  assert step_a == step_b == 4
  assert data_a["objective"] == data_b["objective"]
  for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------ the batch preparer on its own


def test_preparer_puts_data_rows_first_and_buffer_rows_last():
  from jaxsi import mesh as mesh_lib
  from jaxsi import models
  from jaxsi.data import tasks
  from jaxsi.objectives import sequencematch as sm

  config = _config(**{"objective.bc_steps": 100, "objective.noise_prob": 0.5})
  task = tasks.get_task(config.data)
  lm = sm_batches.with_backspace(models.build(config.model), config.objective)
  assert (lm.vocab_size, sm.resolve_backspace_id(config.objective, lm)) == (128, 98)
  mesh = mesh_lib.build_mesh(config.mesh)
  preparer = sm_batches.BatchPreparer(lm, config.objective, task, mesh, 16, seed=0)
  batch = task.train_batch(5, 16)
  width = preparer.action_width
  assert width == 2 * task.max_response_len

  data_only, _ = preparer(5, batch, params=None)
  np.testing.assert_array_equal(data_only["is_data"], np.ones(16))
  # Buffer rows: 3 random action sequences with backspaces, one of them truncated.
  rng = np.random.default_rng(0)
  actions = rng.integers(3, 40, (3, width)).astype(np.int32)
  actions[rng.random((3, width)) < 0.3] = 98
  actions_mask = (np.arange(width)[None, :] < np.array([[width], [3], [5]])).astype(np.int32)
  preparer.buffer.add(batch["prompt"][:3], batch["prompt_mask"][:3], actions, actions_mask,
                      np.array([True, False, False]))
  mixed, metrics = preparer(5, batch, params=None)
  assert metrics == {"buffer_rows": 3.0, "refreshed": 0.0, "refresh_seconds": 0.0}
  for key, ndim in sm_batches.BATCH_NDIMS.items():
    assert mixed[key].ndim == ndim and mixed[key].shape[0] == 16
    assert mixed[key].shape == data_only[key].shape and mixed[key].dtype == data_only[key].dtype
    assert mixed[key].sharding == data_only[key].sharding, key

  # The data half: the task's responses, augmented with this step's noise, then laid out.
  noise_rng = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(0), 7), 5)
  augmented = sm.augment_with_noise(
      noise_rng, batch["response"], batch["response_mask"], noise_prob=0.5, backspace_id=98,
      vocab_size=98, max_len=width, noise="task", eos_id=2,
      task_noise_fn=sm_batches.task_noise_fn(task))
  want_data = sm.preprocess_actions(augmented["actions"], 98, actions_mask_BxL=augmented["mask"],
                                    loss_mask_BxL=augmented["loss_mask"])
  drawn = preparer.buffer.sample(5, 8)
  want_model = sm.preprocess_actions(drawn["actions"], 98, actions_mask_BxL=drawn["actions_mask"])
  for key in want_data:
    np.testing.assert_array_equal(mixed[key][:8], np.asarray(want_data[key])[:8], err_msg=key)
    np.testing.assert_array_equal(mixed[key][8:], np.asarray(want_model[key]), err_msg=key)
    np.testing.assert_array_equal(data_only[key], np.asarray(want_data[key]), err_msg=key)
  np.testing.assert_array_equal(mixed["prompt"][8:], drawn["prompt"])
  np.testing.assert_array_equal(mixed["is_data"], np.arange(16) < 8)
  np.testing.assert_array_equal(mixed["truncated"][8:], drawn["truncated"])
  np.testing.assert_array_equal(mixed["truncated"][:8], np.asarray(augmented["truncated"])[:8])
  assert np.asarray(mixed["loss_mask"])[:8].sum() < np.asarray(mixed["response_mask"])[:8].sum()
  # Task noise is a wrong digit or sign: never the action it precedes.
  candidates = set(task.tokenizer.encode("0123456789abcdef-"))
  pairs = [(row[k], row[k + 2]) for row, mask, loss in zip(
      np.asarray(augmented["actions"]), np.asarray(augmented["mask"]),
      np.asarray(augmented["loss_mask"])) for k in range(width - 2) if mask[k] and not loss[k]]
  assert len(pairs) > 5
  assert all(noise in candidates and noise != action for noise, action in pairs), pairs


# ------------------------------------------------- the text continuation task of owt_sm.py


def test_text_continuation_windows_and_scores(tmp_path):
  from jaxsi.data import text_files
  (tmp_path / "a.txt").write_text("hello world\n\nthe quick brown fox jumps over\n")
  (tmp_path / "b.txt").write_text("ab\n")
  config = text_files.default_data_config()
  config.update(files=(str(tmp_path / "*.txt"),), tokenizer="char", max_prompt_len=6,
                max_response_len=8, eval_size=1)
  task = text_files.TextContinuationTask(config)
  assert task._train == ["hello world", "the quick brown fox jumps over"]
  assert task._eval == ["ab"]
  eos, bos = task.tokenizer.eos_id, task.tokenizer.bos_id
  short = task._example("ab", "doc")          # one token to continue from, then EOS
  assert short.prompt_ids == [bos] + task.tokenizer.encode("a")
  assert short.target_ids == task.tokenizer.encode("b") + [eos]
  long = task._example("hello world", "doc")
  assert long.prompt_ids == [bos] + task.tokenizer.encode("hello")
  assert long.target_ids == task.tokenizer.encode(" world") + [eos]  # 6 < 8: it ends
  long = task._example("the quick brown fox", "doc")  # cut: no EOS, a truncated window
  assert long.target_ids == task.tokenizer.encode("uick bro") and eos not in long.target_ids
  batch = task.train_batch(3, 4)
  np.testing.assert_array_equal(batch["response"], task.train_batch(3, 4)["response"])
  assert batch["prompt"].shape == (4, 6) and batch["response"].shape == (4, 8)
  with pytest.raises(ValueError, match="matches no file"):
    text_files.TextContinuationTask(_with(config, files=("/nowhere/*.txt",)))
  scores = task.score(["a b a b a", "x y z"], [short, short])
  # "a b a b a": bigrams 2/4 distinct, trigrams 2/3, 4-grams 2/2 -> 1/3; "x y z": 1 * 1 * 1.
  assert scores["diversity"] == pytest.approx((1 / 3 + 1.0) / 2)
  assert scores["entropy4"] == pytest.approx(np.log(2))   # two distinct 4-grams, once each
  assert scores["mean_words"] == 4.0


def _with(config, **values):
  copy = config.copy_and_resolve_references()
  copy.update(values)
  return copy
