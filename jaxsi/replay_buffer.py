"""A FIFO replay buffer of model action sequences for SequenceMatch (host side, NumPy).

SequenceMatch trains on half data, half model samples; the samples come from this buffer,
refreshed with the backspace-aware sampler every `sample_every` steps (`jaxsi.sm_batches`).
A row is one generation: its prompt (left-padded, width S), its raw actions (tokens and <bksp>,
right-padded, width L) and whether it was truncated (no EOS at the end).

  buffer = ReplayBuffer(capacity=1024, prompt_width=S, actions_width=L, seed=0)
  buffer.add(prompt, prompt_mask, actions, actions_mask, truncated)   # [n, ...] NumPy rows
  rows = buffer.sample(step, 32)                                      # dict of [32, ...] arrays
  side = buffer.state_dict()                  # JSON-able; saved with each checkpoint
  buffer.load_state_dict(side)                # on resume

Sampling is a pure function of (seed, step, contents), so a resumed run draws exactly what an
uninterrupted one draws. Every host holds the same (global) buffer.
"""

from __future__ import annotations

from typing import Any

import numpy as np

FORMAT = "jaxsi.replay_buffer/1"
KEYS = ("prompt", "prompt_mask", "actions", "actions_mask", "truncated")


def _positive_int(name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"ReplayBuffer {name}={value!r} must be a positive integer.")
  return int(value)


