"""The language-model contract shared by every model family.

Objectives, the trainer and the sampler only ever talk to a `LanguageModel`;
they never know whether it wraps a decoder-only Transformer or T5.

Batch layout (all arrays share the leading batch dimension B):

  prompt               [B, S] int32   LEFT-padded: padding first, then the prompt.
  prompt_mask          [B, S] bool/int 1 on real prompt tokens.
  response             [B, T] int32   RIGHT-padded; normally ends with EOS.
  response_mask        [B, T] bool/int 1 on real response tokens (EOS included).
  response_positions   [B, T] int32   optional; position of each response slot
                                      counted from the start of the response
                                      (default: arange(T)).
  response_visibility  [B, T, T] bool optional; visibility[b, i, j] says whether
                                      response slot i may attend to response
                                      slot j (default: j <= i). The prompt is
                                      always visible to every response slot.

`logits[:, t]` is the next-token distribution for `response[:, t]` given the
prompt and the response slots visible from slot t-1 (for t = 0: the prompt
alone). Decoders see the prompt and response as one sequence; T5 feeds the
prompt to its encoder and the (shifted) response to its decoder.
"""

from __future__ import annotations

import abc
from typing import Any, Mapping

import jax

Params = Any
Batch = Mapping[str, jax.Array]


class LanguageModel(abc.ABC):
  """Functional wrapper around a Flax module.

  Attributes:
    config: the model ConfigDict it was built from.
    vocab_size: width of the output head (V of the logits).
  """

  config: Any
  vocab_size: int

  @abc.abstractmethod
  def init(self, rng: jax.Array) -> Params:
    """Returns freshly initialized parameters (a plain pytree of float32 arrays)."""

  @abc.abstractmethod
  def abstract_params(self) -> Params:
    """Returns the parameter pytree as `jax.ShapeDtypeStruct`s, without allocating."""

  @abc.abstractmethod
  def param_axes(self) -> Params:
    """Returns a pytree like `params` whose leaves are `PartitionSpec`s of logical axis names."""

  @abc.abstractmethod
  def logits(self, params: Params, batch: Batch, *,
             dropout_rng: jax.Array | None = None) -> jax.Array:
    """Teacher-forced logits [B, T, V] float32 for `batch['response']`.

    Dropout is active only when `dropout_rng` is given.
    """

  def hidden(self, params: Params, batch: Batch, *,
             dropout_rng: jax.Array | None = None) -> jax.Array:
    """Teacher-forced features [B, T, E] that `head` maps to `logits` (compute dtype).

    Losses that never hold the full [B, T, V] logits (`jaxsi.objectives.chunked`) apply
    `head` to slices of these.
    """
    raise NotImplementedError(f"{type(self).__name__} does not expose its features.")

  def head(self, params: Params, hidden: jax.Array) -> jax.Array:
    """The output head: features [..., E] -> logits [..., V] float32."""
    raise NotImplementedError(f"{type(self).__name__} does not expose its output head.")

  @abc.abstractmethod
  def prefill(self, params: Params, prompt: jax.Array, prompt_mask: jax.Array,
              max_new_tokens: int) -> tuple[jax.Array, Any]:
    """Runs the prompt once and allocates a cache for `max_new_tokens` response slots.

    Args:
      prompt: [B, S] int32, left-padded.
      prompt_mask: [B, S].
      max_new_tokens: number of response slots the cache holds (static).

    Returns:
      (logits [B, V] float32 for response slot 0, cache pytree).
    """

  @abc.abstractmethod
  def decode_step(self, params: Params, cache: Any, token: jax.Array,
                  slot: jax.Array, position: jax.Array,
                  visible: jax.Array) -> tuple[jax.Array, Any]:
    """Feeds one response token and returns the logits for the next one.

    Args:
      cache: from `prefill` (or a previous `decode_step`).
      token: [B] int32, written into response slot `slot`.
      slot: [] int32, cache slot index in [0, max_new_tokens).
      position: [B] int32, its position counted from the start of the response.
      visible: [B, max_new_tokens] bool, which response slots this token attends to
        (itself included); the prompt is always visible.

    Returns:
      (logits [B, V] float32 for the next response token, updated cache).

    With slot = t, position = t and visible = arange(max_new_tokens) <= t this
    reproduces `logits(...)[:, t + 1]` exactly.
    """
