"""T5 encoder-decoder (v1.0, and v1.1 = FLAN-T5 shapes) behind the `LanguageModel` contract.

The prompt feeds the encoder; the decoder reads the response shifted right behind a start token,
`[start, r0, r1, ..., r_{T-2}]`, so decoder slot t predicts `response[:, t]`. Decoder positions
count from the start token (position 0); response slot j sits at `response_positions[j] + 1`.

T5 specifics kept here (not in the shared layers): RMS layer norm without mean subtraction or
bias, attention without the 1/sqrt(d) scaling (T5 folds it into the initialization), and a
learned relative position bias (bidirectional buckets in the encoder, causal buckets in the
decoder) computed in the first layer of each stack and shared by all its layers.

Variants: v1.0 uses a ReLU MLP; v1.1 a gated GELU (tanh approximation, HF's "gelu_new").
Independently, `tie_embeddings=True` reads the logits from the shared embedding with the
d_model^-0.5 output scaling (v1.0 checkpoints) and `False` uses a separate head without scaling
(v1.1 / FLAN-T5 checkpoints).

Parameters are float32 and carry logical axis names from `jaxsi.partitioning.LOGICAL_RULES`;
computation runs in `config.dtype`, softmax and normalization statistics in float32.

`remat_policy` (see `jaxsi.models.remat`) chooses what the backward pass recomputes per layer;
`scan_layers` runs each stack as one `nn.scan` over stacked parameters (see
`jaxsi.models.layer_stack`); `fence_residual_grads` (see `jaxsi.models.grad_fence`) makes
XLA:CPU compute each layer's residual gradient once. None of them changes the results.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxsi.models import grad_fence
from jaxsi.models import layer_stack
from jaxsi.models import layers
from jaxsi.models import lm as lm_lib
from jaxsi.models import remat

VARIANTS = ("v1_0", "v1_1")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# v1.1 shapes (FLAN-T5 shares them). `t5_tiny` is for tests and laptop demos.
_PRESETS = {
    "t5_tiny": dict(vocab_size=128, d_model=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                    head_dim=16, d_ff=128),
    "t5_small": dict(d_model=512, num_layers=8, num_decoder_layers=8, num_heads=6, head_dim=64,
                     d_ff=1024),
    "t5_base": dict(d_model=768, num_layers=12, num_decoder_layers=12, num_heads=12, head_dim=64,
                    d_ff=2048),
    "t5_large": dict(d_model=1024, num_layers=24, num_decoder_layers=24, num_heads=16,
                     head_dim=64, d_ff=2816),
    "t5_xl": dict(d_model=2048, num_layers=24, num_decoder_layers=24, num_heads=32, head_dim=64,
                  d_ff=5120),
}
PRESETS = tuple(_PRESETS)


def default_config(variant: str = "v1_1") -> ml_collections.ConfigDict:
  """All T5 model keys with their defaults (t5-small shapes of the given variant).

  Args:
    variant: "v1_0" (ReLU MLP, tied embeddings) or "v1_1" (gated GELU, untied head; FLAN-T5).

  Returns:
    A ConfigDict with every key `T5LM` reads.
  """
  if variant not in VARIANTS:
    raise ValueError(f"T5 variant {variant!r} is unknown; accepted variants are {VARIANTS}.")
  v1_0 = variant == "v1_0"
  config = ml_collections.ConfigDict()
  config.family = "t5"
  config.variant = variant
  config.vocab_size = 32128
  config.d_model = 512
  config.num_layers = 6 if v1_0 else 8            # encoder layers
  config.num_decoder_layers = 6 if v1_0 else 8
  config.num_heads = 8 if v1_0 else 6
  config.head_dim = 64                            # HF's d_kv
  config.d_ff = 2048 if v1_0 else 1024
  config.relative_attention_num_buckets = 32
  config.relative_attention_max_distance = 128
  config.dropout_rate = 0.1
  config.dtype = "float32"
  config.norm_eps = 1e-6
  config.tie_embeddings = v1_0
  config.decoder_start_token_id = 0
  # The tokenizer's vocabulary when the head is padded beyond it (None: all rows are real).
  # The model computes every row; samplers and evals mask the padded ones.
  config.num_real_tokens = ml_collections.config_dict.placeholder(int)
  config.remat_policy = "none"  # one of jaxsi.models.remat.POLICIES
  config.scan_layers = False    # run each stack as one nn.scan over stacked parameters
  config.fence_residual_grads = False  # True on CPU: faster training (jaxsi.models.grad_fence)
  return config


def preset(name: str) -> ml_collections.ConfigDict:
  """A named v1.1 size preset, one of `PRESETS`: "t5_tiny", "t5_small", ..., "t5_xl"."""
  if name not in _PRESETS:
    raise ValueError(f"T5 preset {name!r} is unknown; accepted presets are {PRESETS}.")
  config = default_config("v1_1")
  config.update(_PRESETS[name])
  return config


@dataclasses.dataclass(frozen=True)
class T5Dims:
  """The hashable subset of a T5 config that the Flax modules read."""
  vocab_size: int
  d_model: int
  num_layers: int
  num_decoder_layers: int
  num_heads: int
  head_dim: int
  d_ff: int
  num_buckets: int
  max_distance: int
  dropout_rate: float
  norm_eps: float
  gated_gelu: bool
  tie_embeddings: bool
  dtype: Any
  remat_policy: str = "none"
  scan_layers: bool = False
  fence_residual_grads: bool = False


def dims_from_config(config: ml_collections.ConfigDict) -> T5Dims:
  """Validates a T5 config and returns its `T5Dims`.

  Raises:
    ValueError: a key is missing or has a value T5 cannot use.
  """
  # Configs stored before the layer options existed lack them (`layer_stack.layer_options`).
  missing = sorted(set(default_config().keys()) - set(config.keys())
                   - layer_stack.OPTION_KEYS)
  if missing:
    raise ValueError(f"T5 config lacks the keys {missing}; start from "
                     "jaxsi.models.t5.default_config().")
  if config.family != "t5":
    raise ValueError(f"Model family {config.family!r} is not 't5'; T5LM only builds family 't5'.")
  if config.variant not in VARIANTS:
    raise ValueError(f"T5 variant {config.variant!r} is unknown; accepted variants are {VARIANTS}.")
  if config.dtype not in DTYPES:
    raise ValueError(f"T5 dtype {config.dtype!r} is not supported; accepted dtypes are "
                     f"{tuple(DTYPES)}.")
  for key in ("vocab_size", "d_model", "num_layers", "num_decoder_layers", "num_heads", "head_dim",
              "d_ff"):
    if not isinstance(config[key], int) or config[key] < 1:
      raise ValueError(f"T5 config {key}={config[key]!r} must be a positive integer.")
  buckets, distance = config.relative_attention_num_buckets, config.relative_attention_max_distance
  if not isinstance(buckets, int) or buckets < 4 or buckets % 2:
    raise ValueError(f"T5 relative_attention_num_buckets={buckets!r} must be an even integer >= 4.")
  if not isinstance(distance, int) or distance <= buckets // 2:
    raise ValueError(f"T5 relative_attention_max_distance={distance!r} must be an integer greater "
                     f"than relative_attention_num_buckets // 2 = {buckets // 2}.")
  if not 0.0 <= config.dropout_rate < 1.0:
    raise ValueError(f"T5 dropout_rate={config.dropout_rate!r} must lie in [0, 1).")
  options = layer_stack.layer_options(config, "T5")
  return T5Dims(
      vocab_size=config.vocab_size, d_model=config.d_model, num_layers=config.num_layers,
      num_decoder_layers=config.num_decoder_layers, num_heads=config.num_heads,
      head_dim=config.head_dim, d_ff=config.d_ff, num_buckets=buckets, max_distance=distance,
      dropout_rate=float(config.dropout_rate), norm_eps=float(config.norm_eps),
      gated_gelu=config.variant == "v1_1", tie_embeddings=bool(config.tie_embeddings),
      dtype=DTYPES[config.dtype], **options._asdict())


# ----------------------------------------------------------------------------------------------
# Relative position buckets.


@functools.lru_cache(maxsize=None)
def _distance_buckets(num_buckets: int, max_distance: int) -> np.ndarray:
  """Bucket of each one-sided distance 0..max_distance, [max_distance + 1] int32.

  Half the buckets hold exact distances, the other half logarithmically wider bins up to
  `max_distance`. Computed once in NumPy float32 with the operation order of mesh-tensorflow (and
  HF), so that bin edges never depend on the accelerator's `log`; every distance beyond
  `max_distance` shares the last bucket, so a table up to it covers all distances.
  """
  max_exact = num_buckets // 2
  distance = np.arange(max_distance + 1)
  log_ratio = np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(max_exact))
  scaled = log_ratio / np.float32(math.log(max_distance / max_exact)) * np.float32(
      num_buckets - max_exact)
  large = np.minimum(max_exact + scaled.astype(np.int64), num_buckets - 1)
  return np.where(distance < max_exact, distance, large).astype(np.int32)


def relative_position_buckets(relative_position: jax.Array, *, bidirectional: bool,
                              num_buckets: int, max_distance: int) -> jax.Array:
  """T5's bucket of each relative position (key position - query position).

  Args:
    relative_position: int array of any shape.
    bidirectional: True for the encoder (separate buckets for keys after the query); False for
      the causal decoder (keys after the query share bucket 0 with distance 0).
    num_buckets: total number of buckets.
    max_distance: distances at or beyond it share the last bucket of their side.

  Returns:
    int32 array of the same shape, values in [0, num_buckets).
  """
  relative_position = relative_position.astype(jnp.int32)
  if bidirectional:
    side_buckets = num_buckets // 2
    offset = jnp.where(relative_position > 0, side_buckets, 0)
    distance = jnp.abs(relative_position)
  else:
    side_buckets = num_buckets
    offset = 0
    distance = jnp.maximum(-relative_position, 0)
  table = jnp.asarray(_distance_buckets(side_buckets, max_distance))
  return offset + table[jnp.minimum(distance, max_distance)]


# ----------------------------------------------------------------------------------------------
# Flax modules.


def _param(module: nn.Module, name: str, shape: tuple[int, ...], names: tuple[str, ...],
           init: Any) -> jax.Array:
  """A float32 parameter of `module` carrying the logical axis `names`."""
  return module.param(name, nn.with_logical_partitioning(init, names), shape, jnp.float32)


def _norm(dims: T5Dims) -> nn.Module:
  """T5's layer norm: root-mean-square scaling, no mean subtraction, no bias."""
  return layers.RMSNorm(eps=dims.norm_eps, dtype=dims.dtype)


