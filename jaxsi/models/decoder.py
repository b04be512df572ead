"""Decoder-only Transformer language model: GPT-2 and Llama variants.

- "gpt2": learned absolute positions, LayerNorm, GELU (tanh approximation) MLP,
  biases, tied input/output embeddings.
- "llama": rotary positions, RMSNorm, SwiGLU MLP, grouped-query attention, an
  untied output head, no biases (optional query/key/value bias as in Qwen2).

The prompt and the response form one sequence. Prompts are left-padded, so a
prompt token's position is the number of real prompt tokens before it; a
response slot's position is the number of real prompt tokens plus its position
relative to the response start (`response_positions`). Attention from a
response slot covers every real prompt token and the response slots its
`response_visibility` row allows, which is what lets SequenceMatch's backspace
"undo" tokens without reshuffling arrays.

The KV cache used by `prefill` / `decode_step` is a dict:

  {"kv": {"layer_i": {"key", "value"}: [B, K, S + max_new_tokens, D]},
   "prompt_mask": [B, S] bool, "prompt_length": [B] int32}

With `scan_layers` (see `jaxsi.models.layer_stack`) the layers run as one scan and "kv" is
{"key", "value"}: [B, L, K, S + max_new_tokens, D], the layers on axis 1. `remat_policy` (see
`jaxsi.models.remat`) chooses what the backward pass recomputes; `fence_residual_grads` (see
`jaxsi.models.grad_fence`) makes XLA:CPU compute each layer's residual gradient once. None of
them changes the results.

Every leaf has the batch as its leading dimension, so a sampler may repeat a
prompt's cache along it. Keys and values are head-major (heads before slots),
so attention reads them without transposing the cache every step. Slots
[0, S) hold the prompt, slot S + j holds response slot j.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict

from jaxsi.models import grad_fence
from jaxsi.models import layer_stack
from jaxsi.models import layers
from jaxsi.models import remat
from jaxsi.models.lm import Batch, LanguageModel, Params

VARIANTS = ("gpt2", "llama")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def default_config(variant: str = "gpt2") -> ml_collections.ConfigDict:
  """All keys of a decoder model config, with defaults for `variant`.

  "gpt2" defaults to GPT-2 small's shape; "llama" to a Llama-style model of
  similar size. Hugging Face imports (`jaxsi.models.from_pretrained`) fill in
  the real values.

  Args:
    variant: "gpt2" or "llama".

  Returns:
    An unlocked ConfigDict.
  """
  if variant not in VARIANTS:
    raise ValueError(f"Unknown decoder variant {variant!r}; accepted: {list(VARIANTS)}.")
  gpt2 = variant == "gpt2"
  cfg = ml_collections.ConfigDict()
  cfg.family = "decoder"
  cfg.variant = variant
  cfg.vocab_size = 50257 if gpt2 else 32000
  # Tokens [num_real_tokens, vocab_size) are padding rows of the embedding (see
  # `pad_vocab_multiple` in jaxsi.models.hf); None means every row is real.
  cfg.num_real_tokens = config_dict.placeholder(int)
  cfg.d_model = 768
  cfg.num_layers = 12
  cfg.num_heads = 12
  cfg.num_kv_heads = 12 if gpt2 else 4
  cfg.head_dim = 64
  cfg.d_ff = 3072 if gpt2 else 2048
  cfg.max_len = 1024 if gpt2 else 2048
  cfg.dropout_rate = 0.0
  cfg.dtype = "float32"
  cfg.norm_eps = 1e-5 if gpt2 else 1e-6
  cfg.rope_theta = 10000.0  # used by "llama" only
  cfg.tie_embeddings = gpt2
  cfg.attention_bias = gpt2  # query/key/value biases (Qwen2 has them in a llama variant)
  cfg.attention_out_bias = gpt2
  cfg.mlp_bias = gpt2
  cfg.remat_policy = "none"  # one of jaxsi.models.remat.POLICIES
  cfg.scan_layers = False    # run the layers as one nn.scan over stacked parameters
  cfg.fence_residual_grads = False  # True on CPU: faster training (jaxsi.models.grad_fence)
  return cfg


def validate_config(cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError with one sentence naming the first bad value in `cfg`."""
  expected = set(default_config().keys())  # every variant has the same keys
  # Configs stored before the layer options existed lack them (`layer_stack.layer_options`).
  missing = sorted(expected - set(cfg.keys()) - layer_stack.OPTION_KEYS)
  if missing:
    raise ValueError(f"Decoder config lacks keys {missing}; start from "
                     "jaxsi.models.decoder.default_config().")
  unknown = sorted(set(cfg.keys()) - expected)
  if unknown:
    raise ValueError(f"Decoder config has unknown keys {unknown}; valid keys are "
                     f"{sorted(expected)}.")
  if cfg.family != "decoder":
    raise ValueError(f"Decoder config has family={cfg.family!r}; expected 'decoder'.")
  if cfg.variant not in VARIANTS:
    raise ValueError(f"Unknown decoder variant {cfg.variant!r}; accepted: {list(VARIANTS)}.")
  if cfg.dtype not in DTYPES:
    raise ValueError(f"Unknown model dtype {cfg.dtype!r}; accepted: {list(DTYPES)}.")
  for key in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
              "d_ff", "max_len"):
    if not isinstance(cfg[key], int) or cfg[key] < 1:
      raise ValueError(f"Decoder config {key}={cfg[key]!r} must be a positive integer.")
  if cfg.num_heads % cfg.num_kv_heads:
    raise ValueError(f"num_heads={cfg.num_heads} must be a multiple of "
                     f"num_kv_heads={cfg.num_kv_heads}.")
  if cfg.variant == "llama" and cfg.head_dim % 2:
    raise ValueError(f"head_dim={cfg.head_dim} must be even for rotary embeddings.")
  if not 0.0 <= cfg.dropout_rate < 1.0:
    raise ValueError(f"dropout_rate={cfg.dropout_rate} must be in [0, 1).")
  if cfg.num_real_tokens is not None and not 1 <= cfg.num_real_tokens <= cfg.vocab_size:
    raise ValueError(f"num_real_tokens={cfg.num_real_tokens} must be in "
                     f"[1, vocab_size={cfg.vocab_size}] or None.")
  layer_stack.layer_options(cfg, "Decoder")


