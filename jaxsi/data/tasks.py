"""Tasks: what the trainer trains and evaluates on, looked up by `data_config.name`.

A task owns a tokenizer and its sequence widths, yields this host's share of the global
train batch for any step, holds out eval examples, and scores predictions. The train batch
is a pure function of (config, step), so resuming a run only needs the step, and the hosts'
slices concatenated in process order equal the single-process batch.

To add a task, subclass `Task` and decorate it with `@register_task("name")`. Tasks whose
module is heavy to import (the TFDS tasks pull in tensorflow-datasets) are listed in
`_LAZY_TASK_MODULES` and imported the first time `get_task` or `default_data_config` asks
for them.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
from typing import Callable, Sequence

import ml_collections
import numpy as np

from jaxsi.data import arithmetic
from jaxsi.data import batching
from jaxsi.data import tokenizers

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Example:
  """One eval example.

  Attributes:
    prompt_ids: the prompt's token ids, specials included (e.g. BOS + question).
    prompt_text: the prompt as text, without specials.
    target_text: the reference answer as text.
    target_ids: the reference response's token ids, EOS included (for teacher forcing).
  """
  prompt_ids: list[int]
  prompt_text: str
  target_text: str
  target_ids: list[int]


class Task(abc.ABC):
  """The interface the trainer relies on.

  Attributes:
    name: the registry key (`data_config.name`).
    tokenizer: encodes prompts and responses, decodes samples.
    max_prompt_len: S, the prompt width of every batch.
    max_response_len: T, the response width of every batch.
  """

  name: str
  tokenizer: tokenizers.Tokenizer
  max_prompt_len: int
  max_response_len: int
  # The key of `score`'s result that ranks checkpoints (`checkpoint.best_metric` is
  # "eval/" + this) and that reports quote first.
  headline_metric: str = "accuracy"

  @abc.abstractmethod
  def train_batch(self, step: int, batch_size: int, *, process_index: int = 0,
                  process_count: int = 1) -> Batch:
    """This host's rows of the global train batch of `step`.

    Args:
      step: the train step (>= 0); the batch is a pure function of it and the config.
      batch_size: rows of the global batch, divisible by `process_count`.
      process_index: this host's index, in [0, process_count).
      process_count: number of hosts sharing the global batch.

    Returns:
      `prompt` [batch_size // process_count, S] int32, `prompt_mask` [.., S] int32,
      `response` [.., T] int32 and `response_mask` [.., T] int32: rows
      process_index * (batch_size // process_count) onward of the global batch.
    """

  @abc.abstractmethod
  def eval_examples(self, n: int | None = None) -> list[Example]:
    """The first `n` held-out examples (all configured ones when n is None)."""

  def score(self, predictions: Sequence[str], examples: Sequence[Example]) -> dict[str, float]:
    """Scores decoded predictions against the examples' targets.

    Returns:
      `accuracy`: the share of predictions equal to their target after stripping whitespace.
    """
    check_predictions(predictions, examples)
    matches = [prediction.strip() == example.target_text.strip()
               for prediction, example in zip(predictions, examples)]
    return {"accuracy": float(np.mean(matches))}

  def pack(self, examples: Sequence[Example], *, with_response: bool = True,
           truncation: str = "error") -> Batch:
    """Packs examples with the task's widths (see `batching.pack`).

    Args:
      examples: the rows.
      with_response: also pack the targets as `response`; False gives prompts alone, for
        sampling.
      truncation: "error", "left" or "right", as in `batching.pack`.
    """
    return batching.pack(
        [example.prompt_ids for example in examples],
        [example.target_ids for example in examples] if with_response else None,
        max_prompt_len=self.max_prompt_len, max_response_len=self.max_response_len,
        pad_id=self.tokenizer.pad_id, truncation=truncation)


def check_predictions(predictions: Sequence[str], examples: Sequence[Example]) -> None:
  """Validates `score` arguments: one prediction per example, at least one example."""
  if len(predictions) != len(examples):
    raise ValueError(f"score got {len(predictions)} predictions for {len(examples)} "
                     "examples; pass one prediction per example.")
  if not examples:
    raise ValueError("score got no examples; pass at least one.")


def check_host_slice(step: int, batch_size: int, process_index: int,
                     process_count: int) -> tuple[int, int]:
  """Validates `train_batch` arguments; returns this host's [start, stop) rows of the batch."""
  if not isinstance(step, (int, np.integer)) or step < 0:
    raise ValueError(f"step={step!r} is invalid; use a non-negative integer.")
  if not isinstance(process_count, int) or process_count < 1:
    raise ValueError(f"process_count={process_count!r} is invalid; use a positive integer.")
  if not isinstance(process_index, int) or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index!r} is invalid; use an integer in "
                     f"[0, {process_count}).")
  if not isinstance(batch_size, int) or batch_size < 1 or batch_size % process_count:
    raise ValueError(f"batch_size={batch_size!r} is invalid; use a positive multiple of the "
                     f"process count {process_count}.")
  rows_per_host = batch_size // process_count
  return process_index * rows_per_host, (process_index + 1) * rows_per_host


_TASK_BUILDERS: dict[str, Callable[[ml_collections.ConfigDict], Task]] = {}

# Registered on import of their module, which happens on first use: importing
# tensorflow-datasets costs every run that never reads a TFDS task.
_LAZY_TASK_MODULES = {
    "sharpened": "jaxsi.data.sharpened",
    "text_continuation": "jaxsi.data.text_files",
    "xsum": "jaxsi.data.tfds_tasks",
    "wmt14_translate/de-en": "jaxsi.data.tfds_tasks",
    "gsm8k": "jaxsi.data.tfds_tasks",
}


