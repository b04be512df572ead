"""Tests for the arithmetic problem generator."""

import random

import pytest

from jaxsi.data import arithmetic


@pytest.mark.parametrize("value,base,text", [
    (0, 2, "0"), (5, 2, "101"), (-5, 2, "-101"), (-10, 7, "-13"), (16, 7, "22"),
    (255, 16, "ff"), (-4011, 16, "-fab"), (100, 10, "100"), (8, 8, "10"),
])
def test_to_base_and_from_base_on_known_values(value, base, text):
  assert arithmetic.to_base(value, base) == text
  assert arithmetic.from_base(text, base) == value


def test_to_base_round_trips_across_bases():
  rng = random.Random(0)
  for _ in range(2000):
    base = rng.randint(2, 16)
    value = rng.randint(-10**12, 10**12)
    assert arithmetic.from_base(arithmetic.to_base(value, base), base) == value


@pytest.mark.parametrize("text,base", [("8", 8), ("1g", 16), ("0x1f", 16), ("1_0", 2),
                                       (" 1", 10), ("", 10), ("-", 10), ("A", 16)])
def test_from_base_rejects_invalid_text(text, base):
  with pytest.raises(ValueError, match=f"is not a number in base {base}"):
    arithmetic.from_base(text, base)


@pytest.mark.parametrize("base", [1, 17, 2.0])
def test_bases_outside_2_to_16_are_rejected(base):
  with pytest.raises(ValueError, match="use an integer from 2 to 16"):
    arithmetic.to_base(3, base)


def test_problems_are_correct_and_in_deepmind_format():
  generator = arithmetic.ArithmeticGenerator(digits=3, seed=0)
  bases_seen, operators_seen, negative_answers = set(), set(), 0
  for index in range(3000):
    problem = generator.train_problem(index)
    match = arithmetic.QUESTION_PATTERN.fullmatch(problem.question)
    assert match is not None, problem.question
    base = int(match["base"])
    left = arithmetic.from_base(match["left"], base)
    right = arithmetic.from_base(match["right"], base)
    expected = left + right if match["operator"] == "+" else left - right
    assert arithmetic.from_base(problem.answer, base) == expected == problem.value
    assert (base, (left, right), match["operator"]) == (
        problem.base, problem.operands, problem.operator)
    for operand in (left, right):
      assert abs(operand) < base**3
    bases_seen.add(base)
    operators_seen.add(problem.operator)
    negative_answers += problem.answer.startswith("-")
  assert bases_seen == set(range(2, 17))
  assert operators_seen == {"+", "-"}
  assert 0 < negative_answers < 3000


def test_digits_bounds_operand_length_and_max_lengths_are_tight():
  generator = arithmetic.ArithmeticGenerator(digits=2, min_base=12, max_base=16, seed=3)
  problems = [generator.train_problem(i) for i in range(3000)]
  operand_lengths = {len(arithmetic.to_base(abs(value), problem.base))
                     for problem in problems for value in problem.operands}
  assert operand_lengths == {1, 2}
  assert max(len(p.question) for p in problems) <= arithmetic.max_question_length(2, 16) == 30
  assert max(len(p.answer) for p in problems) <= arithmetic.max_answer_length(2) == 4


def test_base_range_is_respected():
  generator = arithmetic.ArithmeticGenerator(digits=2, min_base=5, max_base=7, seed=1)
  bases = {generator.train_problem(i).base for i in range(300)}
  assert bases == {5, 6, 7}


def test_train_and_test_never_share_a_question():
  generator = arithmetic.ArithmeticGenerator(digits=1, seed=0)
  train_questions = {generator.train_problem(i).question for i in range(4000)}
  test_questions = {problem.question for problem in generator.test_problems(3000)}
  # digits=1 keeps the question space small (a few thousand), so a leak would show.
  assert len(test_questions) > 100 and len(train_questions) > 1000
  assert not train_questions & test_questions
  assert all(arithmetic.is_test_question(q) for q in test_questions)
  assert not any(arithmetic.is_test_question(q) for q in train_questions)


def test_split_membership_does_not_depend_on_the_seed():
  test_of_seed_1 = {p.question for p in
                    arithmetic.ArithmeticGenerator(digits=1, seed=1).test_problems(1000)}
  train_of_seed_0 = arithmetic.ArithmeticGenerator(digits=1, seed=0)
  assert not test_of_seed_1 & {train_of_seed_0.train_problem(i).question for i in range(3000)}


def test_same_seed_same_data_and_lazy_indexing():
  first = arithmetic.ArithmeticGenerator(digits=2, seed=7)
  second = arithmetic.ArithmeticGenerator(digits=2, seed=7)
  assert [first.train_problem(i) for i in range(50)] == [
      second.train_problem(i) for i in range(50)]
  assert first.test_problems(30) == second.test_problems(30)
  # Any index can be generated on its own and equals its place in the stream.
  assert second.train_problem(123_456) == first.train_problem(123_456)
  assert first.test_problems(30)[17] == second.test_problem(17)


def test_different_seed_different_data():
  seed_0 = arithmetic.ArithmeticGenerator(digits=2, seed=0)
  seed_1 = arithmetic.ArithmeticGenerator(digits=2, seed=1)
  same = sum(seed_0.train_problem(i) == seed_1.train_problem(i) for i in range(200))
  assert same < 5
  assert seed_0.test_problems(50) != seed_1.test_problems(50)


def test_known_first_problem_is_stable():
  # Pins the stream: a change to the generation would silently change every experiment.
  problem = arithmetic.ArithmeticGenerator(digits=2, seed=0).train_problem(0)
  assert (problem.question, problem.answer) == ("In base 12, what is -8 - -5?", "-3")


@pytest.mark.parametrize("kwargs,message", [
    (dict(digits=0), "digits=0 is invalid"),
    (dict(digits=2, min_base=1), "min_base=1 is invalid"),
    (dict(digits=2, max_base=17), "max_base=17 is invalid"),
    (dict(digits=2, min_base=9, max_base=3), "min_base=9 is larger than max_base=3"),
    (dict(digits=2, test_fraction=1.0), "test_fraction=1.0 is invalid"),
])
def test_invalid_generator_settings_are_rejected(kwargs, message):
  with pytest.raises(ValueError, match=message):
    arithmetic.ArithmeticGenerator(**kwargs)


def test_negative_index_is_rejected():
  with pytest.raises(ValueError, match="Problem index -1 is invalid"):
    arithmetic.ArithmeticGenerator(digits=1).train_problem(-1)
