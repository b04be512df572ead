"""Analytic model FLOPs of jaxsi's language models, for throughput and MFU.

Counted: every matrix multiplication, as 2·m·n·k FLOPs (a multiply and an add per term), i.e.
the query/key/value/output projections, the attention scores (q·kᵀ) and mixing (p·v), the MLP
(2 matmuls, 3 when gated: Llama's SwiGLU, T5 v1.1's GeGLU) and the output head. Not counted:
embedding lookups and the relative position bias (gathers, no arithmetic), and the elementwise
work (norms, activations, softmax, biases, residuals), which is O(width) per token against
O(width²) for the matmuls; XLA's own count (`compiled.cost_analysis()["flops"]`) includes it
and lands about 1 % above these numbers for the benchmark's GPT-2 shape (`tests/test_flops.py`).

Attention is counted over every key the arrays hold, as jaxsi computes it: dense score
matrices with masks, not a causal half. For teacher-forced `LanguageModel.logits`:

  decoder  one sequence of L = S + T − 1 positions (prompt plus the response without its last
           token, which is never an input); scores [L, L]; the head runs on the T response
           positions only, and so does the last layer's query side (queries, scores, output
           projection, MLP) unless the layers are scanned (`DecoderBlock`'s `num_outputs`).
  T5       encoder on the S prompt tokens (scores [S, S]); decoder on T positions (the start
           token plus the response without its last token) with self-attention [T, T] and
           cross-attention [T, S] (the cross keys/values are projected once per layer from
           the S encoder outputs); the head on all T positions.

Sampling (`jaxsi.sampling`) runs `prefill` on the prompt once, then `new_tokens − 1` decode
steps, each feeding one token per row. A decode step attends to the keys of the current length
(the prompt and the response slots so far); jaxsi's sampler multiplies against its whole
allocated cache, masked, which `decode_flops(..., full_cache=True)` counts instead.

A train step is `3 ×` the forward pass: the backward pass of each matmul computes two products
of the forward's size (the gradients of both operands). A distillation (GKD) step adds the
frozen teacher's forward pass on the same batch (`distillation_step_flops`); an on-policy step
also samples its responses first (`decode_flops`).
"""

from __future__ import annotations

from typing import Any, Mapping

FAMILIES = ("decoder", "t5")


def _get(config: Any, key: str) -> Any:
  try:
    return config[key]
  except (KeyError, AttributeError):
    raise ValueError(f"Model config lacks {key!r}, which FLOP counting needs; build it from "
                     "jaxsi.models.decoder.default_config or jaxsi.models.t5.default_config."
                     ) from None


def _family(config: Any) -> str:
  family = config.get("family") if hasattr(config, "get") else None
  if family not in FAMILIES:
    raise ValueError(f"Unknown model family {family!r} for FLOP counting; accepted: "
                     f"{list(FAMILIES)}.")
  return family


def _check_sizes(**sizes: int) -> None:
  for name, value in sizes.items():
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{name}={value!r} must be a positive integer.")


def _mlp_matmuls(config: Any) -> int:
  """Matmuls of width d_model × d_ff per token in one MLP: 3 when gated, else 2."""
  if _family(config) == "decoder":
    gated = _get(config, "variant") == "llama"
  else:
    gated = _get(config, "variant") == "v1_1"
  return 3 if gated else 2


def _heads(config: Any) -> tuple[int, int, int]:
  """(query heads, key/value heads, head_dim); T5 has no grouped-query attention."""
  heads = _get(config, "num_heads")
  kv_heads = _get(config, "num_kv_heads") if _family(config) == "decoder" else heads
  return heads, kv_heads, _get(config, "head_dim")


def _attention_flops(config: Any, queries: int, kv_inputs: int, keys: int) -> int:
  """One attention block for one row.

  Args:
    config: the model config.
    queries: query positions (projected and attending).
    kv_inputs: positions whose keys and values are projected in this call.
    keys: keys each query is scored against (cached ones included).
  """
  d_model = _get(config, "d_model")
  heads, kv_heads, head_dim = _heads(config)
  projections = 2 * d_model * head_dim * (2 * heads * queries + 2 * kv_heads * kv_inputs)
  scores_and_mixing = 2 * 2 * queries * keys * heads * head_dim
  return projections + scores_and_mixing