def _import_lazy_task(name: str) -> None:
  """Imports the module that registers task `name`, if it is a lazy one not yet imported."""
  if name in _LAZY_TASK_MODULES and name not in _TASK_BUILDERS:
    importlib.import_module(_LAZY_TASK_MODULES[name])


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
  """Class decorator: makes `get_task` build the class for `data_config.name == name`."""

  def register(task_class: type[Task]) -> type[Task]:
    if name in _TASK_BUILDERS:
      raise ValueError(f"Task {name!r} is already registered; pick another name.")
    _TASK_BUILDERS[name] = task_class
    return task_class

  return register


def task_names() -> list[str]:
  """The names `get_task` accepts, sorted."""
  return sorted(set(_TASK_BUILDERS) | set(_LAZY_TASK_MODULES))


def get_task(data_config: ml_collections.ConfigDict) -> Task:
  """Builds the task named by `data_config.name`."""
  name = data_config.get("name")
  if isinstance(name, str):
    _import_lazy_task(name)
  if name not in _TASK_BUILDERS:
    raise ValueError(f"Unknown task data.name={name!r}; registered tasks are: "
                     f"{', '.join(task_names())}.")
  return _TASK_BUILDERS[name](data_config)


def default_data_config(name: str = "arithmetic") -> ml_collections.ConfigDict:
  """The data config of task `name`, with every key that task reads and its default.

  Args:
    name: a registered task: "arithmetic" (the default, described below) or a TFDS task
      ("xsum", "wmt14_translate/de-en", "gsm8k"; see `jaxsi.data.tfds_tasks`).

  For arithmetic, `max_prompt_len` and `max_response_len` follow `digits` (overriding
  `digits` updates them unless they were set explicitly): BOS + the longest question, and
  the longest answer + EOS, for bases up to 16.
  """
  if name != "arithmetic":
    if name not in _LAZY_TASK_MODULES:
      raise ValueError(f"Unknown task {name!r} for default_data_config; known tasks are: "
                       f"arithmetic, {', '.join(sorted(_LAZY_TASK_MODULES))}.")
    return importlib.import_module(_LAZY_TASK_MODULES[name]).default_data_config(name)
  config = ml_collections.ConfigDict()
  config.name = "arithmetic"
  config.tokenizer = "char"
  config.digits = 2
  config.min_base = arithmetic.MIN_SUPPORTED_BASE
  config.max_base = arithmetic.MAX_SUPPORTED_BASE
  config.seed = 0
  # Lazy references: the lengths are computed from `digits` when read. Checked against the
  # exact longest question in ArithmeticTask.__init__.
  question_len_without_operands = arithmetic.max_question_length(
      0, arithmetic.MAX_SUPPORTED_BASE)
  config.max_prompt_len = config.get_ref("digits") * 2 + (1 + question_len_without_operands)
  config.max_response_len = config.get_ref("digits") + (arithmetic.max_answer_length(0) + 1)
  config.eval_size = 200
  return config


@register_task("arithmetic")
class ArithmeticTask(Task):
  """Addition and subtraction in bases 2 to 16 (see `jaxsi.data.arithmetic`).

  Prompt: BOS + "In base 7, what is -13 + 22?"; response: "12" + EOS. Row r of the global
  batch of step s is train problem s * batch_size + r.
  """

  def __init__(self, data_config: ml_collections.ConfigDict):
    self.name = "arithmetic"
    self.generator = arithmetic.ArithmeticGenerator(
        digits=data_config.digits, min_base=data_config.min_base,
        max_base=data_config.max_base, seed=data_config.seed)
    self.tokenizer = tokenizers.get_tokenizer(data_config.tokenizer)
    self.max_prompt_len = data_config.max_prompt_len
    self.max_response_len = data_config.max_response_len
    if not isinstance(data_config.eval_size, int) or data_config.eval_size < 1:
      raise ValueError(f"data.eval_size={data_config.eval_size!r} is invalid; use a positive "
                       "integer.")
    self.eval_size = data_config.eval_size
    self._check_lengths_fit()

  def _check_lengths_fit(self) -> None:
    # Fail at startup rather than at the first unlucky batch: measure the longest question
    # and answer the generator can produce with this tokenizer.
    digits, base = self.generator.digits, self.generator.max_base
    longest_operand = "-" + arithmetic.to_base(base**digits - 1, base)
    longest_question = f"In base {base}, what is {longest_operand} - {longest_operand}?"
    longest_answer = arithmetic.to_base(-2 * (base**digits - 1), base)
    needed = {
        "max_prompt_len": len(self.tokenizer.encode(longest_question, add_bos=True)),
        "max_response_len": len(self.tokenizer.encode(longest_answer, add_eos=True)),
    }
    for key, needed_len in needed.items():
      configured = getattr(self, key)
      if not isinstance(configured, int) or configured < needed_len:
        raise ValueError(f"data.{key}={configured!r} is too short for digits={digits}, "
                         f"max_base={base}; set it to at least {needed_len}.")

  def _example(self, problem: arithmetic.Problem) -> Example:
    return Example(prompt_ids=self.tokenizer.encode(problem.question, add_bos=True),
                   prompt_text=problem.question, target_text=problem.answer,
                   target_ids=self.tokenizer.encode(problem.answer, add_eos=True))

  def train_batch(self, step: int, batch_size: int, *, process_index: int = 0,
                  process_count: int = 1) -> Batch:
    start, stop = check_host_slice(step, batch_size, process_index, process_count)
    first_index = int(step) * batch_size
    examples = [self._example(self.generator.train_problem(first_index + row))
                for row in range(start, stop)]
    return self.pack(examples)

  def eval_examples(self, n: int | None = None) -> list[Example]:
    n = self.eval_size if n is None else n
    return [self._example(problem) for problem in self.generator.test_problems(n)]