class DecoderBlock(nn.Module):
  """One pre-norm Transformer layer: x + attn(norm(x)), then x + mlp(norm(x))."""
  config: ml_collections.FrozenConfigDict

  def setup(self):
    cfg = self.config
    dtype = DTYPES[cfg.dtype]
    llama = cfg.variant == "llama"
    norm = layers.RMSNorm if llama else layers.LayerNorm
    self.attn_norm = norm(eps=cfg.norm_eps, dtype=dtype)
    self.attn = layers.Attention(
        num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        dtype=dtype, qkv_bias=cfg.attention_bias, out_bias=cfg.attention_out_bias,
        rope_theta=cfg.rope_theta if llama else None)
    self.mlp_norm = norm(eps=cfg.norm_eps, dtype=dtype)
    self.mlp = layers.Mlp(d_ff=cfg.d_ff, activation="silu" if llama else "gelu_tanh",
                          gated=llama, use_bias=cfg.mlp_bias, dtype=dtype)
    self.dropout = nn.Dropout(cfg.dropout_rate)

  def __call__(self, x_BxLxE, positions_BxL, mask_BxLxN, cache, cache_index, deterministic,
               num_outputs=None):
    """One layer on x [B, L, E]; `cache` is None or this layer's {"key", "value"} [B, K, N, D].

    `num_outputs` = Q < L computes the layer's output for the last Q positions only (their
    queries, attention and MLP), all L positions still giving keys and values: the last layer
    of a model whose logits are wanted at Q positions needs no more.

    Returns:
      (x [B, Q, E] (Q = L by default), the cache with the L new keys/values written at
      `cache_index`, or None).
    """
    h = self.attn_norm(x_BxLxE)
    h_q, positions_q_BxQ, mask_BxQxN = h, positions_BxL, mask_BxLxN
    if num_outputs is not None and num_outputs < x_BxLxE.shape[1]:
      first = x_BxLxE.shape[1] - num_outputs
      x_BxLxE, h_q = x_BxLxE[:, first:], h[:, first:]
      positions_q_BxQ, mask_BxQxN = positions_BxL[:, first:], mask_BxLxN[:, first:]
    h, new_cache = self.attn(h_q, h, mask_BxQxN, positions_q_BxL=positions_q_BxQ,
                             positions_kv_BxM=positions_BxL, cache=cache,
                             cache_index=cache_index)
    h = self.dropout(h, deterministic=deterministic)
    fenced = self.config.fence_residual_grads
    x_BxLxE = layers.constrain(grad_fence.fence(x_BxLxE + h, fenced), layers.BATCH_LENGTH_EMBED)
    h = self.mlp(self.mlp_norm(x_BxLxE))
    h = self.dropout(h, deterministic=deterministic)
    return (layers.constrain(grad_fence.fence(x_BxLxE + h, fenced), layers.BATCH_LENGTH_EMBED),
            new_cache)


