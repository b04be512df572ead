"""Flax Linen building blocks shared by the model families.

Every parameter carries logical axis names (`nn.with_logical_partitioning`),
all taken from `jaxsi.partitioning.LOGICAL_RULES`. Parameters are created in
float32; each layer casts them to its compute `dtype` when it uses them.
Normalization statistics and attention softmax are always computed in float32.

Activations are constrained with the `activation_*` logical names; outside a
`flax.linen.logical_axis_rules` context (or without a mesh) that is a no-op.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
Initializer = Callable[..., jax.Array]

# Masked attention scores are replaced (not offset) by this value, so it never
# overflows when added to a bias; exp() of it relative to any real score is 0.
MASKED_SCORE = -1e9

DEFAULT_KERNEL_INIT = nn.initializers.normal(stddev=0.02)
DEFAULT_EMBEDDING_INIT = nn.initializers.normal(stddev=0.02)

BATCH_LENGTH_EMBED = ("activation_batch", "activation_length", "activation_embed")
BATCH_LENGTH_HEADS_KV = ("activation_batch", "activation_length", "activation_heads",
                         "activation_kv")
BATCH_HEADS_LENGTH_KV = ("activation_batch", "activation_heads", "activation_length",
                         "activation_kv")
BATCH_LENGTH_MLP = ("activation_batch", "activation_length", "activation_mlp")
BATCH_LENGTH_VOCAB = ("activation_batch", "activation_length", "activation_vocab")

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Logical sharding constraint on an activation (no-op without rules and a mesh)."""
  return nn.with_logical_constraint(x, tuple(names))


def _as_tuple(value: int | Sequence[int]) -> tuple[int, ...]:
  return (value,) if isinstance(value, int) else tuple(value)


class DenseGeneral(nn.Module):
  """A projection contracting the trailing `len(axis)` input dimensions.

  The kernel has shape `in_dims + features`, e.g. [E, H, D] for a query
  projection or [H, D, E] for an attention output projection.

  Attributes:
    features: output feature dimensions.
    kernel_axes: one logical name per kernel dimension (inputs, then outputs).
    axis: the contracted input dimensions; must be the trailing ones.
    use_bias: add a bias over the output dimensions.
    dtype: compute dtype.
    kernel_init: kernel initializer (float32).
    bias_init: bias initializer.
  """
  features: int | Sequence[int]
  kernel_axes: Sequence[str]
  axis: int | Sequence[int] = -1
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  kernel_init: Initializer = DEFAULT_KERNEL_INIT
  bias_init: Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Projects `x` [..., *in_dims] to [..., *features]."""
    features = _as_tuple(self.features)
    axis = tuple(sorted(a % x.ndim for a in _as_tuple(self.axis)))
    if axis != tuple(range(x.ndim - len(axis), x.ndim)):
      raise ValueError(f"DenseGeneral axis={self.axis} must name the trailing input "
                       f"dimensions of an input of rank {x.ndim}.")
    if len(self.kernel_axes) != len(axis) + len(features):
      raise ValueError(f"DenseGeneral kernel_axes={tuple(self.kernel_axes)} must have one "
                       f"name per kernel dimension ({len(axis) + len(features)}).")
    in_dims = tuple(x.shape[a] for a in axis)
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(self.kernel_init, tuple(self.kernel_axes)),
        in_dims + features, jnp.float32)
    y = jax.lax.dot_general(
        x.astype(self.dtype), kernel.astype(self.dtype),
        ((axis, tuple(range(len(axis)))), ((), ())))
    if self.use_bias:
      bias = self.param(
          "bias",
          nn.with_logical_partitioning(self.bias_init, tuple(self.kernel_axes[len(axis):])),
          features, jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


class Embed(nn.Module):
  """A lookup table, usable in reverse (`attend`) as a tied output head.

  Attributes:
    num_embeddings: number of rows (vocabulary size or number of positions).
    features: row width.
    axes: logical names of the table's two dimensions.
    dtype: compute dtype of the returned embeddings / logits.
    embedding_init: table initializer (float32).
  """
  num_embeddings: int
  features: int
  axes: tuple[str, str] = ("vocab", "embed")
  dtype: Dtype = jnp.float32
  embedding_init: Initializer = DEFAULT_EMBEDDING_INIT

  def setup(self):
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(self.embedding_init, self.axes),
        (self.num_embeddings, self.features), jnp.float32)

  def __call__(self, ids: jax.Array) -> jax.Array:
    """Looks up `ids` [...] int -> [..., features]."""
    return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """Scores `x` [..., features] against every row -> [..., num_embeddings]."""
    return jnp.einsum("...e,ve->...v", x.astype(self.dtype), self.embedding.astype(self.dtype))


class RMSNorm(nn.Module):
  """Root-mean-square normalization with a learned scale (Llama, T5).

  Attributes:
    eps: added to the mean square.
    dtype: output dtype (statistics are float32).
  """
  eps: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Normalizes `x` [..., E] over its last dimension."""
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (x32 * scale).astype(self.dtype)


