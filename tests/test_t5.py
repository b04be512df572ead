"""Tests for the T5 model: shapes, masking, visibility, KV cache, partitioning, bfloat16."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxsi import partitioning
from jaxsi.models import t5

VOCAB = 64


def tiny_config(variant="v1_1", **overrides):
  config = t5.default_config(variant)
  # 8 buckets up to distance 16 put distances 4..15 in the logarithmic bins with short sequences.
  config.update(dict(vocab_size=VOCAB, d_model=32, num_layers=2, num_decoder_layers=2,
                     num_heads=4, head_dim=8, d_ff=64, relative_attention_num_buckets=8,
                     relative_attention_max_distance=16, dropout_rate=0.0))
  config.update(overrides)
  return config


@pytest.fixture(scope="module", params=["v1_0", "v1_1"])
def model(request):
  lm = t5.T5LM(tiny_config(request.param))
  params = lm.init(jax.random.key(0))
  return lm, params, jax.jit(lm.logits)


def random_batch(seed, batch=2, prompt_len=7, response_len=6, num_pad=(0, 3)):
  rng = np.random.default_rng(seed)
  prompt = rng.integers(2, VOCAB, (batch, prompt_len)).astype(np.int32)
  prompt_mask = np.ones((batch, prompt_len), np.int32)
  for b, pad in enumerate(num_pad[:batch]):
    prompt[b, :pad] = 0
    prompt_mask[b, :pad] = 0
  response = rng.integers(2, VOCAB, (batch, response_len)).astype(np.int32)
  return dict(prompt=jnp.asarray(prompt), prompt_mask=jnp.asarray(prompt_mask),
              response=jnp.asarray(response),
              response_mask=jnp.ones((batch, response_len), jnp.int32))


def test_default_config_and_presets():
  v10, v11 = t5.default_config("v1_0"), t5.default_config("v1_1")
  assert v10.family == "t5" and v10.tie_embeddings and not v11.tie_embeddings
  assert set(v10.keys()) == set(v11.keys()) >= {"num_real_tokens", "decoder_start_token_id"}
  assert v11.num_real_tokens is None
  xl = t5.preset("t5_xl")
  assert (xl.d_model, xl.d_ff, xl.num_layers, xl.num_heads, xl.variant) == (2048, 5120, 24, 32,
                                                                            "v1_1")
  assert t5.preset("t5_base").d_model == 768 and t5.preset("t5_large").d_ff == 2816
  with pytest.raises(ValueError, match="t5_huge"):
    t5.preset("t5_huge")
  with pytest.raises(ValueError, match="v2"):
    t5.default_config("v2")
  with pytest.raises(ValueError, match="float16"):
    t5.T5LM(tiny_config(dtype="float16"))


def test_relative_position_buckets_properties():
  rel = jnp.arange(-40, 41)
  causal = np.asarray(t5.relative_position_buckets(rel, bidirectional=False, num_buckets=8,
                                                   max_distance=16))
  # Keys after the query share bucket 0; distances 0..3 are exact; 16 and beyond share bucket 7.
  np.testing.assert_array_equal(causal[rel >= 0], 0)
  np.testing.assert_array_equal(causal[40 - np.arange(4)], np.arange(4))
  np.testing.assert_array_equal(causal[rel <= -16], 7)
  assert np.all(np.diff(causal[:41][::-1]) >= 0)  # monotone in the distance
  both = np.asarray(t5.relative_position_buckets(rel, bidirectional=True, num_buckets=8,
                                                 max_distance=16))
  np.testing.assert_array_equal(both[rel > 0], both[::-1][rel > 0] + 4)
  assert both.min() == 0 and both.max() == 7


def test_shapes_and_dtypes(model):
  lm, params, logits_fn = model
  batch = random_batch(0)
  logits = logits_fn(params, batch)
  chex.assert_shape(logits, (2, 6, VOCAB))
  assert logits.dtype == jnp.float32
  chex.assert_tree_all_finite(logits)
  chex.assert_trees_all_equal_shapes_and_dtypes(params, lm.abstract_params())
  has_head = "logits_dense" in params
  assert has_head == (lm.config.variant == "v1_1")
  mlp = params["encoder"]["layers_0"]["mlp"]
  assert set(mlp) == ({"wi_0", "wi_1", "wo"} if lm.config.variant == "v1_1" else {"wi", "wo"})


def test_every_param_has_logical_names_from_the_rules(model):
  lm, params, _ = model
  axes = lm.param_axes()
  known = {name for name, _ in partitioning.LOGICAL_RULES}
  flat_axes, axes_tree = jax.tree.flatten(axes, is_leaf=lambda x: isinstance(x, P))
  assert axes_tree == jax.tree.structure(params)
  for spec, leaf in zip(flat_axes, jax.tree.leaves(params)):
    assert isinstance(spec, P) and len(spec) == leaf.ndim
    assert all(name in known for name in spec), spec
  assert axes["decoder"]["relpos_bias"]["rel_embedding"] == P("relpos_buckets", "heads")
  assert axes["token_embedder"]["embedding"] == P("vocab", "embed")


def test_causal_decoder(model):
  _, params, logits_fn = model
  batch = random_batch(1)
  base = np.asarray(logits_fn(params, batch))
  for k in (0, 2, 4):
    changed = dict(batch, response=batch["response"].at[:, k].set((batch["response"][:, k] + 5)
                                                                   % VOCAB))
    out = np.asarray(logits_fn(params, changed))
    np.testing.assert_array_equal(out[:, :k + 1], base[:, :k + 1])
    assert np.abs(out[:, k + 1:] - base[:, k + 1:]).max() > 1e-3


def test_prompt_padding_is_invisible(model):
  _, params, logits_fn = model
  batch = random_batch(2, num_pad=(0, 3))
  base = np.asarray(logits_fn(params, batch))
  # Other token ids under the padding change nothing.
  noisy = batch["prompt"].at[1, :3].set(jnp.array([5, 9, 11]))
  np.testing.assert_allclose(logits_fn(params, dict(batch, prompt=noisy)), base, atol=1e-6)
  # Row 1 equals the same prompt without its padding.
  unpadded = dict(batch, prompt=batch["prompt"][1:, 3:], prompt_mask=batch["prompt_mask"][1:, 3:],
                  response=batch["response"][1:])
  np.testing.assert_allclose(logits_fn(params, unpadded)[0], base[1], atol=1e-5)
  # And the prompt matters at all.
  other = batch["prompt"].at[1, 4].set((batch["prompt"][1, 4] + 1) % VOCAB)
  assert np.abs(logits_fn(params, dict(batch, prompt=other))[1] - base[1]).max() > 1e-3


def copy_slot_batch(seed):
  """Response [a, b, b', c, d] where b' sits at b's position and hides b from later slots."""
  batch = random_batch(seed, batch=2, response_len=5)
  positions = jnp.broadcast_to(jnp.array([0, 1, 1, 2, 3], jnp.int32), (2, 5))
  rows = [[0], [0, 1], [0, 2], [0, 2, 3], [0, 2, 3, 4]]
  visibility = np.zeros((5, 5), bool)
  for i, row in enumerate(rows):
    visibility[i, row] = True
  visibility = jnp.broadcast_to(jnp.asarray(visibility), (2, 5, 5))
  return dict(batch, response_positions=positions, response_visibility=visibility)


def test_visibility_and_positions_match_the_materialized_response(model):
  _, params, logits_fn = model
  batch = copy_slot_batch(3)
  logits = np.asarray(logits_fn(params, batch))
  response = batch["response"]
  materialized = dict(batch, response=response[:, jnp.array([0, 2, 3, 4])])
  del materialized["response_positions"], materialized["response_visibility"]
  plain = np.asarray(logits_fn(params, materialized))
  # Slots 0, 1, 3, 4 see [], [a], [a, b'], [a, b', c]: the materialized prefixes.
  np.testing.assert_allclose(logits[:, [0, 1, 3, 4]], plain, atol=1e-5)
  # Slot 2 sees [a, b]: the plain prefix of the original response.
  before_copy = np.asarray(logits_fn(params, dict(random_batch(3, response_len=5))))
  np.testing.assert_allclose(logits[:, 2], before_copy[:, 2], atol=1e-5)
  assert np.abs(logits[:, 3] - before_copy[:, 3]).max() > 1e-3


def run_cache(lm, params, batch, num_slots, positions, visibility):
  """Prefill, then decode_step over every response slot; returns logits [B, T, V]."""
  prefill = jax.jit(lm.prefill, static_argnums=3)
  step = jax.jit(lm.decode_step)
  logits, cache = prefill(params, batch["prompt"], batch["prompt_mask"], num_slots)
  out = [logits]
  for t in range(batch["response"].shape[1] - 1):
    logits, cache = step(params, cache, batch["response"][:, t], jnp.int32(t), positions[:, t],
                         visibility[:, t])
    out.append(logits)
  return np.stack(out, axis=1)


def test_prefill_and_decode_step_reproduce_logits(model):
  lm, params, logits_fn = model
  batch = random_batch(4, response_len=6)
  expected = np.asarray(logits_fn(params, batch))
  # The cache has two spare slots: unused slots must not matter.
  num_slots = 8
  positions = jnp.broadcast_to(jnp.arange(6, dtype=jnp.int32), (2, 6))
  visible = jnp.broadcast_to(jnp.arange(num_slots)[None, :] <= jnp.arange(6)[:, None],
                             (2, 6, num_slots))
  np.testing.assert_allclose(run_cache(lm, params, batch, num_slots, positions, visible), expected,
                             atol=1e-5)


def test_decode_step_with_copy_slot_visibility(model):
  lm, params, logits_fn = model
  batch = copy_slot_batch(5)
  expected = np.asarray(logits_fn(params, batch))
  visible = batch["response_visibility"]
  got = run_cache(lm, params, batch, 5, batch["response_positions"], visible)
  np.testing.assert_allclose(got, expected, atol=1e-5)


def test_dropout_only_with_rng_and_rate():
  config = tiny_config("v1_1", dropout_rate=0.3)
  lm = t5.T5LM(config)
  params = lm.init(jax.random.key(1))
  batch = random_batch(6)
  logits_fn = jax.jit(lm.logits)
  clean = logits_fn(params, batch)
  np.testing.assert_array_equal(logits_fn(params, batch, dropout_rng=None), clean)
  noisy = logits_fn(params, batch, dropout_rng=jax.random.key(2))
  assert np.abs(noisy - clean).max() > 1e-3
  np.testing.assert_array_equal(logits_fn(params, batch, dropout_rng=jax.random.key(2)), noisy)
  no_rate = jax.jit(t5.T5LM(tiny_config("v1_1")).logits)
  np.testing.assert_allclose(no_rate(params, batch, dropout_rng=jax.random.key(2)), clean,
                             atol=1e-6)


def test_bfloat16_runs_close_to_float32():
  lm32 = t5.T5LM(tiny_config("v1_1"))
  lm16 = t5.T5LM(tiny_config("v1_1", dtype="bfloat16"))
  params = lm32.init(jax.random.key(3))
  batch = random_batch(7)
  logits32 = np.asarray(jax.jit(lm32.logits)(params, batch))
  logits16 = jax.jit(lm16.logits)(params, batch)
  assert logits16.dtype == jnp.float32
  chex.assert_tree_all_finite(logits16)
  # bfloat16 keeps ~3 significant digits: the logits agree to a few percent of their scale.
  assert np.abs(np.asarray(logits16) - logits32).max() < 0.05 * np.abs(logits32).max()
  first, cache = jax.jit(lm16.prefill, static_argnums=3)(params, batch["prompt"],
                                                         batch["prompt_mask"], 4)
  assert cache["self_keys"][0].dtype == jnp.bfloat16
  np.testing.assert_allclose(first, logits16[:, 0], atol=0.05 * np.abs(logits32).max())


def test_logits_shard_on_a_mesh(model):
  lm, params, logits_fn = model
  mesh = jax.make_mesh((2, 2, 2), partitioning.MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  shardings = partitioning.shardings_for(lm.param_axes(), lm.abstract_params(), mesh)
  sharded = jax.device_put(params, shardings)
  assert sharded["token_embedder"]["embedding"].sharding.spec == P("tensor", "fsdp")
  batch = random_batch(8, batch=4, num_pad=(0, 3, 1, 0))
  batch = jax.device_put(batch, partitioning.batch_shardings(mesh, batch))
  np.testing.assert_allclose(logits_fn(sharded, batch), logits_fn(params, batch), atol=1e-5)


def test_bad_batch_shapes_fail_clearly(model):
  lm, params, _ = model
  batch = random_batch(9)
  with pytest.raises(ValueError, match="response_visibility"):
    lm.logits(params, dict(batch, response_visibility=jnp.ones((2, 6, 5), bool)))
  with pytest.raises(ValueError, match="prompt_mask"):
    lm.logits(params, dict(batch, prompt_mask=batch["prompt_mask"][:, 1:]))
  _, cache = jax.eval_shape(lambda p, x, m: lm.prefill(p, x, m, 4), params, batch["prompt"],
                            batch["prompt_mask"])
  with pytest.raises(ValueError, match="visible"):
    lm.decode_step(params, cache, batch["response"][:, 0], 0, jnp.zeros((2,), jnp.int32),
                   jnp.ones((2, 5), bool))
