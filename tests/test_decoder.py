"""Tests for jaxsi.models.layers and the decoder-only LanguageModel (GPT-2 and Llama variants)."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec

from jaxsi import partitioning
from jaxsi.models import build, decoder, layers

B, S, T = 3, 6, 7
VOCAB = 64


def tiny_config(variant, **overrides):
  cfg = decoder.default_config(variant)
  cfg.update(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4,
             num_kv_heads=4 if variant == "gpt2" else 2, head_dim=8, d_ff=64, max_len=32)
  cfg.update(overrides)
  return cfg


def random_params(lm, seed=0):
  """Freshly initialized params with every leaf perturbed (biases and norms included)."""
  params = lm.init(jax.random.key(seed))
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  leaves = [x + 0.1 * rng.normal(size=x.shape).astype(np.float32) for x in leaves]
  return jax.tree.unflatten(treedef, leaves)


def make_batch(seed=0, prompt_lengths=(6, 4, 1)):
  rng = np.random.default_rng(seed)
  prompt = rng.integers(0, VOCAB, (B, S)).astype(np.int32)
  prompt_mask = np.arange(S)[None, :] >= (S - np.asarray(prompt_lengths))[:, None]
  response = rng.integers(0, VOCAB, (B, T)).astype(np.int32)
  response_mask = np.ones((B, T), bool)
  response_mask[1, 5:] = False
  return dict(prompt=prompt, prompt_mask=prompt_mask, response=response,
              response_mask=response_mask)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request):
  lm = build(tiny_config(request.param))
  return lm, random_params(lm), jax.jit(lm.logits)


# ----------------------------------------------------------------------------- layers vs NumPy


def test_norms_match_numpy():
  x = np.random.default_rng(0).normal(size=(2, 3, 16)).astype(np.float32) * 3 + 1
  scale = np.random.default_rng(1).normal(size=16).astype(np.float32)
  bias = np.random.default_rng(2).normal(size=16).astype(np.float32)
  rms = layers.RMSNorm(eps=1e-6).apply({"params": {"scale": scale}}, x)
  expected = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6) * scale
  np.testing.assert_allclose(rms, expected, rtol=1e-5, atol=1e-5)
  ln = layers.LayerNorm(eps=1e-5).apply({"params": {"scale": scale, "bias": bias}}, x)
  expected = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(ln, expected * scale + bias, rtol=1e-5, atol=1e-5)


def test_rope_matches_numpy_rotation_of_feature_pairs():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
  positions = rng.integers(0, 50, (2, 5))
  out = np.asarray(layers.apply_rope(jnp.asarray(x), jnp.asarray(positions), 100.0))
  # Feature i pairs with feature i + D/2 and rotates by position * 100^(-2i/D).
  half = 4
  for i in range(half):
    angle = positions[:, :, None] * 100.0 ** (-2 * i / 8)
    a, b = x[..., i], x[..., i + half]
    np.testing.assert_allclose(out[..., i], a * np.cos(angle) - b * np.sin(angle), atol=1e-5)
    np.testing.assert_allclose(out[..., i + half], b * np.cos(angle) + a * np.sin(angle),
                               atol=1e-5)


def test_grouped_query_attention_matches_numpy_with_repeated_heads():
  rng = np.random.default_rng(0)
  q = rng.normal(size=(2, 4, 6, 8)).astype(np.float32)
  k = rng.normal(size=(2, 5, 2, 8)).astype(np.float32)
  v = rng.normal(size=(2, 5, 2, 8)).astype(np.float32)
  mask = rng.random((2, 4, 5)) < 0.7
  mask[:, :, 0] = True
  bias = rng.normal(size=(1, 6, 4, 5)).astype(np.float32)
  out = layers.dot_product_attention(q, k, v, mask, bias_BxHxLxM=bias)
  k_rep, v_rep = np.repeat(k, 3, axis=2), np.repeat(v, 3, axis=2)
  scores = np.einsum("blhd,bmhd->bhlm", q, k_rep) / np.sqrt(8) + bias
  scores = np.where(mask[:, None], scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  np.testing.assert_allclose(out, np.einsum("bhlm,bmhd->blhd", probs, v_rep), atol=1e-5)


def test_fully_masked_attention_row_is_finite():
  q = jnp.ones((1, 1, 2, 4))
  kv = jnp.ones((1, 3, 1, 4))
  out = layers.dot_product_attention(q, kv, kv, jnp.zeros((1, 1, 3), bool))
  assert np.isfinite(np.asarray(out)).all()


# ----------------------------------------------------------------------------- decoder LM


def test_shapes_dtypes_and_param_axes(model):
  lm, params, logits_fn = model
  logits = logits_fn(params, make_batch())
  assert logits.shape == (B, T, VOCAB) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()
  chex.assert_trees_all_equal_shapes_and_dtypes(lm.abstract_params(), params)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(lm.init(jax.random.key(3))))
  axes = lm.param_axes()
  specs = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, PartitionSpec))
  leaves = jax.tree.leaves(params)
  assert jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, PartitionSpec)) == (
      jax.tree.structure(params))
  known = {name for name, _ in partitioning.LOGICAL_RULES}
  for spec, leaf in zip(specs, leaves):
    assert len(spec) == leaf.ndim
    assert all(name in known for name in spec), spec


def test_variant_structure():
  gpt2 = build(tiny_config("gpt2")).abstract_params()
  llama = build(tiny_config("llama")).abstract_params()
  assert "pos_embed" in gpt2 and "lm_head" not in gpt2
  assert "pos_embed" not in llama and llama["lm_head"]["kernel"].shape == (32, VOCAB)
  assert llama["layer_0"]["attn"]["key"]["kernel"].shape == (32, 2, 8)
  assert "bias" not in llama["layer_0"]["attn"]["query"]
  assert set(llama["layer_0"]["mlp"]) == {"wi_0", "wi_1", "wo"}
  qwen = build(tiny_config("llama", attention_bias=True)).abstract_params()
  assert qwen["layer_0"]["attn"]["query"]["bias"].shape == (4, 8)
  assert "bias" not in qwen["layer_0"]["attn"]["out"]


def test_causality_and_prompt_padding(model):
  _, params, logits_fn = model
  batch = make_batch()
  base = np.asarray(logits_fn(params, batch))
  k = 3
  changed = dict(batch, response=batch["response"].copy())
  changed["response"][:, k] = (changed["response"][:, k] + 1) % VOCAB
  after = np.asarray(logits_fn(params, changed))
  np.testing.assert_allclose(after[:, :k + 1], base[:, :k + 1], atol=1e-6)
  assert np.abs(after[:, k + 1:] - base[:, k + 1:]).max() > 1e-3
  # Row 1 has 2 padding tokens and row 2 has 5: change them all.
  repadded = dict(batch, prompt=np.where(batch["prompt_mask"], batch["prompt"],
                                         (batch["prompt"] + 7) % VOCAB))
  np.testing.assert_allclose(np.asarray(logits_fn(params, repadded)), base, atol=1e-6)


def test_left_padding_equals_unpadded(model):
  lm, params, logits_fn = model
  batch = make_batch()
  padded = np.asarray(logits_fn(params, batch))
  for row, length in ((1, 4), (2, 1)):
    single = dict(prompt=batch["prompt"][row:row + 1, S - length:],
                  prompt_mask=np.ones((1, length), bool),
                  response=batch["response"][row:row + 1])
    np.testing.assert_allclose(np.asarray(logits_fn(params, single))[0], padded[row],
                               atol=1e-5)


def test_response_visibility_equals_materialized_sequence(model):
  """Slots a b c x b' d e, where b' copies b at b's position and hides b, c, x.

  The visible history of d and e is then a b' d e, so their logits must equal a
  plain forward pass over the response a b d e.
  """
  lm, params, logits_fn = model
  batch = make_batch(seed=1)
  a, b_, c, x, d, e = 10, 11, 12, 13, 14, 15
  slots = np.array([a, b_, c, x, b_, d, e], np.int32)
  positions = np.array([0, 1, 2, 3, 1, 2, 3], np.int32)
  visible = np.tril(np.ones((T, T), bool))
  visible[4:, 1:4] = False  # b' and later slots no longer see b, c, x
  full = dict(batch, response=np.tile(slots, (B, 1)),
              response_positions=np.tile(positions, (B, 1)),
              response_visibility=np.tile(visible, (B, 1, 1)))
  got = np.asarray(logits_fn(params, full))
  plain = dict(prompt=batch["prompt"], prompt_mask=batch["prompt_mask"],
               response=np.tile(np.array([a, b_, d, e], np.int32), (B, 1)))
  want = np.asarray(logits_fn(params, plain))
  # logits[:, t] reads slot t - 1 (t = 0: the prompt alone). Slot 1 (b) and slot 4
  # (b') both end the history a b; slot 5 (d) ends a b d.
  np.testing.assert_allclose(got[:, [0, 1, 2, 5, 6]], want[:, [0, 1, 2, 2, 3]], atol=1e-5)


def decode_all(lm, params, batch, positions, visibility):
  """Prefill, then one decode_step per response slot with the given pattern: logits [B, T, V]."""
  prefill = jax.jit(lm.prefill, static_argnums=3)
  step = jax.jit(lm.decode_step)
  first, cache = prefill(params, batch["prompt"], batch["prompt_mask"], T)
  out = [first]
  for t in range(T - 1):
    logits, cache = step(params, cache, jnp.asarray(batch["response"][:, t]), jnp.int32(t),
                         jnp.asarray(positions[:, t]), jnp.asarray(visibility[:, t]))
    out.append(logits)
  return np.stack([np.asarray(o) for o in out], axis=1)


def test_prefill_and_decode_reproduce_logits(model):
  lm, params, logits_fn = model
  batch = make_batch(seed=2)
  want = np.asarray(logits_fn(params, batch))
  positions = np.tile(np.arange(T), (B, 1))
  causal = np.tile(np.tril(np.ones((T, T), bool)), (B, 1, 1))
  np.testing.assert_allclose(decode_all(lm, params, batch, positions, causal), want, atol=1e-5)

  # A backspace-like pattern, different per row: slot 3 replaces slot 1 in row 0,
  # slot 4 replaces slots 2-3 in row 1; row 2 stays causal.
  positions = positions.copy()
  visibility = causal.copy()
  positions[0, 3:] = [1, 2, 3, 4]
  visibility[0, 3:, 1:3] = False
  positions[1, 4:] = [2, 3, 4]
  visibility[1, 4:, 2:4] = False
  pattern = dict(batch, response_positions=positions, response_visibility=visibility)
  want = np.asarray(logits_fn(params, pattern))
  assert np.abs(want[:2, 4:] - np.asarray(logits_fn(params, batch))[:2, 4:]).max() > 1e-3
  np.testing.assert_allclose(decode_all(lm, params, batch, positions, visibility), want,
                             atol=1e-5)


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_bfloat16_compute_stays_close(variant):
  lm32 = build(tiny_config(variant))
  lm16 = build(tiny_config(variant, dtype="bfloat16"))
  params = random_params(lm32)
  batch = make_batch()
  want = np.asarray(jax.jit(lm32.logits)(params, batch))
  got = jax.jit(lm16.logits)(params, batch)
  assert got.dtype == jnp.float32
  assert np.abs(np.asarray(got) - want).max() < 0.05 * np.abs(want).max()
  assert np.abs(np.asarray(got) - want).max() > 0  # really computed in bfloat16
  first, cache = jax.jit(lm16.prefill, static_argnums=3)(params, batch["prompt"],
                                                         batch["prompt_mask"], T)
  assert cache["kv"]["layer_0"]["key"].dtype == jnp.bfloat16
  np.testing.assert_allclose(first, got[:, 0], atol=0.05 * np.abs(want).max())


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_dropout_only_with_rng(variant):
  lm = build(tiny_config(variant, dropout_rate=0.3))
  params = random_params(lm)
  batch = make_batch()
  logits_fn = jax.jit(lm.logits)
  plain = np.asarray(logits_fn(params, batch))
  with_rng = np.asarray(logits_fn(params, batch, dropout_rng=jax.random.key(0)))
  assert np.abs(with_rng - plain).max() > 1e-3
  np.testing.assert_array_equal(
      with_rng, np.asarray(logits_fn(params, batch, dropout_rng=jax.random.key(0))))
  assert np.abs(np.asarray(logits_fn(params, batch, dropout_rng=jax.random.key(1)))
                - with_rng).max() > 1e-3
  no_dropout = build(tiny_config(variant))
  np.testing.assert_allclose(
      np.asarray(jax.jit(no_dropout.logits)(params, batch, dropout_rng=jax.random.key(0))),
      plain, atol=1e-6)


def test_sharded_logits_under_mesh_and_rules():
  lm = build(tiny_config("llama"))
  params = random_params(lm)
  batch = make_batch()
  want = np.asarray(jax.jit(lm.logits)(params, batch))
  mesh = jax.make_mesh((2, 2, 2), partitioning.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  param_shardings = partitioning.shardings_for(lm.param_axes(), params, mesh)
  sharded = jax.device_put(params, param_shardings)
  assert sharded["embed"]["embedding"].sharding.spec == PartitionSpec("tensor", "fsdp")
  batch_b4 = {k: np.concatenate([v, v[:1]]) for k, v in batch.items()}  # B = 4 divides data*fsdp
  with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.flax_rules()):
    got = jax.jit(lm.logits)(sharded, jax.device_put(batch_b4, partitioning.batch_shardings(
        mesh, batch_b4)))
  np.testing.assert_allclose(np.asarray(got)[:B], want, atol=1e-5)


def test_bad_inputs_fail_clearly():
  with pytest.raises(ValueError, match="variant"):
    decoder.default_config("gpt3")
  with pytest.raises(ValueError, match="num_kv_heads"):
    build(tiny_config("llama", num_kv_heads=3))
  with pytest.raises(ValueError, match="dtype"):
    build(tiny_config("llama", dtype="float16"))
  cfg = tiny_config("gpt2")
  cfg.extra = 1
  with pytest.raises(ValueError, match="extra"):
    build(cfg)
  cfg = tiny_config("gpt2")
  cfg.family = "gpt"
  with pytest.raises(ValueError, match="'gpt'.*decoder"):
    build(cfg)
  lm = build(tiny_config("gpt2", max_len=8))
  params = lm.abstract_params()
  with pytest.raises(ValueError, match="max_len=8"):
    jax.eval_shape(lm.logits, params, make_batch())
  with pytest.raises(ValueError, match="max_len=8"):
    jax.eval_shape(lambda p: lm.prefill(p, jnp.zeros((1, 4), jnp.int32),
                                        jnp.ones((1, 4), bool), 5), params)
  lm = build(tiny_config("gpt2"))
  with pytest.raises(ValueError, match="response_visibility"):
    jax.eval_shape(lm.logits, lm.abstract_params(),
                   dict(make_batch(), response_visibility=np.ones((B, T, T - 1), bool)))