class ScannedDecoderBlock(DecoderBlock):
  """`DecoderBlock` as one step of `layer_stack.scan`, the KV cache stacked [B, L, ...]."""

  def __call__(self, carry, positions_BxL, mask_BxLxN, cache_index, deterministic):
    """carry = (x [B, L, E], None or {"key", "value"} [B, num_layers, K, N, D], layer [] int32)."""
    x_BxLxE, kv, layer = carry
    cache = None if kv is None else {k: layer_stack.layer_slice(v, layer) for k, v in kv.items()}
    x_BxLxE, new_cache = super().__call__(x_BxLxE, positions_BxL, mask_BxLxN, cache, cache_index,
                                          deterministic)
    if kv is not None:
      kv = {k: layer_stack.write_rows(kv[k], new_cache[k], layer, cache_index, x_BxLxE.shape[1])
            for k in kv}
    return (x_BxLxE, kv, layer + 1), None


class DecoderTransformer(nn.Module):
  """Token ids in, next-token logits out, for an arbitrary attention mask."""
  config: ml_collections.FrozenConfigDict

  @nn.compact
  def __call__(self, tokens_BxL: jax.Array, positions_BxL: jax.Array, mask_BxLxN: jax.Array,
               cache: dict[str, Any] | None = None, cache_index: jax.Array | int | None = None,
               num_outputs: int | None = None, deterministic: bool = True,
               return_hidden: bool = False) -> tuple[jax.Array, dict[str, Any] | None]:
    """Runs the decoder.

    Args:
      tokens_BxL: token ids [B, L].
      positions_BxL: absolute positions [B, L].
      mask_BxLxN: bool [B, L, N]: which keys each token attends to; N = L without
        a cache, else at most the cache length (slots from N on are not attended).
      cache: optional {"layer_i": {"key", "value"}} ({"key", "value"} stacked [B, layers, ...]
        with `scan_layers`), written at `cache_index`.
      cache_index: where these L tokens go in the cache.
      num_outputs: compute logits only for the last `num_outputs` tokens (default all); with
        unscanned layers the last layer, too, computes only those positions.
      deterministic: disables dropout.
      return_hidden: return the final-normed features [B, num_outputs, E] (compute dtype)
        instead of the logits; `output_head` turns them into the same logits.

    Returns:
      (logits [B, num_outputs, V] float32 or features, updated cache or None).
    """
    cfg = self.config
    dtype = DTYPES[cfg.dtype]
    embed = layers.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, name="embed")
    x = embed(tokens_BxL)
    if cfg.variant == "gpt2":
      x = x + layers.Embed(cfg.max_len, cfg.d_model, axes=("positions", "embed"), dtype=dtype,
                           name="pos_embed")(positions_BxL)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    x = layers.constrain(x, layers.BATCH_LENGTH_EMBED)
    if cfg.scan_layers:
      # `deterministic` is argument 5 of the step's __call__ (self is 0); remat keeps it static.
      step = remat.wrap(ScannedDecoderBlock, cfg.remat_policy, static_argnums=(5,), in_scan=True)
      (x, new_cache, _), _ = layer_stack.scan(step, cfg.num_layers)(cfg, name=layer_stack.STACKED)(
          (x, cache, jnp.int32(0)), positions_BxL, mask_BxLxN, cache_index, deterministic)
    else:
      block = remat.wrap(DecoderBlock, cfg.remat_policy, static_argnums=(6, 7), in_scan=False)
      new_cache = None if cache is None else {}
      for i in range(cfg.num_layers):
        name = f"layer_{i}"
        # The last layer computes only the positions whose outputs are wanted.
        x, layer_cache = block(cfg, name=name)(
            x, positions_BxL, mask_BxLxN, None if cache is None else cache[name], cache_index,
            deterministic, num_outputs if i == cfg.num_layers - 1 else None)
        if cache is not None:
          new_cache[name] = layer_cache
    if cfg.variant == "gpt2":
      x = layers.LayerNorm(eps=cfg.norm_eps, dtype=dtype, name="final_norm")(x)
    else:
      x = layers.RMSNorm(eps=cfg.norm_eps, dtype=dtype, name="final_norm")(x)
    if num_outputs is not None:
      x = x[:, x.shape[1] - num_outputs:]
    if return_hidden:
      return layers.constrain(x, layers.BATCH_LENGTH_EMBED), new_cache
    if cfg.tie_embeddings:  # `output_head` repeats this on given parameters
      logits = embed.attend(x)
    else:
      logits = layers.DenseGeneral(cfg.vocab_size, ("embed", "vocab"), dtype=dtype,
                                   name="lm_head")(x)
    logits = layers.constrain(logits.astype(jnp.float32), layers.BATCH_LENGTH_VOCAB)
    return logits, new_cache