class LayerNorm(nn.Module):
  """Layer normalization (mean and variance) with a learned scale and bias (GPT-2).

  Attributes:
    eps: added to the variance.
    use_bias: learn an additive bias.
    dtype: output dtype (statistics are float32).
  """
  eps: float = 1e-5
  use_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Normalizes `x` [..., E] over its last dimension."""
    features = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (features,), jnp.float32)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                        (features,), jnp.float32)
      y = y + bias
    return y.astype(self.dtype)


def rope_inverse_frequencies(head_dim: int, theta: float) -> np.ndarray:
  """Rotary inverse frequencies [head_dim // 2] float32: theta^(-2i / head_dim)."""
  if head_dim % 2:
    raise ValueError(f"Rotary embeddings need an even head_dim, got {head_dim}.")
  exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
  return (1.0 / np.power(np.float32(theta), exponents)).astype(np.float32)


def apply_rope(x_BxLxHxD: jax.Array, positions_BxL: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding in the "rotate half" layout.

  Feature i of the first half is rotated together with feature i of the second
  half (the layout of Hugging Face Llama checkpoints), by the angle
  position * inv_freq[i]. Computed in float32, returned in x's dtype.

  Args:
    x_BxLxHxD: queries or keys [B, L, H, D].
    positions_BxL: absolute positions [B, L] (int).
    theta: the rotary base.

  Returns:
    The rotated array [B, L, H, D].
  """
  inv_freq = jnp.asarray(rope_inverse_frequencies(x_BxLxHxD.shape[-1], theta))
  angles_BxLxF = positions_BxL.astype(jnp.float32)[..., None] * inv_freq
  angles_BxLx1xD = jnp.concatenate([angles_BxLxF, angles_BxLxF], axis=-1)[:, :, None, :]
  x = x_BxLxHxD.astype(jnp.float32)
  first, second = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-second, first], axis=-1)
  out = x * jnp.cos(angles_BxLx1xD) + rotated * jnp.sin(angles_BxLx1xD)
  return out.astype(x_BxLxHxD.dtype)


def dot_product_attention(q_BxLxHxD: jax.Array, k_BxMxKxD: jax.Array, v_BxMxKxD: jax.Array,
                          mask_BxLxM: jax.Array, *, bias_BxHxLxM: jax.Array | None = None,
                          scale: float | None = None) -> jax.Array:
  """Scaled dot-product attention with grouped-query heads; keys and values [B, M, K, D].

  `head_major_attention` with keys and values given as [B, M, K, D]; see there.

  Args:
    q_BxLxHxD: queries [B, L, H, D].
    k_BxMxKxD: keys [B, M, K, D], K divides H.
    v_BxMxKxD: values [B, M, K, D].
    mask_BxLxM: bool [B, L, M], True where a query may attend to a key.
    bias_BxHxLxM: optional additive score bias broadcastable to [B, H, L, M].
    scale: score multiplier (default 1 / sqrt(D); T5 uses 1.0).

  Returns:
    Attention output [B, L, H, D] in the queries' dtype.
  """
  return head_major_attention(q_BxLxHxD, jnp.swapaxes(k_BxMxKxD, 1, 2),
                              jnp.swapaxes(v_BxMxKxD, 1, 2), mask_BxLxM,
                              bias_BxHxLxM=bias_BxHxLxM, scale=scale)


def head_major_attention(q_BxLxHxD: jax.Array, k_BxKxMxD: jax.Array, v_BxKxMxD: jax.Array,
                         mask_BxLxM: jax.Array, *, bias_BxHxLxM: jax.Array | None = None,
                         scale: float | None = None) -> jax.Array:
  """Scaled dot-product attention with grouped-query heads over head-major keys and values.

  Keys and values are [B, K, M, D] (the KV cache layout): both score and mixing
  contractions then read each (batch, head) block as one contiguous [M, D]
  matrix, so XLA never transposes the (possibly long) cache, as it must for
  [B, M, K, D]. Query head h reads key/value head h // (H // K), exactly as if
  each key/value head were repeated H // K times; the grouped einsum avoids
  materializing the repeat. Scores and softmax are float32; masked scores are
  replaced by a large finite negative, so a fully masked row yields a uniform
  (finite) average rather than NaN.

  Args:
    q_BxLxHxD: queries [B, L, H, D].
    k_BxKxMxD: keys [B, K, M, D], K divides H.
    v_BxKxMxD: values [B, K, M, D].
    mask_BxLxM: bool [B, L, M], True where a query may attend to a key.
    bias_BxHxLxM: optional additive score bias broadcastable to [B, H, L, M].
    scale: score multiplier (default 1 / sqrt(D); T5 uses 1.0).

  Returns:
    Attention output [B, L, H, D] in the queries' dtype.
  """
  b, l, h, d = q_BxLxHxD.shape
  k = k_BxKxMxD.shape[1]
  if h % k:
    raise ValueError(f"num_heads={h} must be a multiple of num_kv_heads={k}.")
  scale = 1.0 / np.sqrt(d) if scale is None else scale
  q_BxLxKxGxD = q_BxLxHxD.reshape(b, l, k, h // k, d)
  scores_BxKxGxLxM = jnp.einsum("blkgd,bkmd->bkglm", q_BxLxKxGxD, k_BxKxMxD,
                                preferred_element_type=jnp.float32) * scale
  scores_BxHxLxM = scores_BxKxGxLxM.reshape(b, h, l, -1)
  if bias_BxHxLxM is not None:
    scores_BxHxLxM = scores_BxHxLxM + bias_BxHxLxM.astype(jnp.float32)
  scores_BxHxLxM = jnp.where(mask_BxLxM[:, None, :, :], scores_BxHxLxM, MASKED_SCORE)
  probs_BxHxLxM = jax.nn.softmax(scores_BxHxLxM, axis=-1).astype(v_BxKxMxD.dtype)
  probs_BxKxGxLxM = probs_BxHxLxM.reshape(b, k, h // k, l, -1)
  out_BxLxKxGxD = jnp.einsum("bkglm,bkmd->blkgd", probs_BxKxGxLxM, v_BxKxMxD)
  return out_BxLxKxGxD.reshape(b, l, h, d)


class Attention(nn.Module):
  """Multi-head (grouped-query) attention with optional rotary positions and KV cache.

  Parameters: query [E, H, D], key/value [E, K, D], out [H, D, E] (+ biases).

  Attributes:
    num_heads: query heads H.
    num_kv_heads: key/value heads K (divides H).
    head_dim: per-head width D.
    dtype: compute dtype.
    qkv_bias: biases on the query/key/value projections.
    out_bias: bias on the output projection.
    rope_theta: rotary base; None for no rotary embedding.
    scale: score multiplier (default 1 / sqrt(D)).
    kernel_init: projection initializer.
  """
  num_heads: int
  num_kv_heads: int
  head_dim: int
  dtype: Dtype = jnp.float32
  qkv_bias: bool = False
  out_bias: bool = False
  rope_theta: float | None = None
  scale: float | None = None
  kernel_init: Initializer = DEFAULT_KERNEL_INIT

  @nn.compact
  def __call__(self, x_q_BxLxE: jax.Array, x_kv_BxMxE: jax.Array, mask_BxLxN: jax.Array, *,
               positions_q_BxL: jax.Array | None = None,
               positions_kv_BxM: jax.Array | None = None,
               cache: dict[str, jax.Array] | None = None,
               cache_index: jax.Array | int | None = None,
               bias_BxHxLxN: jax.Array | None = None,
               ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
    """Attends from `x_q` to `x_kv` (plus whatever the cache already holds).

    Args:
      x_q_BxLxE: query inputs [B, L, E].
      x_kv_BxMxE: key/value inputs [B, M, E] (the same array for self-attention).
      mask_BxLxN: bool [B, L, N]; N = M without a cache, else at most the cache length: the
        cache slots from N on are not attended at all (a prefill into a fresh cache passes
        N = M and skips the empty slots).
      positions_q_BxL: query positions (needed with `rope_theta`).
      positions_kv_BxM: key positions (needed with `rope_theta`).
      cache: optional {"key", "value"}: [B, K, N, D] each (head-major, see
        `head_major_attention`); the new keys/values are written at `cache_index`
        along N before attending over all N slots.
      cache_index: where the M new keys go in the cache.
      bias_BxHxLxN: optional additive score bias.

    Returns:
      (output [B, L, E], the updated cache or None).
    """
    def projection(heads, axes, name, use_bias):
      return DenseGeneral((heads, self.head_dim), axes, use_bias=use_bias, dtype=self.dtype,
                          kernel_init=self.kernel_init, name=name)

    q = projection(self.num_heads, ("embed", "heads", "kv"), "query", self.qkv_bias)(x_q_BxLxE)
    k = projection(self.num_kv_heads, ("embed", "kv_heads", "kv"), "key",
                   self.qkv_bias)(x_kv_BxMxE)
    v = projection(self.num_kv_heads, ("embed", "kv_heads", "kv"), "value",
                   self.qkv_bias)(x_kv_BxMxE)
    if self.rope_theta is not None:
      q = apply_rope(q, positions_q_BxL, self.rope_theta)
      k = apply_rope(k, positions_kv_BxM, self.rope_theta)
    q = constrain(q, BATCH_LENGTH_HEADS_KV)
    # Head-major keys/values: only the M new rows are transposed here, never the cache.
    k = constrain(jnp.swapaxes(k, 1, 2), BATCH_HEADS_LENGTH_KV)
    v = constrain(jnp.swapaxes(v, 1, 2), BATCH_HEADS_LENGTH_KV)

    new_cache = None
    if cache is not None:
      k = jax.lax.dynamic_update_slice_in_dim(cache["key"], k.astype(cache["key"].dtype),
                                              cache_index, axis=2)
      v = jax.lax.dynamic_update_slice_in_dim(cache["value"], v.astype(cache["value"].dtype),
                                              cache_index, axis=2)
      new_cache = {"key": k, "value": v}
      visible_slots = mask_BxLxN.shape[-1]
      if visible_slots < k.shape[2]:
        k, v = k[:, :, :visible_slots], v[:, :, :visible_slots]

    out = head_major_attention(q, k.astype(self.dtype), v.astype(self.dtype), mask_BxLxN,
                               bias_BxHxLxM=bias_BxHxLxN, scale=self.scale)
    out = constrain(out, BATCH_LENGTH_HEADS_KV)
    out = DenseGeneral(x_q_BxLxE.shape[-1], ("heads", "kv", "embed"), axis=(-2, -1),
                       use_bias=self.out_bias, dtype=self.dtype, kernel_init=self.kernel_init,
                       name="out")(out)
    return out, new_cache


class Mlp(nn.Module):
  """Feed-forward block: `wo(act(wi(x)))`, or gated `wo(act(wi_0(x)) * wi_1(x))`.

  Gated with "silu" is SwiGLU (Llama; wi_0 = gate, wi_1 = up); gated with
  "gelu_tanh" is T5 v1.1's GeGLU.

  Attributes:
    d_ff: hidden width F.
    activation: one of `ACTIVATIONS`.
    gated: use the gated form.
    use_bias: biases on every projection.
    dtype: compute dtype.
    kernel_init: projection initializer.
  """
  d_ff: int
  activation: str = "gelu_tanh"
  gated: bool = False
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  kernel_init: Initializer = DEFAULT_KERNEL_INIT

  @nn.compact
  def __call__(self, x_BxLxE: jax.Array) -> jax.Array:
    """Maps [B, L, E] -> [B, L, E]."""
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"Unknown MLP activation {self.activation!r}; "
                       f"accepted: {sorted(ACTIVATIONS)}.")
    act = ACTIVATIONS[self.activation]

    def dense(features, axes, name):
      return DenseGeneral(features, axes, use_bias=self.use_bias, dtype=self.dtype,
                          kernel_init=self.kernel_init, name=name)

    if self.gated:
      h_BxLxF = (act(dense(self.d_ff, ("embed", "mlp"), "wi_0")(x_BxLxE))
                 * dense(self.d_ff, ("embed", "mlp"), "wi_1")(x_BxLxE))
    else:
      h_BxLxF = act(dense(self.d_ff, ("embed", "mlp"), "wi")(x_BxLxE))
    h_BxLxF = constrain(h_BxLxF, BATCH_LENGTH_MLP)
    return dense(x_BxLxE.shape[-1], ("mlp", "embed"), "wo")(h_BxLxF)
