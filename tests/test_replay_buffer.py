"""Tests for jaxsi.replay_buffer: FIFO order, capacity, deterministic draws, JSON round trip."""

import json

import numpy as np
import pytest

from jaxsi.replay_buffer import ReplayBuffer

S, L = 4, 5


def rows(first, n, seed=0):
  """n rows whose ids encode their number (row i holds 10 * (first + i) + position)."""
  rng = np.random.default_rng(seed + first)
  ids = 10 * (first + np.arange(n))[:, None]
  prompt_len = rng.integers(1, S + 1, n)
  action_len = rng.integers(0, L + 1, n)
  prompt_mask = (np.arange(S)[None, :] >= S - prompt_len[:, None]).astype(np.int32)
  actions_mask = (np.arange(L)[None, :] < action_len[:, None]).astype(np.int32)
  prompt = (ids + np.arange(S)) * prompt_mask
  actions = (ids + 5 + np.arange(L)) * actions_mask
  truncated = (first + np.arange(n)) % 3 == 0
  return prompt, prompt_mask, actions, actions_mask, truncated


def row_numbers(buffer_rows):
  return (buffer_rows["prompt"].max(axis=1) // 10).tolist()


def test_fifo_order_and_capacity():
  buffer = ReplayBuffer(capacity=6, prompt_width=S, actions_width=L)
  assert len(buffer) == 0
  buffer.add(*rows(0, 4))
  assert len(buffer) == 4 and row_numbers(buffer.rows()) == [0, 1, 2, 3]
  buffer.add(*rows(4, 3))            # one over: row 0 goes
  assert len(buffer) == 6 and row_numbers(buffer.rows()) == [1, 2, 3, 4, 5, 6]
  buffer.add(*rows(7, 9))            # more than the capacity at once: only the newest 6 stay
  assert row_numbers(buffer.rows()) == [10, 11, 12, 13, 14, 15]
  assert buffer.added == 16
  # Every stored field is the row that was added.
  want = rows(7, 9)
  got = buffer.rows()
  for key, value in zip(("prompt", "prompt_mask", "actions", "actions_mask", "truncated"), want):
    np.testing.assert_array_equal(got[key], value[3:], err_msg=key)


def test_sampling_is_deterministic_and_uniform():
  buffer = ReplayBuffer(capacity=8, prompt_width=S, actions_width=L, seed=3)
  buffer.add(*rows(0, 8))
  a, b = buffer.sample(5, 6), buffer.sample(5, 6)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  assert len(set(row_numbers(a))) == 6          # without replacement when n <= len
  assert row_numbers(buffer.sample(6, 6)) != row_numbers(a)
  other_seed = ReplayBuffer(capacity=8, prompt_width=S, actions_width=L, seed=4)
  other_seed.add(*rows(0, 8))
  assert row_numbers(other_seed.sample(5, 6)) != row_numbers(a)
  assert len(row_numbers(buffer.sample(0, 20))) == 20   # with replacement beyond the size
  # Uniform over rows: 4000 draws of 1 row from 8, chi-square at a loose level.
  counts = np.bincount([row_numbers(buffer.sample(step, 1))[0] for step in range(4000)],
                       minlength=8)
  expected = 4000 / 8
  assert ((counts - expected) ** 2 / expected).sum() < 24.3   # chi2(7) 0.999 quantile


def test_state_dict_round_trips_through_json():
  buffer = ReplayBuffer(capacity=5, prompt_width=S, actions_width=L, seed=1)
  buffer.add(*rows(0, 3))
  buffer.add(*rows(3, 4))     # wrapped around
  state = json.loads(json.dumps(buffer.state_dict()))
  restored = ReplayBuffer.from_state_dict(state, seed=1)
  assert len(restored) == len(buffer) == 5 and restored.added == buffer.added == 7
  for key, value in buffer.rows().items():
    np.testing.assert_array_equal(restored.rows()[key], value, err_msg=key)
  for key, value in buffer.sample(9, 7).items():
    np.testing.assert_array_equal(restored.sample(9, 7)[key], value, err_msg=key)
  # Both keep going the same way.
  buffer.add(*rows(7, 2))
  restored.add(*rows(7, 2))
  assert row_numbers(restored.rows()) == row_numbers(buffer.rows()) == [4, 5, 6, 7, 8]
  empty = ReplayBuffer.from_state_dict(ReplayBuffer(5, S, L).state_dict())
  assert len(empty) == 0


def test_bad_inputs_fail_in_one_sentence():
  buffer = ReplayBuffer(capacity=4, prompt_width=S, actions_width=L)
  with pytest.raises(ValueError, match="empty buffer"):
    buffer.sample(0, 1)
  prompt, prompt_mask, actions, actions_mask, truncated = rows(0, 2)
  with pytest.raises(ValueError, match=r"got actions of shape \(2, 4\); expected \(2, 5\)"):
    buffer.add(prompt, prompt_mask, actions[:, :4], actions_mask[:, :4], truncated)
  with pytest.raises(ValueError, match="left-padded prompts"):
    buffer.add(prompt, prompt_mask[:, ::-1], actions, actions_mask, truncated)
  with pytest.raises(ValueError, match="capacity=0 must be a positive integer"):
    ReplayBuffer(capacity=0, prompt_width=S, actions_width=L)
  other = ReplayBuffer(capacity=4, prompt_width=S, actions_width=L + 1)
  with pytest.raises(ValueError, match=r"but this run's is \(4, 4, 5\)"):
    buffer.load_state_dict(other.state_dict())
  with pytest.raises(ValueError, match="Not a replay buffer state"):
    buffer.load_state_dict({"rows": []})
