"""Tests for packing token lists into the fixed-shape batch layout."""

import numpy as np
import pytest

from jaxsi.data import batching

PAD = 0


def test_prompts_left_padded_and_responses_right_padded():
  batch = batching.pack([[5, 6, 7], [8]], [[9], [10, 11, 12]],
                        max_prompt_len=4, max_response_len=3, pad_id=PAD)
  np.testing.assert_array_equal(batch["prompt"], [[0, 5, 6, 7], [0, 0, 0, 8]])
  np.testing.assert_array_equal(batch["prompt_mask"], [[0, 1, 1, 1], [0, 0, 0, 1]])
  np.testing.assert_array_equal(batch["response"], [[9, 0, 0], [10, 11, 12]])
  np.testing.assert_array_equal(batch["response_mask"], [[1, 0, 0], [1, 1, 1]])
  assert all(array.dtype == np.int32 for array in batch.values())


def test_pad_id_fills_padding_and_masks_mark_real_tokens():
  batch = batching.pack([[1, 2]], [[3]], max_prompt_len=3, max_response_len=2, pad_id=99)
  np.testing.assert_array_equal(batch["prompt"], [[99, 1, 2]])
  np.testing.assert_array_equal(batch["response"], [[3, 99]])
  # A real token equal to the pad id stays marked as real.
  batch = batching.pack([[7, 0]], [[0]], max_prompt_len=3, max_response_len=2, pad_id=0)
  np.testing.assert_array_equal(batch["prompt_mask"], [[0, 1, 1]])
  np.testing.assert_array_equal(batch["response_mask"], [[1, 0]])


def test_prompts_alone():
  batch = batching.pack([[4, 5]], max_prompt_len=3, pad_id=PAD)
  assert set(batch) == {"prompt", "prompt_mask"}
  np.testing.assert_array_equal(batch["prompt"], [[0, 4, 5]])


def test_empty_response_is_all_padding():
  batch = batching.pack([[4]], [[]], max_prompt_len=1, max_response_len=2, pad_id=PAD)
  np.testing.assert_array_equal(batch["response_mask"], [[0, 0]])


def test_truncation_left_keeps_prompt_end_and_response_start():
  batch = batching.pack([[1, 2, 3, 4, 5]], [[6, 7, 8, 9]], max_prompt_len=3,
                        max_response_len=2, pad_id=PAD, truncation="left")
  np.testing.assert_array_equal(batch["prompt"], [[3, 4, 5]])
  np.testing.assert_array_equal(batch["response"], [[6, 7]])
  np.testing.assert_array_equal(batch["prompt_mask"], [[1, 1, 1]])


def test_truncation_right_keeps_prompt_start_and_response_start():
  batch = batching.pack([[1, 2, 3, 4, 5], [6]], [[6, 7, 8, 9], [1]], max_prompt_len=3,
                        max_response_len=2, pad_id=PAD, truncation="right")
  np.testing.assert_array_equal(batch["prompt"], [[1, 2, 3], [0, 0, 6]])
  np.testing.assert_array_equal(batch["response"], [[6, 7], [1, 0]])


def test_too_long_prompt_raises_naming_length_and_limit():
  with pytest.raises(ValueError, match=r"Prompt 1 has 4 tokens, more than max_prompt_len=3; "
                     r"raise data\.max_prompt_len"):
    batching.pack([[1], [1, 2, 3, 4]], max_prompt_len=3, pad_id=PAD)


def test_too_long_response_raises_naming_length_and_limit():
  with pytest.raises(ValueError, match=r"Response 0 has 3 tokens, more than "
                     r"max_response_len=2; raise data\.max_response_len"):
    batching.pack([[1]], [[1, 2, 3]], max_prompt_len=3, max_response_len=2, pad_id=PAD)


@pytest.mark.parametrize("prompts,responses,kwargs,message", [
    ([[1]], None, dict(truncation="middle"), "truncation='middle' is invalid"),
    ([], None, {}, "pack got no prompts"),
    ([[1], []], None, {}, "Prompt 1 is empty"),
    ([[1]], [[1], [2]], dict(max_response_len=2), "pack got 1 prompts but 2 responses"),
    ([[1]], [[1]], {}, "max_response_len=None is invalid"),
    ([[1]], None, dict(max_prompt_len=0), "max_prompt_len=0 is invalid"),
])
def test_invalid_arguments_are_rejected(prompts, responses, kwargs, message):
  arguments = dict(max_prompt_len=3, pad_id=PAD) | kwargs
  with pytest.raises(ValueError, match=message):
    batching.pack(prompts, responses, **arguments)
