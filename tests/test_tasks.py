"""Tests for the Task interface, the registry and the arithmetic task."""

import numpy as np
import pytest

from jaxsi.data import arithmetic
from jaxsi.data import tasks


@pytest.fixture(name="task")
def fixture_task():
  return tasks.get_task(tasks.default_data_config())


def test_default_config_lengths_fit_the_longest_problem_and_follow_digits():
  config = tasks.default_data_config()
  assert config.name == "arithmetic" and config.eval_size == 200
  # BOS + "In base 16, what is -ff - -ff?" and "-1fe" + EOS.
  assert (config.max_prompt_len, config.max_response_len) == (1 + 30, 4 + 1)
  config.digits = 4
  assert config.max_prompt_len == 1 + arithmetic.max_question_length(4, 16)
  assert config.max_response_len == arithmetic.max_answer_length(4) + 1
  tasks.get_task(config)  # the lengths pass the task's own check


def test_too_short_lengths_fail_at_construction():
  config = tasks.default_data_config()
  config.max_response_len = 4
  with pytest.raises(ValueError, match=r"data\.max_response_len=4 is too short for digits=2, "
                     r"max_base=16; set it to at least 5"):
    tasks.get_task(config)


def test_unknown_task_lists_registered_names():
  config = tasks.default_data_config()
  config.name = "nope"
  with pytest.raises(ValueError, match=r"Unknown task data\.name='nope'; registered tasks are: "
                     r".*arithmetic"):
    tasks.get_task(config)


def test_registering_a_name_twice_fails():
  with pytest.raises(ValueError, match="Task 'arithmetic' is already registered"):
    tasks.register_task("arithmetic")(tasks.ArithmeticTask)
  assert "arithmetic" in tasks.task_names()


def test_train_batch_shapes_and_contents(task):
  batch = task.train_batch(step=0, batch_size=8)
  assert batch["prompt"].shape == batch["prompt_mask"].shape == (8, task.max_prompt_len)
  assert batch["response"].shape == batch["response_mask"].shape == (8, task.max_response_len)
  tokenizer = task.tokenizer
  for row in range(8):
    prompt_ids = batch["prompt"][row][batch["prompt_mask"][row] == 1]
    response_ids = batch["response"][row][batch["response_mask"][row] == 1]
    assert prompt_ids[0] == tokenizer.bos_id and response_ids[-1] == tokenizer.eos_id
    question, answer = tokenizer.decode(prompt_ids), tokenizer.decode(response_ids)
    match = arithmetic.QUESTION_PATTERN.fullmatch(question)
    base = int(match["base"])
    left, right = (arithmetic.from_base(match[side], base) for side in ("left", "right"))
    expected = left + right if match["operator"] == "+" else left - right
    assert arithmetic.from_base(answer, base) == expected
    assert not arithmetic.is_test_question(question)


def test_train_batch_is_a_pure_function_of_step(task):
  again = tasks.get_task(tasks.default_data_config())
  for step in (0, 5, 10_000):
    first, second = task.train_batch(step, 16), again.train_batch(step, 16)
    for key in first:
      np.testing.assert_array_equal(first[key], second[key])
  assert not np.array_equal(task.train_batch(0, 16)["prompt"], task.train_batch(1, 16)["prompt"])


def test_seed_changes_the_train_batch():
  config = tasks.default_data_config()
  config.seed = 1
  other = tasks.get_task(config)
  default = tasks.get_task(tasks.default_data_config())
  assert not np.array_equal(other.train_batch(0, 16)["prompt"],
                            default.train_batch(0, 16)["prompt"])


@pytest.mark.parametrize("process_count", [2, 4])
def test_host_slices_concatenate_to_the_global_batch(task, process_count):
  global_batch = task.train_batch(3, 16)
  slices = [task.train_batch(3, 16, process_index=index, process_count=process_count)
            for index in range(process_count)]
  for key, array in global_batch.items():
    assert slices[0][key].shape[0] == 16 // process_count
    np.testing.assert_array_equal(np.concatenate([part[key] for part in slices]), array)


@pytest.mark.parametrize("kwargs,message", [
    (dict(step=-1, batch_size=4), "step=-1 is invalid"),
    (dict(step=0, batch_size=6, process_count=4), "batch_size=6 is invalid"),
    (dict(step=0, batch_size=4, process_index=2, process_count=2),
     r"process_index=2 is invalid; use an integer in \[0, 2\)"),
    (dict(step=0, batch_size=4, process_count=0), "process_count=0 is invalid"),
])
def test_train_batch_rejects_bad_arguments(task, kwargs, message):
  with pytest.raises(ValueError, match=message):
    task.train_batch(**kwargs)


def test_eval_examples_are_held_out_and_pack(task):
  examples = task.eval_examples()
  assert len(examples) == 200 and len(task.eval_examples(7)) == 7
  assert task.eval_examples(7) == examples[:7]
  train_questions = set()
  for step in range(20):
    batch = task.train_batch(step, 64)
    train_questions |= {task.tokenizer.decode(row) for row in batch["prompt"]}
  assert not train_questions & {example.prompt_text for example in examples}
  example = examples[0]
  assert example.prompt_ids == task.tokenizer.encode(example.prompt_text, add_bos=True)
  assert example.target_ids == task.tokenizer.encode(example.target_text, add_eos=True)
  batch = task.pack(examples[:3])
  assert batch["prompt"].shape == (3, task.max_prompt_len)
  assert task.tokenizer.decode(batch["response"][1]) == examples[1].target_text
  assert set(task.pack(examples[:3], with_response=False)) == {"prompt", "prompt_mask"}


def test_score_is_exact_match_after_stripping(task):
  examples = task.eval_examples(4)
  predictions = [f" {examples[0].target_text}\n", examples[1].target_text,
                 examples[2].target_text + "0", ""]
  assert task.score(predictions, examples) == {"accuracy": 0.5}
  with pytest.raises(ValueError, match="score got 1 predictions for 4 examples"):
    task.score(predictions[:1], examples)
