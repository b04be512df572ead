"""Growing a model's vocabulary by new token rows (e.g. SequenceMatch's `<bksp>` action).

Every parameter dimension whose logical axis name is "vocab" (the input embedding, the output
head, tied or untied, in both model families) gains the new rows; nothing else changes, so the
logits of the existing tokens are exactly what they were.

Padded heads. `jaxsi.models.from_pretrained(..., pad_vocab_multiple=N)` pads the vocabulary
with rows that are never sampled: ids [num_real_tokens, vocab_size). A new token must be
sampleable, so the new ids are always the first ids after the real ones,
[real, real + num_new) with real = `real_vocab_size(lm)`:

  - no padding: the head widens from V to V + num_new and the new ids are V, ..., V + num_new - 1;
  - padding with room: the new tokens take over the first padding rows, the width stays V and
    `num_real_tokens` grows by num_new (None once every row is real);
  - padding without room: the padding rows are dropped and the head becomes real + num_new wide
    (every row real).

`to_pretrained` exports the rows [0, num_real_tokens), so the new tokens are exported too.
"""

from __future__ import annotations

import copy
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from jaxsi.models.lm import LanguageModel, Params

INITS = ("mean", "zeros")
VOCAB_AXIS = "vocab"


def real_vocab_size(lm: LanguageModel) -> int:
  """The number of real (sampleable) token ids: `num_real_tokens` when the head is padded."""
  config = lm.config
  real = config.get("num_real_tokens", None) if hasattr(config, "get") else None
  return lm.vocab_size if real is None or real >= lm.vocab_size else int(real)


def _is_spec(x: Any) -> bool:
  return isinstance(x, PartitionSpec)


def _grow_leaf(leaf: Any, spec: PartitionSpec, real: int, num_new: int, width: int,
               init: str) -> Any:
  """Writes `num_new` rows after the first `real` ones along every "vocab" dim of `leaf`.

  The result has `width` rows along those dims: [0, real) kept, [real, real + num_new) new,
  the rest (padding kept from the old leaf) unchanged.
  """
  # Host parameters (e.g. from `from_pretrained`) stay NumPy, device parameters stay jax.
  xp = np if isinstance(leaf, np.ndarray) else jnp
  for dim, name in enumerate(tuple(spec)):
    if name != VOCAB_AXIS:
      continue
    kept = xp.take(leaf, xp.arange(real), axis=dim)
    if init == "mean":
      new_row = xp.mean(kept, axis=dim, keepdims=True)
    else:
      new_row = xp.zeros_like(xp.take(leaf, xp.arange(1), axis=dim))
    new_rows = xp.concatenate([new_row] * num_new, axis=dim)
    rest = xp.take(leaf, xp.arange(real + num_new, width), axis=dim)
    leaf = xp.concatenate([kept, new_rows.astype(leaf.dtype), rest], axis=dim)
  return leaf


def grow_vocab(lm: LanguageModel, params: Params, num_new: int = 1, *,
               init: str = "mean") -> tuple[LanguageModel, Params]:
  """Adds `num_new` token rows to the embedding and output head.

  Args:
    lm: a decoder (gpt2 or llama) or T5 `LanguageModel`.
    params: its parameters (device arrays or the host NumPy arrays of `from_pretrained`).
    num_new: how many tokens to add (>= 1).
    init: "mean" (each new row is the mean of the real rows, so a new token starts out as an
      "average" token: its embedding is the mean embedding and its logit the mean logit) or
      "zeros".

  Returns:
    (new_lm, new_params): a model built from a copy of `lm.config` with `vocab_size` (and
    `num_real_tokens`) updated, and parameters with the new rows. The new token ids are
    [r, r + num_new) with r = `real_vocab_size(lm)`; see the module docstring for padded heads.
  """
  from jaxsi.models import build  # pylint: disable=g-import-not-at-top
  if not isinstance(num_new, int) or isinstance(num_new, bool) or num_new < 1:
    raise ValueError(f"grow_vocab num_new={num_new!r} must be a positive integer.")
  if init not in INITS:
    raise ValueError(f"grow_vocab init={init!r} is unknown; accepted: {list(INITS)}.")
  if "num_real_tokens" not in lm.config:
    raise ValueError(f"grow_vocab needs a model config with a num_real_tokens key; the "
                     f"{lm.config.get('family')!r} config has none.")
  real = real_vocab_size(lm)
  new_real = real + num_new
  # Without room in the padding, drop the padding rather than keep dead rows.
  width = lm.vocab_size if new_real <= lm.vocab_size else new_real
  axes = lm.param_axes()
  try:
    new_params = jax.tree.map(
        lambda spec, leaf: _grow_leaf(leaf, spec, real, num_new, width, init), axes, params,
        is_leaf=_is_spec)
  except ValueError as e:
    raise ValueError(f"grow_vocab got parameters whose tree does not match the model's "
                     f"({e}).") from e

  config = copy.deepcopy(lm.config)
  config.vocab_size = width
  config.num_real_tokens = None if new_real >= width else new_real
  return build(config), new_params
