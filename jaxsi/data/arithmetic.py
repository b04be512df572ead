"""Addition and subtraction in bases 2 to 16, in the style of DeepMind's mathematics dataset.

Each problem mirrors the `arithmetic__add_or_sub_in_base` module of Saxton et al. (2019):
question "In base 7, what is -13 + 22?", answer "12". Operands are signed integers with up to
`digits` digits in their base, written with the digits 0-9 then a-f; the answer is in the same
base, with a leading "-" when negative. A negative second operand reads "5 - -3".

Problems are generated lazily: problem `index` of a split is a pure function of
(seed, digits, bases, index), so any position of either stream can be produced without
generating the ones before it, and a resumed run only needs its step number.

The train/test split is decided by a stable hash (SHA-256) of the question text alone, so a
question is either always a test question or never one, whatever the seed or the base range.
Train and test therefore never share a question, even across runs with different seeds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re

import numpy as np

MIN_SUPPORTED_BASE = 2
MAX_SUPPORTED_BASE = 16
DEFAULT_TEST_FRACTION = 0.1

# Rejection sampling draws a new candidate until one falls in the wanted split; this bounds
# the draws so that a question space too small to hold both splits fails instead of hanging.
_MAX_DRAWS_PER_PROBLEM = 10_000

_DIGIT_PATTERN = re.compile(r"-?[0-9a-f]+")
QUESTION_PATTERN = re.compile(
    r"In base (?P<base>\d+), what is (?P<left>-?[0-9a-f]+) (?P<operator>[+-]) "
    r"(?P<right>-?[0-9a-f]+)\?")


@dataclasses.dataclass(frozen=True)
class Problem:
  """One addition or subtraction problem.

  Attributes:
    question: e.g. "In base 7, what is -13 + 22?".
    answer: the value written in `base`, e.g. "12".
    base: the base of the operands and the answer, in [2, 16].
    operands: the two operands as Python ints, e.g. (-10, 16).
    operator: "+" or "-".
    value: the answer as a Python int, e.g. 6.
  """
  question: str
  answer: str
  base: int
  operands: tuple[int, int]
  operator: str
  value: int


def _check_base(base: int) -> None:
  if not isinstance(base, int) or not MIN_SUPPORTED_BASE <= base <= MAX_SUPPORTED_BASE:
    raise ValueError(f"Base {base!r} is not supported; use an integer from "
                     f"{MIN_SUPPORTED_BASE} to {MAX_SUPPORTED_BASE}.")


def to_base(value: int, base: int) -> str:
  """Writes an integer in `base` with lowercase digits, e.g. to_base(-10, 7) == "-13"."""
  _check_base(base)
  return np.base_repr(value, base).lower()


def from_base(text: str, base: int) -> int:
  """Parses what `to_base` writes, e.g. from_base("-13", 7) == -10.

  Raises:
    ValueError: if `text` holds anything but an optional "-" and digits valid in `base`.
  """
  _check_base(base)
  # int() alone would also accept "0x1f", "1_0" and surrounding spaces, which are not answers.
  digits = text[1:] if text.startswith("-") else text
  if (not _DIGIT_PATTERN.fullmatch(text)
      or any(int(digit, MAX_SUPPORTED_BASE) >= base for digit in digits)):
    raise ValueError(f"{text!r} is not a number in base {base}; expected an optional '-' "
                     f"followed by digits from {to_base(0, base)!r} to {to_base(base - 1, base)!r}.")
  return int(text, base)


def max_question_length(digits: int, max_base: int) -> int:
  """Number of characters of the longest question, e.g. "In base 16, what is -ff - -ff?"."""
  longest_operand = 1 + digits  # sign + digits
  return (len(f"In base {max_base}, what is ") + longest_operand + len(" - ")
          + longest_operand + len("?"))


def max_answer_length(digits: int) -> int:
  """Number of characters of the longest answer: a sign and `digits + 1` digits.

  |a ± b| <= 2 (base**digits - 1) < base**(digits + 1) for every base >= 2.
  """
  return 1 + digits + 1


def is_test_question(question: str, test_fraction: float = DEFAULT_TEST_FRACTION) -> bool:
  """Whether `question` belongs to the held-out test split (stable across runs and machines)."""
  digest = hashlib.sha256(question.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") < test_fraction * 2**64


class ArithmeticGenerator:
  """Deterministic, lazily indexed streams of train and test problems.

  Attributes:
    digits: the largest number of digits of an operand in its base (the difficulty).
    min_base: smallest base, at least 2.
    max_base: largest base, at most 16.
    seed: selects the streams; the same seed gives the same problems.
    test_fraction: share of all possible questions held out for testing.
  """

  def __init__(self, *, digits: int, min_base: int = MIN_SUPPORTED_BASE,
               max_base: int = MAX_SUPPORTED_BASE, seed: int = 0,
               test_fraction: float = DEFAULT_TEST_FRACTION):
    if not isinstance(digits, int) or digits < 1:
      raise ValueError(f"digits={digits!r} is invalid; use a positive integer.")
    for name, base in (("min_base", min_base), ("max_base", max_base)):
      if not isinstance(base, int) or not MIN_SUPPORTED_BASE <= base <= MAX_SUPPORTED_BASE:
        raise ValueError(f"{name}={base!r} is invalid; use an integer from "
                         f"{MIN_SUPPORTED_BASE} to {MAX_SUPPORTED_BASE}.")
    if min_base > max_base:
      raise ValueError(f"min_base={min_base} is larger than max_base={max_base}; "
                       "use min_base <= max_base.")
    if not isinstance(seed, int):
      raise ValueError(f"seed={seed!r} is invalid; use an integer.")
    if not 0.0 < test_fraction < 1.0:
      raise ValueError(f"test_fraction={test_fraction!r} is invalid; use a number strictly "
                       "between 0 and 1.")
    self.digits = digits
    self.min_base = min_base
    self.max_base = max_base
    self.seed = seed
    self.test_fraction = test_fraction

  def _draw(self, split: str, index: int, attempt: int) -> Problem:
    # A string seed goes through SHA-512 inside `random`, so the draws are the same on
    # every machine and Python process (unlike `hash`, which is salted per process).
    rng = random.Random(f"jaxsi.arithmetic/{split}/{self.seed}/{index}/{attempt}")
    base = rng.randint(self.min_base, self.max_base)
    left, right = (self._draw_operand(rng, base) for _ in range(2))
    operator = rng.choice("+-")
    value = left + right if operator == "+" else left - right
    question = (f"In base {base}, what is {to_base(left, base)} {operator} "
                f"{to_base(right, base)}?")
    return Problem(question=question, answer=to_base(value, base), base=base,
                   operands=(left, right), operator=operator, value=value)

  def _draw_operand(self, rng: random.Random, base: int) -> int:
    # Digit count first, then a value with exactly that many digits: every difficulty
    # level up to `digits` is equally common, instead of almost all operands being long.
    num_digits = rng.randint(1, self.digits)
    smallest = 0 if num_digits == 1 else base**(num_digits - 1)
    magnitude = rng.randint(smallest, base**num_digits - 1)
    return -magnitude if rng.random() < 0.5 else magnitude

  def _problem_in_split(self, split: str, index: int) -> Problem:
    if not isinstance(index, (int, np.integer)) or index < 0:
      raise ValueError(f"Problem index {index!r} is invalid; use a non-negative integer.")
    want_test = split == "test"
    for attempt in range(_MAX_DRAWS_PER_PROBLEM):
      problem = self._draw(split, int(index), attempt)
      if is_test_question(problem.question, self.test_fraction) == want_test:
        return problem
    raise ValueError(
        f"No {split} question found in {_MAX_DRAWS_PER_PROBLEM} draws for digits={self.digits}, "
        f"bases {self.min_base}..{self.max_base}; the question space is too small to split, "
        "so raise digits or widen the base range.")

  def train_problem(self, index: int) -> Problem:
    """Problem `index` of the (endless) train stream; never a test question."""
    return self._problem_in_split("train", index)

  def test_problem(self, index: int) -> Problem:
    """Problem `index` of the (endless) test stream."""
    return self._problem_in_split("test", index)

  def test_problems(self, n: int) -> list[Problem]:
    """The first `n` problems of the test stream."""
    if not isinstance(n, int) or n < 0:
      raise ValueError(f"n={n!r} is invalid; use a non-negative integer.")
    return [self.test_problem(index) for index in range(n)]