def _mlp_flops(config: Any, positions: int) -> int:
  return 2 * _mlp_matmuls(config) * _get(config, "d_model") * _get(config, "d_ff") * positions


def _head_flops(config: Any, positions: int) -> int:
  return 2 * _get(config, "d_model") * _get(config, "vocab_size") * positions


def _decoder_stack_flops(config: Any, positions: int, keys: int, head_positions: int) -> int:
  """A decoder-only model on `positions` new tokens attending to `keys` keys, one row.

  The last layer computes its output only at the `head_positions` positions whose logits are
  wanted, unless the layers run as one scan (then every layer computes all of them).
  """
  layer = _attention_flops(config, positions, positions, keys) + _mlp_flops(config, positions)
  outputs = positions if config.get("scan_layers", False) else head_positions
  last = _attention_flops(config, outputs, positions, keys) + _mlp_flops(config, outputs)
  return ((_get(config, "num_layers") - 1) * layer + last
          + _head_flops(config, head_positions))


def _t5_encoder_flops(config: Any, prompt_len: int) -> int:
  layer = (_attention_flops(config, prompt_len, prompt_len, prompt_len)
           + _mlp_flops(config, prompt_len))
  return _get(config, "num_layers") * layer


def _t5_cross_kv_flops(config: Any, prompt_len: int) -> int:
  """Cross-attention keys and values of the encoder output, all decoder layers, one row."""
  d_model = _get(config, "d_model")
  heads, _, head_dim = _heads(config)
  return _get(config, "num_decoder_layers") * 2 * 2 * d_model * heads * head_dim * prompt_len


def _t5_decoder_flops(config: Any, positions: int, self_keys: int, prompt_len: int) -> int:
  """T5's decoder on `positions` new slots (cross keys/values already projected), one row."""
  d_model = _get(config, "d_model")
  heads, _, head_dim = _heads(config)
  cross = (2 * 2 * d_model * heads * head_dim * positions            # query and output
           + 2 * 2 * positions * prompt_len * heads * head_dim)      # scores and mixing
  layer = (_attention_flops(config, positions, positions, self_keys) + cross
           + _mlp_flops(config, positions))
  return _get(config, "num_decoder_layers") * layer + _head_flops(config, positions)


def forward_flops(model_config: Any, *, batch: int, prompt_len: int, response_len: int) -> float:
  """FLOPs of one teacher-forced `LanguageModel.logits` call (see the module docstring).

  Args:
    model_config: a decoder ("gpt2"/"llama") or T5 ("v1_0"/"v1_1") model config.
    batch: rows B.
    prompt_len: prompt width S (padding included: jaxsi computes on every slot).
    response_len: response width T (the logits' length).

  Returns:
    Matmul FLOPs of the forward pass, as a float.
  """
  _check_sizes(batch=batch, prompt_len=prompt_len, response_len=response_len)
  if _family(model_config) == "decoder":
    length = prompt_len + response_len - 1
    per_row = _decoder_stack_flops(model_config, length, length, response_len)
  else:
    per_row = (_t5_encoder_flops(model_config, prompt_len)
               + _t5_cross_kv_flops(model_config, prompt_len)
               + _t5_decoder_flops(model_config, response_len, response_len, prompt_len))
  return float(batch * per_row)


def train_step_flops(model_config: Any, *, batch: int, prompt_len: int,
                     response_len: int) -> float:
  """FLOPs of one optimizer step on the trained model: 3 × `forward_flops` (forward + backward).

  Frozen models evaluated inside the step (a GKD teacher) and the optimizer update (elementwise)
  are not included.
  """
  return 3.0 * forward_flops(model_config, batch=batch, prompt_len=prompt_len,
                             response_len=response_len)


def distillation_step_flops(student_config: Any, teacher_config: Any, *, batch: int,
                            prompt_len: int, response_len: int) -> float:
  """FLOPs of one distillation train step (GKD): student forward + backward, teacher forward.

  The student is trained (`train_step_flops`, 3 × its forward); the frozen teacher scores the
  same batch once under `stop_gradient` (`forward_flops`, no backward). Sampling the responses
  is a separate program before the step: add `decode_flops` for an on-policy step.

  Args:
    student_config: the trained model's config.
    teacher_config: the frozen teacher's config (its head as wide as the student's).
    batch: rows B.
    prompt_len: prompt width S.
    response_len: response width T.

  Returns:
    Matmul FLOPs of the step, as a float.
  """
  sizes = dict(batch=batch, prompt_len=prompt_len, response_len=response_len)
  return train_step_flops(student_config, **sizes) + forward_flops(teacher_config, **sizes)