def output_head(cfg: ml_collections.ConfigDict, params: Any, x_BxLxE: jax.Array) -> jax.Array:
  """The output head: features [B, L, E] -> logits [B, L, V] float32.

  Args:
    cfg: the decoder config.
    params: the model parameters (only "embed" is read when embeddings are tied, else
      "lm_head").
    x_BxLxE: final-normed features, e.g. from `DecoderLM.hidden`.
  """
  dtype = DTYPES[cfg.dtype]
  if cfg.tie_embeddings:
    logits = layers.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype).apply(
        {"params": params["embed"]}, x_BxLxE, method="attend")
  else:
    logits = layers.DenseGeneral(cfg.vocab_size, ("embed", "vocab"), dtype=dtype).apply(
        {"params": params["lm_head"]}, x_BxLxE)
  return layers.constrain(logits.astype(jnp.float32), layers.BATCH_LENGTH_VOCAB)


def _prompt_positions(prompt_mask_BxS: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(positions [B, S] of left-padded prompt tokens (0 on padding), real lengths [B])."""
  mask = prompt_mask_BxS.astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0), mask.sum(axis=1)


def _prompt_self_mask(prompt_mask_BxS: jax.Array) -> jax.Array:
  """bool [B, S, S]: prompt token i attends to real prompt tokens j <= i."""
  s = prompt_mask_BxS.shape[1]
  causal_SxS = jnp.tril(jnp.ones((s, s), dtype=bool))
  return causal_SxS[None] & prompt_mask_BxS[:, None, :]


class DecoderLM(LanguageModel):
  """`LanguageModel` for the decoder-only Transformer (see the module docstring)."""

  def __init__(self, config: ml_collections.ConfigDict):
    validate_config(config)
    config = layer_stack.with_layer_options(config, "Decoder")
    self.config = config
    self.vocab_size = config.vocab_size
    self.module = DecoderTransformer(ml_collections.FrozenConfigDict(config))
    self.dtype = DTYPES[config.dtype]
    self._jitted_init = jax.jit(self._init_variables)

  def _init_variables(self, rng: jax.Array) -> dict[str, Any]:
    ones = jnp.ones((1, 1), jnp.int32)
    return self.module.init({"params": rng}, ones, ones, jnp.ones((1, 1, 1), bool))

  def init(self, rng: jax.Array) -> Params:
    """Fresh float32 parameters (a plain nested dict of arrays)."""
    return nn.meta.unbox(self._jitted_init(rng)["params"])

  def abstract_params(self) -> Params:
    """The parameter tree as `jax.ShapeDtypeStruct`s."""
    return jax.eval_shape(self.init, jax.random.key(0))

  def param_axes(self) -> Params:
    """PartitionSpecs of logical axis names, one per parameter leaf."""
    boxed = jax.eval_shape(self._init_variables, jax.random.key(0))["params"]
    return nn.get_partition_spec(boxed)

  def _check_length(self, length: int, what: str) -> None:
    if length > self.config.max_len:
      raise ValueError(f"{what} has {length} positions, more than the model's "
                       f"max_len={self.config.max_len}.")

  def logits(self, params: Params, batch: Batch, *,
             dropout_rng: jax.Array | None = None) -> jax.Array:
    """Teacher-forced logits [B, T, V] float32 (see `jaxsi.models.lm`).

    Args:
      params: parameters.
      batch: prompt [B, S], prompt_mask [B, S], response [B, T], and optionally
        response_positions [B, T] and response_visibility [B, T, T].
      dropout_rng: enables dropout (when dropout_rate > 0).

    Returns:
      logits [B, T, V] float32; logits[:, t] predicts response[:, t].
    """
    return self.head(params, self.hidden(params, batch, dropout_rng=dropout_rng))

  def head(self, params: Params, hidden: jax.Array) -> jax.Array:
    """Features [..., E] from `hidden` -> logits [..., V] float32."""
    return output_head(self.config, params, hidden)

  def hidden(self, params: Params, batch: Batch, *,
             dropout_rng: jax.Array | None = None) -> jax.Array:
    """Teacher-forced features [B, T, E] (compute dtype); `head` maps them to `logits`."""
    for key in ("prompt", "prompt_mask", "response"):
      if key not in batch:
        raise ValueError(f"Batch lacks {key!r}; it has {sorted(batch)}.")
    prompt_BxS, response_BxT = batch["prompt"], batch["response"]
    if prompt_BxS.ndim != 2 or response_BxT.ndim != 2:
      raise ValueError(f"prompt {prompt_BxS.shape} and response {response_BxT.shape} must "
                       "both be [B, length].")
    b, s = prompt_BxS.shape
    t = response_BxT.shape[1]
    if response_BxT.shape[0] != b or batch["prompt_mask"].shape != (b, s):
      raise ValueError(f"Batch shapes disagree: prompt {prompt_BxS.shape}, prompt_mask "
                       f"{batch['prompt_mask'].shape}, response {response_BxT.shape}.")
    self._check_length(s + t, "prompt + response")
    prompt_mask_BxS = batch["prompt_mask"].astype(bool)
    rel_positions_BxT = batch.get("response_positions")
    if rel_positions_BxT is None:
      rel_positions_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    visibility_BxTxT = batch.get("response_visibility")
    if visibility_BxTxT is None:
      visibility_BxTxT = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
    if rel_positions_BxT.shape != (b, t) or visibility_BxTxT.shape != (b, t, t):
      raise ValueError(f"response_positions {rel_positions_BxT.shape} must be {(b, t)} and "
                       f"response_visibility {visibility_BxTxT.shape} must be {(b, t, t)}.")

    # The last response token is never an input: logits[:, t] comes from the
    # token before slot t (the last prompt token for t = 0).
    prompt_positions_BxS, prompt_length_B = _prompt_positions(prompt_mask_BxS)
    inputs_BxL = jnp.concatenate([prompt_BxS, response_BxT[:, :t - 1]], axis=1)
    positions_BxL = jnp.concatenate(
        [prompt_positions_BxS, prompt_length_B[:, None] + rel_positions_BxT[:, :t - 1]], axis=1)
    r = t - 1
    prompt_rows_BxSxL = jnp.concatenate(
        [_prompt_self_mask(prompt_mask_BxS), jnp.zeros((b, s, r), bool)], axis=2)
    response_rows_BxRxL = jnp.concatenate(
        [jnp.broadcast_to(prompt_mask_BxS[:, None, :], (b, r, s)),
         visibility_BxTxT[:, :r, :r].astype(bool)], axis=2)
    mask_BxLxL = jnp.concatenate([prompt_rows_BxSxL, response_rows_BxRxL], axis=1)

    deterministic = dropout_rng is None or self.config.dropout_rate == 0.0
    rngs = {} if deterministic else {"dropout": dropout_rng}
    hidden_BxTxE, _ = self.module.apply({"params": params}, inputs_BxL, positions_BxL,
                                        mask_BxLxL, num_outputs=t, deterministic=deterministic,
                                        rngs=rngs, return_hidden=True)
    return hidden_BxTxE

  def prefill(self, params: Params, prompt: jax.Array, prompt_mask: jax.Array,
              max_new_tokens: int) -> tuple[jax.Array, Any]:
    """Runs the prompt [B, S] and allocates the cache for `max_new_tokens` slots.

    Returns:
      (logits [B, V] float32 for response slot 0, cache; see the module docstring).
    """
    if prompt.ndim != 2 or prompt_mask.shape != prompt.shape:
      raise ValueError(f"prompt {prompt.shape} and prompt_mask {prompt_mask.shape} must be "
                       "the same [B, S] shape.")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive Python int.")
    b, s = prompt.shape
    self._check_length(s + max_new_tokens, "prompt + max_new_tokens")
    cfg = self.config
    prompt_mask_BxS = prompt_mask.astype(bool)
    positions_BxS, prompt_length_B = _prompt_positions(prompt_mask_BxS)
    # Only the S prompt slots are filled: attention skips the empty response slots.
    mask_BxSxS = _prompt_self_mask(prompt_mask_BxS)
    if cfg.scan_layers:
      empty = jnp.zeros((b, cfg.num_layers, cfg.num_kv_heads, s + max_new_tokens, cfg.head_dim),
                        self.dtype)
      kv = {"key": empty, "value": empty}
    else:
      empty = jnp.zeros((b, cfg.num_kv_heads, s + max_new_tokens, cfg.head_dim), self.dtype)
      kv = {f"layer_{i}": {"key": empty, "value": empty} for i in range(cfg.num_layers)}
    logits_Bx1xV, kv = self.module.apply({"params": params}, prompt, positions_BxS, mask_BxSxS,
                                         cache=kv, cache_index=0, num_outputs=1)
    cache = {"kv": kv, "prompt_mask": prompt_mask_BxS, "prompt_length": prompt_length_B}
    return logits_Bx1xV[:, 0], cache

  def decode_step(self, params: Params, cache: Any, token: jax.Array, slot: jax.Array,
                  position: jax.Array, visible: jax.Array) -> tuple[jax.Array, Any]:
    """Feeds `token` [B] into response slot `slot` and returns the next logits [B, V].

    `position` [B] counts from the response start; `visible` [B, max_new_tokens]
    selects the response slots this token attends to (the real prompt tokens
    are always visible). `slot` must lie in [0, max_new_tokens).
    """
    prompt_mask_BxS = cache["prompt_mask"]
    b, s = prompt_mask_BxS.shape
    max_new_tokens = jax.tree.leaves(cache["kv"])[0].shape[-2] - s
    if token.shape != (b,) or position.shape != (b,) or visible.shape != (b, max_new_tokens):
      raise ValueError(f"decode_step got token {token.shape}, position {position.shape}, "
                       f"visible {visible.shape}; expected {(b,)}, {(b,)}, "
                       f"{(b, max_new_tokens)}.")
    positions_Bx1 = (cache["prompt_length"] + position)[:, None]
    mask_Bx1xN = jnp.concatenate([prompt_mask_BxS, visible.astype(bool)], axis=1)[:, None, :]
    logits_Bx1xV, kv = self.module.apply({"params": params}, token[:, None], positions_Bx1,
                                         mask_Bx1xN, cache=cache["kv"], cache_index=s + slot,
                                         num_outputs=1)
    return logits_Bx1xV[:, 0], dict(cache, kv=kv)