class ReplayBuffer:
  """Fixed-capacity FIFO of (prompt, actions, truncated) rows with fixed widths.

  Args:
    capacity: the most rows held; adding more drops the oldest first.
    prompt_width: S, the width of every prompt row (left-padded).
    actions_width: L, the width of every action row (right-padded).
    seed: seeds `sample` (together with the step).
    pad_id: the id of padding slots in what `sample` returns.
  """

  def __init__(self, capacity: int, prompt_width: int, actions_width: int, *, seed: int = 0,
               pad_id: int = 0):
    self.capacity = _positive_int("capacity", capacity)
    self.prompt_width = _positive_int("prompt_width", prompt_width)
    self.actions_width = _positive_int("actions_width", actions_width)
    self.seed = int(seed)
    self.pad_id = int(pad_id)
    self.clear()

  def clear(self) -> None:
    """Drops every row."""
    c, s, l = self.capacity, self.prompt_width, self.actions_width
    self._rows = {"prompt": np.full((c, s), self.pad_id, np.int32),
                  "prompt_mask": np.zeros((c, s), np.int32),
                  "actions": np.full((c, l), self.pad_id, np.int32),
                  "actions_mask": np.zeros((c, l), np.int32),
                  "truncated": np.zeros((c,), bool)}
    self._next = 0     # the slot the next row goes to
    self._size = 0     # rows held
    self.added = 0     # rows ever added (for metrics)

  def __len__(self) -> int:
    return self._size

  def _order(self) -> np.ndarray:
    """Physical slots of the held rows, oldest first."""
    return (self._next - self._size + np.arange(self._size)) % self.capacity

  def add(self, prompt: Any, prompt_mask: Any, actions: Any, actions_mask: Any,
          truncated: Any) -> None:
    """Appends n rows, dropping the oldest beyond the capacity.

    Args:
      prompt: [n, S] int, left-padded.
      prompt_mask: [n, S], 1 on real prompt tokens (a suffix of the row).
      actions: [n, L] int raw actions.
      actions_mask: [n, L], 1 on real actions (a prefix of the row).
      truncated: [n] bool.
    """
    new = {"prompt": np.asarray(prompt, np.int32), "prompt_mask": np.asarray(prompt_mask, np.int32),
           "actions": np.asarray(actions, np.int32),
           "actions_mask": np.asarray(actions_mask, np.int32),
           "truncated": np.asarray(truncated, bool)}
    n = new["truncated"].shape[0] if new["truncated"].ndim == 1 else -1
    for key, width in (("prompt", self.prompt_width), ("prompt_mask", self.prompt_width),
                       ("actions", self.actions_width), ("actions_mask", self.actions_width),
                       ("truncated", None)):
      want = (n,) if width is None else (n, width)
      if n < 0 or new[key].shape != want:
        raise ValueError(f"ReplayBuffer.add got {key} of shape {new[key].shape}; expected "
                         f"{want if n >= 0 else '[n]'} (prompt width {self.prompt_width}, "
                         f"actions width {self.actions_width}).")
    as_steps = lambda mask: np.diff((mask > 0).astype(np.int8), axis=1)
    if not (np.all(as_steps(new["prompt_mask"]) >= 0)
            and np.all(as_steps(new["actions_mask"]) <= 0)):
      raise ValueError("ReplayBuffer.add needs left-padded prompts (mask 0..0 1..1) and "
                       "right-padded actions (mask 1..1 0..0).")
    # Only the newest `capacity` rows can survive; row i goes to slot next + i.
    kept = np.arange(max(n - self.capacity, 0), n)
    slots = (self._next + kept) % self.capacity
    for key in KEYS:
      self._rows[key][slots] = new[key][kept]
    self._next = int((self._next + n) % self.capacity)
    self._size = min(self._size + n, self.capacity)
    self.added += n

  def rows(self) -> dict[str, np.ndarray]:
    """Every held row, oldest first: a dict of [len(self), ...] arrays (copies)."""
    order = self._order()
    return {key: self._rows[key][order] for key in KEYS}

  def sample(self, step: int, n: int) -> dict[str, np.ndarray]:
    """n rows drawn uniformly (without replacement when n <= len(self)), keyed by `step`.

    Returns:
      {"prompt": [n, S], "prompt_mask": [n, S], "actions": [n, L], "actions_mask": [n, L]
       (int32), "truncated": [n] bool}.

    Raises:
      ValueError: the buffer is empty.
    """
    if self._size == 0:
      raise ValueError("ReplayBuffer.sample was called on an empty buffer; add rows first.")
    rng = np.random.default_rng([self.seed, int(step)])
    picks = rng.choice(self._size, size=n, replace=n > self._size)
    slots = self._order()[picks]
    return {key: self._rows[key][slots] for key in KEYS}

  def state_dict(self) -> dict[str, Any]:
    """The contents as JSON-able Python values (rows oldest first, padding stripped)."""
    rows = self.rows()
    out = []
    for i in range(self._size):
      prompt = rows["prompt"][i][rows["prompt_mask"][i] > 0]
      actions = rows["actions"][i][rows["actions_mask"][i] > 0]
      out.append({"prompt": prompt.tolist(), "actions": actions.tolist(),
                  "truncated": bool(rows["truncated"][i])})
    return {"format": FORMAT, "capacity": self.capacity, "prompt_width": self.prompt_width,
            "actions_width": self.actions_width, "added": self.added, "rows": out}

  def load_state_dict(self, state: dict[str, Any]) -> None:
    """Replaces the contents by those of `state_dict()` (from this or an equal-shaped buffer).

    Raises:
      ValueError: `state` is not a buffer state or its widths or capacity differ.
    """
    if not isinstance(state, dict) or state.get("format") != FORMAT:
      raise ValueError(f"Not a replay buffer state (expected format {FORMAT!r}); was the "
                       "checkpoint written by another objective?")
    saved = (state["capacity"], state["prompt_width"], state["actions_width"])
    ours = (self.capacity, self.prompt_width, self.actions_width)
    if saved != ours:
      raise ValueError(f"The saved replay buffer has (capacity, prompt width, actions width) "
                       f"{saved} but this run's is {ours}; resume with the config the "
                       "checkpoint was written with.")
    rows = state["rows"]
    n = len(rows)
    prompt = np.full((n, self.prompt_width), self.pad_id, np.int32)
    prompt_mask = np.zeros((n, self.prompt_width), np.int32)
    actions = np.full((n, self.actions_width), self.pad_id, np.int32)
    actions_mask = np.zeros((n, self.actions_width), np.int32)
    for i, row in enumerate(rows):
      p, a = row["prompt"], row["actions"]
      if len(p):
        prompt[i, -len(p):] = p
        prompt_mask[i, -len(p):] = 1
      actions[i, :len(a)] = a
      actions_mask[i, :len(a)] = 1
    self.clear()
    if n:
      self.add(prompt, prompt_mask, actions, actions_mask,
               np.asarray([row["truncated"] for row in rows], bool))
    self.added = int(state["added"])

  @classmethod
  def from_state_dict(cls, state: dict[str, Any], *, seed: int = 0,
                      pad_id: int = 0) -> "ReplayBuffer":
    """A new buffer holding the contents of `state_dict()`."""
    buffer = cls(state["capacity"], state["prompt_width"], state["actions_width"], seed=seed,
                 pad_id=pad_id)
    buffer.load_state_dict(state)
    return buffer
