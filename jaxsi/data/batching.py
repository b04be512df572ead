"""Packs token sequences into the fixed-shape batch every model consumes.

Layout (see `jaxsi.models.lm`): prompts LEFT-padded, so the last prompt token of every row
sits in the last column and generation starts at the same place for all rows; responses
RIGHT-padded, so response slot t is response token t in every row. Fixed shapes keep the
jitted train step and sampler from recompiling.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

TRUNCATION_MODES = ("error", "left", "right")


def _fit(sequence: Sequence[int], limit: int, *, what: str, row: int, truncation: str,
         cut_side: str) -> Sequence[int]:
  """Returns `sequence` cut to at most `limit` tokens on `cut_side`, or raises for "error"."""
  if len(sequence) <= limit:
    return sequence
  if truncation == "error":
    raise ValueError(
        f"{what.capitalize()} {row} has {len(sequence)} tokens, more than max_{what}_len="
        f"{limit}; raise data.max_{what}_len or pass truncation='left' or 'right'.")
  if cut_side == "left":
    return sequence[len(sequence) - limit:]
  return sequence[:limit]


def pack(prompts: Sequence[Sequence[int]],
         responses: Sequence[Sequence[int]] | None = None, *,
         max_prompt_len: int,
         max_response_len: int | None = None,
         pad_id: int,
         truncation: str = "error") -> dict[str, np.ndarray]:
  """Pads (and optionally truncates) token lists into fixed-shape int32 arrays.

  Args:
    prompts: B token lists, each non-empty.
    responses: B token lists (EOS included if wanted), or None for prompts alone (sampling).
    max_prompt_len: S, the prompt width.
    max_response_len: T, the response width; required when `responses` is given.
    pad_id: the id written into padding slots.
    truncation: what to do with a sequence longer than its width. "error" raises.
      "left" cuts prompts on the left, keeping their end (the tokens next to the response,
      what a decoder continues from); "right" cuts prompts on the right, keeping their
      start (e.g. the lead of an article fed to an encoder). Responses are always cut on
      the right, keeping their start, because response slot t must stay token t.

  Returns:
    `prompt` [B, S] int32 left-padded, `prompt_mask` [B, S] int32 (1 on real tokens), and
    when `responses` is given `response` [B, T] int32 right-padded and `response_mask` [B, T]
    int32.
  """
  if truncation not in TRUNCATION_MODES:
    raise ValueError(f"truncation={truncation!r} is invalid; use one of {TRUNCATION_MODES}.")
  if not prompts:
    raise ValueError("pack got no prompts; pass at least one.")
  if not isinstance(max_prompt_len, int) or max_prompt_len < 1:
    raise ValueError(f"max_prompt_len={max_prompt_len!r} is invalid; use a positive integer.")
  num_rows = len(prompts)

  prompt = np.full((num_rows, max_prompt_len), pad_id, dtype=np.int32)
  prompt_mask = np.zeros((num_rows, max_prompt_len), dtype=np.int32)
  for row, tokens in enumerate(prompts):
    if len(tokens) == 0:
      raise ValueError(f"Prompt {row} is empty; every prompt needs at least one token "
                       "(e.g. BOS) for the model to condition on.")
    tokens = _fit(tokens, max_prompt_len, what="prompt", row=row, truncation=truncation,
                  cut_side=truncation)
    prompt[row, max_prompt_len - len(tokens):] = tokens
    prompt_mask[row, max_prompt_len - len(tokens):] = 1
  batch = {"prompt": prompt, "prompt_mask": prompt_mask}
  if responses is None:
    return batch

  if len(responses) != num_rows:
    raise ValueError(f"pack got {num_rows} prompts but {len(responses)} responses; pass one "
                     "response per prompt.")
  if not isinstance(max_response_len, int) or max_response_len < 1:
    raise ValueError(f"max_response_len={max_response_len!r} is invalid; use a positive "
                     "integer when packing responses.")
  response = np.full((num_rows, max_response_len), pad_id, dtype=np.int32)
  response_mask = np.zeros((num_rows, max_response_len), dtype=np.int32)
  for row, tokens in enumerate(responses):
    tokens = _fit(tokens, max_response_len, what="response", row=row, truncation=truncation,
                  cut_side="right")
    response[row, :len(tokens)] = tokens
    response_mask[row, :len(tokens)] = 1
  batch.update(response=response, response_mask=response_mask)
  return batch
