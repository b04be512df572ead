"""Reward registry: built-in rewards against hand-computed values, user functions, errors."""

import numpy as np
import pytest

from jaxsi.objectives import rewards


def test_exact_match_strips_whitespace():
  got = rewards.get_reward("exact_match")(["42", " 7\n", "7", ""], ["42 ", "7", "8", ""])
  assert got.dtype == np.float32 and got.shape == (4,)
  np.testing.assert_array_equal(got, [1.0, 1.0, 0.0, 1.0])


def test_rouge_values_by_hand():
  # prediction bigrams {the cat, cat sat} all in the target's 5: P = 1, R = 2/5.
  # LCS "the cat sat" = 3 tokens: P = 1, R = 3/6.
  predictions = ["the cat sat", "dogs bark", "the cat sat on the mat"]
  targets = ["the cat sat on the mat", "cats meow", "the cat sat on the mat"]
  rouge2 = rewards.get_reward("rouge2")(predictions, targets)
  rouge_l = rewards.get_reward("rougeL")(predictions, targets)
  assert rouge2.dtype == np.float32 and rouge_l.dtype == np.float32
  np.testing.assert_allclose(rouge2, [2 * 0.4 / 1.4, 0.0, 1.0], rtol=1e-6)
  np.testing.assert_allclose(rouge_l, [2 * 0.5 / 1.5, 0.0, 1.0], rtol=1e-6)
  # Porter stemming, as in the eval metrics: "sitting" ~ "sit", "cats" ~ "cat".
  np.testing.assert_allclose(rewards.get_reward("rouge2")(["cats sitting"], ["cat sit"]), [1.0])


def test_user_function_by_import_string(tmp_path, monkeypatch):
  (tmp_path / "my_rewards.py").write_text(
      "def length_ratio(predictions, targets):\n"
      "  return [len(p) / max(len(t), 1) for p, t in zip(predictions, targets)]\n"
      "def wrong_shape(predictions, targets):\n"
      "  return [0.0]\n"
      "def not_finite(predictions, targets):\n"
      "  return [float('nan')] * len(predictions)\n"
      "NOT_A_FUNCTION = 3\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  fn = rewards.get_reward("my_rewards:length_ratio")
  got = fn(["ab", "abcd"], ["abcd", "ab"])
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, [0.5, 2.0])
  with pytest.raises(ValueError, match=r"returned shape \(1,\); expected .* shape \(2,\)"):
    rewards.get_reward("my_rewards:wrong_shape")(["a", "b"], ["a", "b"])
  with pytest.raises(ValueError, match="non-finite"):
    rewards.get_reward("my_rewards:not_finite")(["a"], ["a"])
  with pytest.raises(ValueError, match="has no function 'NOT_A_FUNCTION'"):
    rewards.get_reward("my_rewards:NOT_A_FUNCTION")
  with pytest.raises(ValueError, match="has no function 'missing'"):
    rewards.get_reward("my_rewards:missing")


def test_bad_names_and_inputs_fail_clearly():
  with pytest.raises(ValueError, match="Unknown reward 'bleu'; expected one of exact_match, "
                                       "rouge2, rougeL or 'module:function'"):
    rewards.get_reward("bleu")
  with pytest.raises(ValueError, match="module 'no_such_module_xyz' cannot be imported"):
    rewards.get_reward("no_such_module_xyz:f")
  with pytest.raises(ValueError, match="is not 'module:function'"):
    rewards.get_reward("mod:")
  with pytest.raises(ValueError, match="empty or not a string"):
    rewards.get_reward("")
  with pytest.raises(ValueError, match="2 predictions for 1 targets"):
    rewards.get_reward("exact_match")(["a", "b"], ["a"])
  with pytest.raises(ValueError, match="prediction at index 0 is a int"):
    rewards.get_reward("rouge2")([3], ["a"])
  assert rewards.names() == ("exact_match", "rouge2", "rougeL")