class RelativePositionBias(nn.Module):
  """Learned per-head bias for each relative position bucket."""
  dims: T5Dims
  bidirectional: bool

  @nn.compact
  def __call__(self, query_pos_BxQ: jax.Array, key_pos_BxK: jax.Array) -> jax.Array:
    """Returns the bias [B, H, Q, K] float32 (B may be 1 to broadcast over the batch)."""
    d = self.dims
    table_NxH = _param(self, "rel_embedding", (d.num_buckets, d.num_heads),
                       ("relpos_buckets", "heads"), nn.initializers.normal(d.d_model ** -0.5))
    buckets_BxQxK = relative_position_buckets(
        key_pos_BxK[:, None, :] - query_pos_BxQ[:, :, None], bidirectional=self.bidirectional,
        num_buckets=d.num_buckets, max_distance=d.max_distance)
    return jnp.transpose(table_NxH[buckets_BxQxK], (0, 3, 1, 2))


class Attention(nn.Module):
  """Multi-head attention without the 1/sqrt(head_dim) score scaling (T5 folds it into init).

  Not `layers.Attention`: T5 initializes each projection differently, drops out attention
  probabilities, and reads cross-attention keys/values computed once per prompt.
  """
  dims: T5Dims

  def setup(self):
    d = self.dims
    normal = nn.initializers.normal
    qkv_shape, qkv_axes = (d.d_model, d.num_heads, d.head_dim), ("embed", "heads", "kv")
    # Unscaled scores: the query init carries the 1/sqrt(head_dim) that attention omits.
    self.query = _param(self, "query", qkv_shape, qkv_axes,
                        normal((d.d_model * d.head_dim) ** -0.5))
    self.key = _param(self, "key", qkv_shape, qkv_axes, normal(d.d_model ** -0.5))
    self.value = _param(self, "value", qkv_shape, qkv_axes, normal(d.d_model ** -0.5))
    self.out = _param(self, "out", (d.num_heads, d.head_dim, d.d_model), ("heads", "kv", "embed"),
                      normal((d.num_heads * d.head_dim) ** -0.5))
    self.dropout = nn.Dropout(d.dropout_rate)

  def keys_values(self, x_BxKxD: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Projects the attended-to states: (keys, values), each [B, H, K, Dh] in `dtype`.

    Head-major, like the KV cache: attention then contracts each (batch, head) block as one
    contiguous [K, Dh] matrix instead of transposing the whole cache on every decode step.
    """
    dtype = self.dims.dtype
    x = x_BxKxD.astype(dtype)
    return _project_heads(x, self.key.astype(dtype)), _project_heads(x, self.value.astype(dtype))

  def __call__(self, x_BxQxD: jax.Array, keys_BxHxKxE: jax.Array, values_BxHxKxE: jax.Array,
               bias_BxHxQxK: jax.Array | None, visible_BxQxK: jax.Array,
               deterministic: bool) -> jax.Array:
    """Attends from `x` to head-major keys and values [B, H, K, Dh]; returns [B, Q, D]."""
    dtype = self.dims.dtype
    batch, length, _ = x_BxQxD.shape
    query_BxQxHxE = jnp.einsum("bqd,dhe->bqhe", x_BxQxD.astype(dtype), self.query.astype(dtype))
    scores_BxHxQxK = jnp.einsum("bqhe,bhke->bhqk", query_BxQxHxE, keys_BxHxKxE.astype(dtype),
                                preferred_element_type=jnp.float32)
    if bias_BxHxQxK is not None:
      scores_BxHxQxK = scores_BxHxQxK + bias_BxHxQxK
    scores_BxHxQxK = jnp.where(visible_BxQxK[:, None, :, :], scores_BxHxQxK, layers.MASKED_SCORE)
    probs_BxHxQxK = jax.nn.softmax(scores_BxHxQxK, axis=-1)
    probs_BxHxQxK = self.dropout(probs_BxHxQxK, deterministic=deterministic).astype(dtype)
    mixed_BxQxHxE = jnp.einsum("bhqk,bhke->bqhe", probs_BxHxQxK, values_BxHxKxE.astype(dtype))
    # Flattening (heads, head_dim) pins the activations row-major, so XLA does not transpose
    # the output kernel instead (it did, on every decode step).
    out_FxD = self.out.astype(dtype).reshape(-1, self.dims.d_model)
    return jnp.einsum("bqf,fd->bqd", mixed_BxQxHxE.reshape(batch, length, -1), out_FxD)


def _project_heads(x_BxKxD: jax.Array, kernel_DxHxE: jax.Array) -> jax.Array:
  """`x @ kernel` split into head-major [B, H, K, Dh].

  Projects with the kernel flattened to [D, H * Dh] and moves the heads forward afterwards: the
  transpose then touches the activations (free for one decode position), never the kernel.
  """
  batch, length, _ = x_BxKxD.shape
  _, heads, head_dim = kernel_DxHxE.shape
  y_BxKxF = jnp.einsum("bkd,df->bkf", x_BxKxD, kernel_DxHxE.reshape(kernel_DxHxE.shape[0], -1))
  return jnp.swapaxes(y_BxKxF.reshape(batch, length, heads, head_dim), 1, 2)


class Mlp(nn.Module):
  """ReLU MLP (v1.0) or gated GELU with the tanh approximation (v1.1)."""
  dims: T5Dims

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, deterministic: bool) -> jax.Array:
    d = self.dims
    dtype = d.dtype
    normal = nn.initializers.normal
    x = x_BxLxD.astype(dtype)
    if d.gated_gelu:
      wi_0 = _param(self, "wi_0", (d.d_model, d.d_ff), ("embed", "mlp"), normal(d.d_model ** -0.5))
      wi_1 = _param(self, "wi_1", (d.d_model, d.d_ff), ("embed", "mlp"), normal(d.d_model ** -0.5))
      gate_BxLxF = jnp.einsum("bld,df->blf", x, wi_0.astype(dtype))
      hidden_BxLxF = (jax.nn.gelu(gate_BxLxF, approximate=True)
                      * jnp.einsum("bld,df->blf", x, wi_1.astype(dtype)))
    else:
      wi = _param(self, "wi", (d.d_model, d.d_ff), ("embed", "mlp"), normal(d.d_model ** -0.5))
      hidden_BxLxF = jax.nn.relu(jnp.einsum("bld,df->blf", x, wi.astype(dtype)))
    hidden_BxLxF = nn.Dropout(d.dropout_rate)(hidden_BxLxF, deterministic=deterministic)
    wo = _param(self, "wo", (d.d_ff, d.d_model), ("mlp", "embed"), normal(d.d_ff ** -0.5))
    return jnp.einsum("blf,fd->bld", hidden_BxLxF, wo.astype(dtype))


class EncoderLayer(nn.Module):
  """Pre-norm self-attention and MLP blocks with residuals."""
  dims: T5Dims

  def setup(self):
    self.pre_attention_norm = _norm(self.dims)
    self.attention = Attention(self.dims)
    self.pre_mlp_norm = _norm(self.dims)
    self.mlp = Mlp(self.dims)
    self.dropout = nn.Dropout(self.dims.dropout_rate)

  def __call__(self, x_BxSxD, bias_BxHxSxS, visible_BxSxS, deterministic):
    h = self.pre_attention_norm(x_BxSxD)
    keys, values = self.attention.keys_values(h)
    h = self.attention(h, keys, values, bias_BxHxSxS, visible_BxSxS, deterministic)
    x_BxSxD = grad_fence.fence(x_BxSxD + self.dropout(h, deterministic=deterministic),
                               self.dims.fence_residual_grads)
    h = self.mlp(self.pre_mlp_norm(x_BxSxD), deterministic)
    x_BxSxD = grad_fence.fence(x_BxSxD + self.dropout(h, deterministic=deterministic),
                               self.dims.fence_residual_grads)
    return layers.constrain(x_BxSxD, layers.BATCH_LENGTH_EMBED)


class DecoderLayer(nn.Module):
  """Pre-norm self-attention, cross-attention and MLP blocks with residuals."""
  dims: T5Dims

  def setup(self):
    self.pre_self_attention_norm = _norm(self.dims)
    self.self_attention = Attention(self.dims)
    self.pre_cross_attention_norm = _norm(self.dims)
    self.cross_attention = Attention(self.dims)
    self.pre_mlp_norm = _norm(self.dims)
    self.mlp = Mlp(self.dims)
    self.dropout = nn.Dropout(self.dims.dropout_rate)

  def cross_keys_values(self, encoded_BxSxD: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Cross-attention keys and values of the encoder output, each [B, H, S, Dh]."""
    return self.cross_attention.keys_values(encoded_BxSxD)

  def __call__(self, y_BxQxD, bias_BxHxQxK, self_visible_BxQxK, cross_kv, cross_visible_BxQxS,
               deterministic, self_kv_cache=None, write_index=None):
    """One decoder layer.

    Args:
      y_BxQxD: the decoder states of the Q new slots.
      bias_BxHxQxK: relative position bias over the K self-attention keys.
      self_visible_BxQxK: which keys each new slot attends to.
      cross_kv: (keys, values) of the encoder output, each [B, H, S, Dh].
      cross_visible_BxQxS: real prompt tokens.
      deterministic: no dropout when True.
      self_kv_cache: None (the keys are the Q new slots themselves, K = Q) or (keys, values),
        each [B, H, K, Dh]: the new slots' keys and values are written at `write_index`.
      write_index: [] int32 index of the first new slot in the cache.

    Returns:
      (new states [B, Q, D], self-attention (keys, values) [B, H, K, Dh] including the new slots).
    """
    h = self.pre_self_attention_norm(y_BxQxD)
    keys, values = self.self_attention.keys_values(h)
    if self_kv_cache is not None:
      cache_keys, cache_values = self_kv_cache
      keys = jax.lax.dynamic_update_slice_in_dim(cache_keys, keys.astype(cache_keys.dtype),
                                                 write_index, axis=2)
      values = jax.lax.dynamic_update_slice_in_dim(cache_values, values.astype(cache_values.dtype),
                                                   write_index, axis=2)
    h = self.self_attention(h, keys, values, bias_BxHxQxK, self_visible_BxQxK, deterministic)
    y_BxQxD = grad_fence.fence(y_BxQxD + self.dropout(h, deterministic=deterministic),
                               self.dims.fence_residual_grads)
    h = self.pre_cross_attention_norm(y_BxQxD)
    h = self.cross_attention(h, cross_kv[0], cross_kv[1], None, cross_visible_BxQxS, deterministic)
    y_BxQxD = grad_fence.fence(y_BxQxD + self.dropout(h, deterministic=deterministic),
                               self.dims.fence_residual_grads)
    h = self.mlp(self.pre_mlp_norm(y_BxQxD), deterministic)
    y_BxQxD = grad_fence.fence(y_BxQxD + self.dropout(h, deterministic=deterministic),
                               self.dims.fence_residual_grads)
    return layers.constrain(y_BxQxD, layers.BATCH_LENGTH_EMBED), (keys, values)


class ScannedEncoderLayer(EncoderLayer):
  """`EncoderLayer` as one step of `layer_stack.scan`: the carry is the states [B, S, D]."""

  def __call__(self, x_BxSxD, bias_BxHxSxS, visible_BxSxS, deterministic):
    """Returns (new states [B, S, D], None); the other arguments as for `EncoderLayer`."""
    return super().__call__(x_BxSxD, bias_BxHxSxS, visible_BxSxS, deterministic), None


class ScannedDecoderLayer(DecoderLayer):
  """`DecoderLayer` as one step of `layer_stack.scan`; caches are stacked [B, L, H, K, Dh]."""

  def __call__(self, carry, bias_BxHxQxK, self_visible_BxQxK, cross_visible_BxQxS, encoded_BxSxD,
               cross_kvs, deterministic, write_index):
    """One decoder layer inside the scan.

    Args:
      carry: (states [B, Q, D], None or the self-attention (keys, values) stacks
        [B, L, H, K, Dh], layer index [] int32).
      bias_BxHxQxK, self_visible_BxQxK, cross_visible_BxQxS, deterministic, write_index: as
        for `DecoderLayer`.
      encoded_BxSxD: the encoder output, from which the layer projects its cross keys and
        values when `cross_kvs` is None (training), else unused.
      cross_kvs: None or the cross-attention (keys, values) stacks [B, L, H, S, Dh] (decoding).

    Returns:
      ((new states, updated stacks or None, layer index + 1), None).
    """
    y_BxQxD, self_kvs, layer = carry
    if cross_kvs is None:
      cross_kv = self.cross_keys_values(encoded_BxSxD)
    else:
      cross_kv = tuple(layer_stack.layer_slice(stack, layer) for stack in cross_kvs)
    cache = None if self_kvs is None else tuple(
        layer_stack.layer_slice(stack, layer) for stack in self_kvs)
    y_BxQxD, kv = super().__call__(y_BxQxD, bias_BxHxQxK, self_visible_BxQxK, cross_kv,
                                   cross_visible_BxQxS, deterministic, cache, write_index)
    if self_kvs is not None:
      self_kvs = tuple(layer_stack.write_rows(stack, new, layer, write_index, y_BxQxD.shape[1])
                       for stack, new in zip(self_kvs, kv))
    return (y_BxQxD, self_kvs, layer + 1), None

  def cross_kv_step(self, carry, encoded_BxSxD):
    """Scan step of `cross_keys_values`: ys = this layer's (keys, values) [B, H, S, Dh]."""
    return carry, self.cross_keys_values(encoded_BxSxD)


class Encoder(nn.Module):
  """The encoder stack over embedded prompt tokens."""
  dims: T5Dims

  def setup(self):
    d = self.dims
    self.relpos_bias = RelativePositionBias(d, bidirectional=True)
    # `deterministic` is argument 4 of __call__ (self is 0); remat keeps it static.
    if d.scan_layers:
      step = remat.wrap(ScannedEncoderLayer, d.remat_policy, static_argnums=(4,), in_scan=True)
      self.layers = layer_stack.scan(step, d.num_layers)(d)
    else:
      layer = remat.wrap(EncoderLayer, d.remat_policy, static_argnums=(4,), in_scan=False)
      self.layers = [layer(d) for _ in range(d.num_layers)]
    self.final_norm = _norm(self.dims)
    self.dropout = nn.Dropout(self.dims.dropout_rate)

  def __call__(self, x_BxSxD, prompt_mask_BxS, deterministic):
    # Only differences of positions matter, so left padding needs no position shift.
    positions_1xS = jnp.arange(x_BxSxD.shape[1])[None, :]
    bias_1xHxSxS = self.relpos_bias(positions_1xS, positions_1xS)
    batch, length = prompt_mask_BxS.shape
    visible_BxSxS = jnp.broadcast_to(prompt_mask_BxS[:, None, :], (batch, length, length))
    x_BxSxD = self.dropout(x_BxSxD, deterministic=deterministic)
    if self.dims.scan_layers:
      x_BxSxD, _ = self.layers(x_BxSxD, bias_1xHxSxS, visible_BxSxS, deterministic)
    else:
      for layer in self.layers:
        x_BxSxD = layer(x_BxSxD, bias_1xHxSxS, visible_BxSxS, deterministic)
    return self.dropout(self.final_norm(x_BxSxD), deterministic=deterministic)


class Decoder(nn.Module):
  """The decoder stack over embedded decoder input tokens."""
  dims: T5Dims

  def setup(self):
    d = self.dims
    self.relpos_bias = RelativePositionBias(d, bidirectional=False)
    if d.scan_layers:
      # `deterministic` is argument 7 of the step's __call__ (self is 0).
      step = remat.wrap(ScannedDecoderLayer, d.remat_policy, static_argnums=(7,), in_scan=True)
      self.layers = layer_stack.scan(step, d.num_decoder_layers,
                                     methods=["__call__", "cross_kv_step"])(d)
    else:
      layer = remat.wrap(DecoderLayer, d.remat_policy, static_argnums=(6,), in_scan=False)
      self.layers = [layer(d) for _ in range(d.num_decoder_layers)]
    self.final_norm = _norm(self.dims)
    self.dropout = nn.Dropout(self.dims.dropout_rate)

  def cross_keys_values(self, encoded_BxSxD):
    """Per layer (keys, values) of the encoder output, each [B, H, S, Dh].

    With `scan_layers`: one (keys, values) pair of stacks [B, L, H, S, Dh].
    """
    if self.dims.scan_layers:
      _, (keys_LxBxHxSxE, values_LxBxHxSxE) = self.layers.cross_kv_step(jnp.int32(0),
                                                                        encoded_BxSxD)
      return jnp.swapaxes(keys_LxBxHxSxE, 0, 1), jnp.swapaxes(values_LxBxHxSxE, 0, 1)
    return tuple(layer.cross_keys_values(encoded_BxSxD) for layer in self.layers)

  def __call__(self, y_BxQxD, query_pos_BxQ, key_pos_BxK, self_visible_BxQxK, cross_kvs,
               prompt_mask_BxS, deterministic, self_kv_caches=None, write_index=None,
               encoded_BxSxD=None):
    """Returns (final states [B, Q, D], per layer self-attention (keys, values)).

    With `scan_layers`, `cross_kvs` and `self_kv_caches` are (keys, values) pairs of stacks
    [B, L, H, ., Dh] (or None), and so are the returned keys and values (None without a
    cache); `cross_kvs=None` projects them from `encoded_BxSxD` inside each layer.
    """
    bias_BxHxQxK = self.relpos_bias(query_pos_BxQ, key_pos_BxK)
    cross_visible_BxQxS = jnp.broadcast_to(
        prompt_mask_BxS[:, None, :],
        (y_BxQxD.shape[0], y_BxQxD.shape[1], prompt_mask_BxS.shape[1]))
    y_BxQxD = self.dropout(y_BxQxD, deterministic=deterministic)
    if self.dims.scan_layers:
      (y_BxQxD, new_kvs, _), _ = self.layers(
          (y_BxQxD, self_kv_caches, jnp.int32(0)), bias_BxHxQxK, self_visible_BxQxK,
          cross_visible_BxQxS, encoded_BxSxD, cross_kvs, deterministic, write_index)
      return self.dropout(self.final_norm(y_BxQxD), deterministic=deterministic), new_kvs
    new_kvs = []
    for i, layer in enumerate(self.layers):
      y_BxQxD, kv = layer(y_BxQxD, bias_BxHxQxK, self_visible_BxQxK, cross_kvs[i],
                          cross_visible_BxQxS, deterministic,
                          None if self_kv_caches is None else self_kv_caches[i], write_index)
      new_kvs.append(kv)
    return self.dropout(self.final_norm(y_BxQxD), deterministic=deterministic), tuple(new_kvs)


class T5Transformer(nn.Module):
  """Shared embedding, encoder, decoder and output head."""
  dims: T5Dims

  def setup(self):
    d = self.dims
    self.token_embedder = layers.Embed(d.vocab_size, d.d_model, dtype=d.dtype,
                                       embedding_init=nn.initializers.normal(1.0))
    self.encoder = Encoder(d)
    self.decoder = Decoder(d)
    if not d.tie_embeddings:
      self.logits_kernel = _param(self, "logits_dense", (d.d_model, d.vocab_size),
                                  ("embed", "vocab"), nn.initializers.normal(d.d_model ** -0.5))

  def encode(self, prompt_BxS, prompt_mask_BxS, deterministic):
    """Encoder output [B, S, D] in `dtype`."""
    return self.encoder(self.token_embedder(prompt_BxS), prompt_mask_BxS, deterministic)

  def cross_keys_values(self, encoded_BxSxD):
    return self.decoder.cross_keys_values(encoded_BxSxD)

  def decode(self, tokens_BxQ, query_pos_BxQ, key_pos_BxK, self_visible_BxQxK, cross_kvs,
             prompt_mask_BxS, deterministic, self_kv_caches=None, write_index=None,
             return_hidden=False, encoded_BxSxD=None):
    """Returns (logits [B, Q, V] float32, per layer self-attention (keys, values)).

    With `return_hidden` the first item is the decoder's final-normed output [B, Q, D]
    (compute dtype) instead; `head` maps it to the same logits. See `Decoder` for the
    scanned layouts and `encoded_BxSxD`.
    """
    y_BxQxD, kvs = self.decoder(self.token_embedder(tokens_BxQ), query_pos_BxQ, key_pos_BxK,
                                self_visible_BxQxK, cross_kvs, prompt_mask_BxS, deterministic,
                                self_kv_caches, write_index, encoded_BxSxD)
    if return_hidden:
      return layers.constrain(y_BxQxD, layers.BATCH_LENGTH_EMBED), kvs
    return self.head(y_BxQxD), kvs

  def head(self, y_BxQxD):
    """Decoder output [B, Q, D] -> logits [B, Q, V] float32."""
    d = self.dims
    if d.tie_embeddings:
      # v1.0 reuses the input embedding as the head; the rescaling keeps logits O(1).
      y_BxQxD = y_BxQxD * (d.d_model ** -0.5)
      logits = jnp.einsum("bqd,vd->bqv", y_BxQxD, self.token_embedder.embedding.astype(d.dtype),
                          preferred_element_type=jnp.float32)
    else:
      logits = jnp.einsum("bqd,dv->bqv", y_BxQxD, self.logits_kernel.astype(d.dtype),
                          preferred_element_type=jnp.float32)
    logits = layers.constrain(logits, layers.BATCH_LENGTH_VOCAB)
    return logits.astype(jnp.float32)

  def __call__(self, prompt_BxS, prompt_mask_BxS, tokens_BxT, positions_BxT, visible_BxTxT,
               deterministic, return_hidden=False):
    """Teacher-forced decoder logits [B, T, V] for decoder inputs `tokens` (start token first).

    With `return_hidden`: the decoder's final-normed output [B, T, D] instead (see `decode`).
    """
    encoded_BxSxD = self.encode(prompt_BxS, prompt_mask_BxS, deterministic)
    if self.dims.scan_layers:  # each scanned layer projects its own cross keys and values
      out, _ = self.decode(tokens_BxT, positions_BxT, positions_BxT, visible_BxTxT, None,
                           prompt_mask_BxS, deterministic, return_hidden=return_hidden,
                           encoded_BxSxD=encoded_BxSxD)
      return out
    cross_kvs = self.cross_keys_values(encoded_BxSxD)
    out, _ = self.decode(tokens_BxT, positions_BxT, positions_BxT, visible_BxTxT, cross_kvs,
                         prompt_mask_BxS, deterministic, return_hidden=return_hidden)
    return out


# ----------------------------------------------------------------------------------------------
# The LanguageModel.


def _decoder_inputs(response_BxT, positions_BxT, visibility_BxTxT, start_id):
  """Shifts the response right behind the start token and lifts positions and visibility.

  Decoder slot 0 holds the start token at position 0 and sees only itself; decoder slot t >= 1
  holds response slot t-1 at `positions[t-1] + 1` and sees the start token plus the decoder slots
  of the response slots visible from response slot t-1.
  """
  batch, length = response_BxT.shape
  start_Bx1 = jnp.full((batch, 1), start_id, jnp.int32)
  tokens_BxT = jnp.concatenate([start_Bx1, response_BxT[:, :-1].astype(jnp.int32)], axis=1)
  dec_pos_BxT = jnp.concatenate(
      [jnp.zeros((batch, 1), jnp.int32), positions_BxT[:, :-1].astype(jnp.int32) + 1], axis=1)
  dec_visible_BxTxT = jnp.zeros((batch, length, length), bool).at[:, :, 0].set(True)
  dec_visible_BxTxT = dec_visible_BxTxT.at[:, 1:, 1:].set(visibility_BxTxT[:, :-1, :-1])
  return tokens_BxT, dec_pos_BxT, dec_visible_BxTxT


def _check_shape(name: str, array: Any, shape: tuple[int, ...]) -> None:
  if tuple(array.shape) != shape:
    raise ValueError(f"{name} has shape {tuple(array.shape)}; expected {shape}.")


class T5LM(lm_lib.LanguageModel):
  """T5 as a `LanguageModel`: prompt -> encoder, shifted response -> decoder.

  The cache from `prefill` is a dict whose every leaf has the batch as its leading dimension:
    "self_keys", "self_values": per decoder layer [B, H, 1 + N, Dh]; index 0 is the start token,
      index 1 + j response slot j (N = max_new_tokens).
    "cross_keys", "cross_values": per decoder layer [B, H, S, Dh], from the encoder run once.
    "positions": [B, 1 + N] int32 decoder positions (start token 0, slot j its position + 1).
    "prompt_mask": [B, S] bool.
  With `scan_layers` each of the four key/value entries is one stack [B, L, H, ., Dh] instead of
  a tuple of L arrays.
  """

  def __init__(self, config: ml_collections.ConfigDict):
    self.dims = dims_from_config(config)
    self.config = layer_stack.with_layer_options(config, "T5")
    self.vocab_size = self.dims.vocab_size
    self.start_id = int(config.decoder_start_token_id)
    self.module = T5Transformer(self.dims)

  def _split_kvs(self, kvs):
    """The decoder's keys/values -> (keys, values) cache entries (tuples, or stacks if scanned)."""
    if self.dims.scan_layers:
      return kvs
    return tuple(k for k, _ in kvs), tuple(v for _, v in kvs)

  def _join_kvs(self, keys, values):
    """Inverse of `_split_kvs`."""
    if self.dims.scan_layers:
      return keys, values
    return tuple(zip(keys, values))

  def _deterministic(self, dropout_rng):
    return dropout_rng is None or self.dims.dropout_rate == 0.0

  def _boxed_init(self, rng):
    tokens = jnp.zeros((1, 2), jnp.int32)
    visible = jnp.tril(jnp.ones((1, 2, 2), bool))
    positions = jnp.arange(2)[None, :]
    return self.module.init({"params": rng}, tokens, jnp.ones((1, 2), bool), tokens, positions,
                            visible, True)["params"]

  def init(self, rng: jax.Array) -> lm_lib.Params:
    """Fresh float32 parameters (a plain nested dict)."""
    return nn.unbox(self._boxed_init(rng))

  def abstract_params(self) -> lm_lib.Params:
    """The parameter tree as `jax.ShapeDtypeStruct`s."""
    return nn.unbox(jax.eval_shape(self._boxed_init, jax.random.key(0)))

  def param_axes(self) -> lm_lib.Params:
    """PartitionSpecs of logical axis names, same tree as `init`'s parameters."""
    return nn.get_partition_spec(jax.eval_shape(self._boxed_init, jax.random.key(0)))

  def logits(self, params, batch, *, dropout_rng=None):
    """Teacher-forced logits [B, T, V] float32 for `batch['response']` (see `lm.py`)."""
    return self.head(params, self.hidden(params, batch, dropout_rng=dropout_rng))

  def head(self, params, hidden):
    """Decoder features [..., D] from `hidden` -> logits [..., V] float32."""
    lead = hidden.shape[:-1]
    flat_1xNxD = hidden.reshape((1, -1, hidden.shape[-1]))
    logits = self.module.apply({"params": params}, flat_1xNxD, method="head")
    return logits.reshape(lead + (self.vocab_size,))

  def hidden(self, params, batch, *, dropout_rng=None):
    """Teacher-forced decoder features [B, T, D] (compute dtype); `head` maps them to logits."""
    for key in ("prompt", "prompt_mask", "response"):
      if key not in batch:
        raise ValueError(f"T5 batch lacks {key!r}; it has {sorted(batch)}.")
    prompt_BxS, response_BxT = batch["prompt"], batch["response"]
    if prompt_BxS.ndim != 2 or response_BxT.ndim != 2:
      raise ValueError(f"T5 expects prompt [B, S] and response [B, T]; got shapes "
                       f"{tuple(prompt_BxS.shape)} and {tuple(response_BxT.shape)}.")
    batch_size, length = response_BxT.shape
    _check_shape("prompt_mask", batch["prompt_mask"], tuple(prompt_BxS.shape))
    _check_shape("response", response_BxT, (prompt_BxS.shape[0], length))
    positions_BxT = batch.get("response_positions")
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch_size, length))
    _check_shape("response_positions", positions_BxT, (batch_size, length))
    visibility_BxTxT = batch.get("response_visibility")
    if visibility_BxTxT is None:
      visibility_BxTxT = jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)),
                                          (batch_size, length, length))
    _check_shape("response_visibility", visibility_BxTxT, (batch_size, length, length))
    tokens_BxT, dec_pos_BxT, dec_visible_BxTxT = _decoder_inputs(
        response_BxT, positions_BxT, visibility_BxTxT.astype(bool), self.start_id)
    deterministic = self._deterministic(dropout_rng)
    rngs = None if deterministic else {"dropout": dropout_rng}
    return self.module.apply({"params": params}, prompt_BxS.astype(jnp.int32),
                             batch["prompt_mask"].astype(bool), tokens_BxT, dec_pos_BxT,
                             dec_visible_BxTxT, deterministic, return_hidden=True, rngs=rngs)

  def prefill(self, params, prompt, prompt_mask, max_new_tokens):
    """Runs the encoder once and the start token through the decoder.

    Args:
      prompt: [B, S] int32, left-padded.
      prompt_mask: [B, S].
      max_new_tokens: response slots in the self-attention cache (static).

    Returns:
      (logits [B, V] float32 for response slot 0, cache; see the class docstring).
    """
    if prompt.ndim != 2:
      raise ValueError(f"prompt has shape {tuple(prompt.shape)}; expected [B, S].")
    _check_shape("prompt_mask", prompt_mask, tuple(prompt.shape))
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive Python int.")
    d = self.dims
    batch_size = prompt.shape[0]
    prompt_mask = prompt_mask.astype(bool)
    variables = {"params": params}
    encoded = self.module.apply(variables, prompt.astype(jnp.int32), prompt_mask, True,
                                method=T5Transformer.encode)
    cross_kvs = self.module.apply(variables, encoded, method=T5Transformer.cross_keys_values)
    if d.scan_layers:
      empty = jnp.zeros((batch_size, d.num_decoder_layers, d.num_heads, 1 + max_new_tokens,
                         d.head_dim), d.dtype)
      empty_kvs = (empty, empty)
    else:
      empty = jnp.zeros((batch_size, d.num_heads, 1 + max_new_tokens, d.head_dim), d.dtype)
      empty_kvs = tuple((empty, empty) for _ in range(d.num_decoder_layers))
    positions_BxK = jnp.zeros((batch_size, 1 + max_new_tokens), jnp.int32)
    visible_Bx1xK = jnp.zeros((batch_size, 1, 1 + max_new_tokens), bool).at[:, :, 0].set(True)
    logits_Bx1xV, kvs = self.module.apply(
        variables, jnp.full((batch_size, 1), self.start_id, jnp.int32),
        jnp.zeros((batch_size, 1), jnp.int32), positions_BxK, visible_Bx1xK, cross_kvs,
        prompt_mask, True, empty_kvs, jnp.int32(0), method=T5Transformer.decode)
    self_keys, self_values = self._split_kvs(kvs)
    cross_keys, cross_values = self._split_kvs(cross_kvs)
    cache = {
        "self_keys": self_keys,
        "self_values": self_values,
        "cross_keys": cross_keys,
        "cross_values": cross_values,
        "positions": positions_BxK,
        "prompt_mask": prompt_mask,
    }
    return logits_Bx1xV[:, 0], cache

  def decode_step(self, params, cache, token, slot, position, visible):
    """Feeds `token` into response slot `slot` and returns the next token's logits.

    Args:
      cache: from `prefill` or a previous `decode_step`.
      token: [B] int32.
      slot: [] int32 in [0, max_new_tokens).
      position: [B] int32, counted from the start of the response.
      visible: [B, max_new_tokens] bool, the response slots this token attends to (itself
        included); the start token and the prompt are always visible.

    Returns:
      (logits [B, V] float32, updated cache).
    """
    positions_BxK = cache["positions"]
    batch_size, num_keys = positions_BxK.shape
    _check_shape("token", token, (batch_size,))
    _check_shape("position", position, (batch_size,))
    _check_shape("visible", visible, (batch_size, num_keys - 1))
    write_index = jnp.asarray(slot, jnp.int32) + 1
    query_pos_Bx1 = position.astype(jnp.int32)[:, None] + 1
    positions_BxK = jax.lax.dynamic_update_slice_in_dim(positions_BxK, query_pos_Bx1, write_index,
                                                        axis=1)
    visible_Bx1xK = jnp.concatenate([jnp.ones((batch_size, 1), bool), visible.astype(bool)],
                                    axis=1)[:, None, :]
    cross_kvs = self._join_kvs(cache["cross_keys"], cache["cross_values"])
    self_kvs = self._join_kvs(cache["self_keys"], cache["self_values"])
    logits_Bx1xV, kvs = self.module.apply(
        {"params": params}, token.astype(jnp.int32)[:, None], query_pos_Bx1, positions_BxK,
        visible_Bx1xK, cross_kvs, cache["prompt_mask"], True, self_kvs, write_index,
        method=T5Transformer.decode)
    new_cache = dict(cache)
    new_cache["self_keys"], new_cache["self_values"] = self._split_kvs(kvs)
    new_cache["positions"] = positions_BxK
    return logits_Bx1xV[:, 0], new_cache