def batch_train_step_flops(model_config: Any, batch: Mapping[str, Any]) -> float:
  """`train_step_flops` for the shapes of a train batch (`prompt` [B, S], `response` [B, T])."""
  batch_size, prompt_len = batch["prompt"].shape
  response_len = batch["response"].shape[1]
  return train_step_flops(model_config, batch=int(batch_size), prompt_len=int(prompt_len),
                          response_len=int(response_len))


def prefill_flops(model_config: Any, *, batch: int, prompt_len: int,
                  cache_slots: int = 0) -> float:
  """FLOPs of `LanguageModel.prefill` on B prompts of width S.

  Args:
    model_config: the model config.
    batch: prompts B.
    prompt_len: prompt width S.
    cache_slots: empty response slots T5's start token is also scored against (its prefill
      attends over the whole allocated self-attention cache, `max_new_tokens` slots, masked); 0
      counts the useful keys only. A decoder's prefill scores the prompt slots only, so decoders
      ignore it.

  Returns:
    Matmul FLOPs: decoders run the prompt and the head on its last position; T5 runs the
    encoder, projects the cross keys/values and runs the start token through the decoder.
  """
  _check_sizes(batch=batch, prompt_len=prompt_len)
  if _family(model_config) == "decoder":
    per_row = _decoder_stack_flops(model_config, prompt_len, prompt_len, 1)
  else:
    per_row = (_t5_encoder_flops(model_config, prompt_len)
               + _t5_cross_kv_flops(model_config, prompt_len)
               + _t5_decoder_flops(model_config, 1, 1 + cache_slots, prompt_len))
  return float(batch * per_row)


def decode_step_flops(model_config: Any, *, batch: int, prompt_len: int,
                      response_slots: int) -> float:
  """FLOPs of one `LanguageModel.decode_step`: one new token per row.

  Args:
    model_config: the model config.
    batch: rows B.
    prompt_len: prompt width S (decoders attend to it as cached keys, T5 as cross keys).
    response_slots: response slots the new token is scored against, itself included (its
      slot index + 1 for the current length; the allocated `max_new_tokens` for what jaxsi's
      cache multiplies).

  Returns:
    Matmul FLOPs of the step, head included.
  """
  _check_sizes(batch=batch, prompt_len=prompt_len, response_slots=response_slots)
  if _family(model_config) == "decoder":
    per_row = _decoder_stack_flops(model_config, 1, prompt_len + response_slots, 1)
  else:  # T5's self-attention also sees the start token.
    per_row = _t5_decoder_flops(model_config, 1, 1 + response_slots, prompt_len)
  return float(batch * per_row)


def decode_flops(model_config: Any, *, batch: int, prompt_len: int, new_tokens: int,
                 num_samples: int = 1, full_cache: bool = False) -> float:
  """FLOPs of sampling `new_tokens` tokens for each of `num_samples` samples of B prompts.

  As `jaxsi.sampling` does it: one prefill per prompt, then `new_tokens − 1` decode steps on
  B × num_samples rows (the last token is never fed back).

  Args:
    model_config: the model config.
    batch: prompts B.
    prompt_len: prompt width S.
    new_tokens: tokens generated per row (no early stop).
    num_samples: samples per prompt N (they share the prompt's prefill).
    full_cache: count attention over the whole allocated cache (`new_tokens` response slots)
      at every call, as jaxsi's sampler computes it; False counts each token's current length.

  Returns:
    Matmul FLOPs of the whole sampling call.
  """
  _check_sizes(batch=batch, prompt_len=prompt_len, new_tokens=new_tokens,
               num_samples=num_samples)
  total = prefill_flops(model_config, batch=batch, prompt_len=prompt_len,
                        cache_slots=new_tokens if full_cache else 0)
  for slot in range(new_tokens - 1):
    total += decode_step_flops(model_config, batch=batch * num_samples, prompt_len=prompt_len,
                               response_slots=new_tokens if full_cache else slot + 1)
  return total
