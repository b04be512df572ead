"""Chunked losses over the vocabulary (`objective.vocab_chunk_size`): the same losses, gradients
and metrics as the full-logits path for SFT and GKD (decoders and T5), less compiled memory,
and a GKD teacher that keeps neither activations nor, chunked, logits for the backward pass."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxsi import mesh as mesh_lib
from jaxsi import partitioning
from jaxsi import peak
from jaxsi.models import decoder, t5
from jaxsi.objectives import chunked, gkd, sft

V, B, S, T = 64, 4, 5, 7
EOS = 1
LENGTHS = np.array([7, 1, 4, 0])  # full, one token, partial, empty
CHUNK = 3  # does not divide T: the last chunk is padded


# ----------------------------------------------------------------------------- helpers


def _decoder(variant, d_model=32, num_layers=1, vocab=V, dropout=0.0, max_len=32):
  cfg = decoder.default_config(variant)
  cfg.update(vocab_size=vocab, d_model=d_model, num_layers=num_layers, num_heads=2,
             num_kv_heads=2 if variant == "gpt2" else 1, head_dim=d_model // 2,
             d_ff=2 * d_model, max_len=max_len, dropout_rate=dropout)
  return decoder.DecoderLM(cfg)


def _t5(variant, d_model=32, dropout=0.0, num_real_tokens=None):
  cfg = t5.preset("t5_tiny")
  cfg.update(variant=variant, tie_embeddings=variant == "v1_0", vocab_size=V, d_model=d_model,
             num_layers=1, num_decoder_layers=1, num_heads=2, head_dim=8, d_ff=2 * d_model,
             dropout_rate=dropout, num_real_tokens=num_real_tokens)
  return t5.T5LM(cfg)


def _random_params(lm, seed):
  """Init params with every leaf perturbed, so distributions are far from uniform."""
  params = lm.init(jax.random.key(seed))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: x + 0.3 * rng.normal(size=x.shape).astype(np.float32), params)


def _batch(seed, b=B, t=T, lengths=LENGTHS, vocab=V):
  rng = np.random.default_rng(seed)
  prompt = rng.integers(2, vocab, (b, S)).astype(np.int32)
  prompt_mask = (np.arange(S)[None, :] >= rng.integers(0, S, b)[:, None]).astype(np.int32)
  mask = (np.arange(t)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
  response = rng.integers(2, vocab, (b, t)).astype(np.int32)
  response[0, lengths[0] - 1] = EOS
  # Padding keeps its random (in-range: model inputs) ids, which the losses must ignore.
  return dict(prompt=prompt, prompt_mask=prompt_mask, response=response, response_mask=mask)


def _value_grad_metrics(loss_fn, params, frozen, batch, rng, *, jit=False):
  """(loss, grads, metrics). Op by op unless `jit`: on a 2-core CI machine compiling each
  tiny model's step costs far more than running it, and eager ops are compiled once for all
  the tests that share their shapes."""
  def loss(p):
    return loss_fn(p, frozen, batch, rng, jnp.int32(0))
  grad_fn = jax.value_and_grad(loss, has_aux=True)
  (value, metrics), grads = (jax.jit(grad_fn) if jit else grad_fn)(params)
  return value, grads, metrics


def _assert_same(plain, chunky):
  (value, grads, metrics), (c_value, c_grads, c_metrics) = plain, chunky
  np.testing.assert_allclose(c_value, value, rtol=1e-5)
  chex.assert_trees_all_close(c_grads, grads, rtol=1e-5, atol=1e-6)
  assert set(c_metrics) == set(metrics)
  chex.assert_trees_all_close(c_metrics, metrics, rtol=1e-5, atol=1e-6)
  assert float(value) > 1e-2
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-3


def _temp_bytes(fn, *args):
  """XLA's temporary bytes of `jit(fn)` compiled for `args` (never executed)."""
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


# ----------------------------------------------------------------------------- map_token_chunks


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 100])
def test_map_token_chunks_matches_whole_arrays_and_their_gradients(chunk_size):
  rng = np.random.default_rng(0)
  w_ExV = rng.normal(size=(6, 5)).astype(np.float32)
  x_BxTxE = rng.normal(size=(2, 7, 6)).astype(np.float32)
  ids_BxT = rng.integers(0, 5, (2, 7)).astype(np.int32)

  def per_token(w, xs):
    log_p = jax.nn.log_softmax(xs["x"] @ w, axis=-1)
    picked = jnp.take_along_axis(log_p, xs["ids"][..., None], axis=-1)[..., 0]
    return {"picked": picked, "both": jnp.stack([picked, log_p.max(-1)], axis=-1)}

  def total(w, x, fn):
    out = fn(w, {"x": x, "ids": ids_BxT})
    return (out["picked"] * jnp.arange(7.0)).sum() + out["both"].sum()

  def chunk_fn(w, xs):
    return chunked.map_token_chunks(per_token, w, xs, chunk_size)

  want = per_token(w_ExV, {"x": x_BxTxE, "ids": ids_BxT})
  got = jax.jit(chunk_fn)(w_ExV, {"x": x_BxTxE, "ids": ids_BxT})
  assert got["both"].shape == (2, 7, 2)
  chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-6)
  grads = jax.grad(total, argnums=(0, 1))(w_ExV, x_BxTxE, per_token)
  c_grads = jax.jit(jax.grad(total, argnums=(0, 1)), static_argnums=2)(w_ExV, x_BxTxE, chunk_fn)
  chex.assert_trees_all_close(c_grads, grads, rtol=1e-5, atol=1e-6)


def test_map_token_chunks_rejects_bad_inputs():
  x = jnp.zeros((2, 4, 3))
  with pytest.raises(ValueError, match="chunk_size=0 must be a positive integer"):
    chunked.map_token_chunks(lambda p, c: c, None, x, 0)
  with pytest.raises(ValueError, match="one B and T"):
    chunked.map_token_chunks(lambda p, c: c, None, {"a": x, "b": jnp.zeros((2, 5))}, 2)


# ----------------------------------------------------------------------------- SFT


SFT_MODELS = {
    "gpt2": lambda: _decoder("gpt2", dropout=0.1),
    "llama": lambda: _decoder("llama"),
    "t5": lambda: _t5("v1_0", dropout=0.1),
}


@pytest.mark.parametrize("normalization", ["sequence", "token"])
@pytest.mark.parametrize("model", sorted(SFT_MODELS))
def test_sft_chunked_equals_plain(model, normalization):
  lm = SFT_MODELS[model]()
  params = _random_params(lm, 0)
  batch = _batch(1)
  rng = jax.random.key(2)  # dropout on for gpt2 and T5: both paths draw the same masks

  results = []
  for chunk_size in (0, CHUNK):
    cfg = sft.default_objective_config()
    cfg.update(normalization=normalization, vocab_chunk_size=chunk_size)
    results.append(_value_grad_metrics(sft.make_loss_fn(lm, cfg), params, {}, batch, rng))
  _assert_same(*results)
  assert float(results[0][2]["num_tokens"]) == LENGTHS.sum()


def test_chunked_nll_equals_masked_nll_on_the_head():
  lm = _decoder("llama")
  params = _random_params(lm, 3)
  batch = _batch(4)
  hidden_BxTxE = lm.hidden(params, batch)
  want = sft.masked_nll(lm.head(params, hidden_BxTxE), batch["response"], batch["response_mask"])
  for chunk_size in (1, 2, T, 2 * T):
    got = sft.chunked_nll(lm, params, hidden_BxTxE, batch["response"], batch["response_mask"],
                          chunk_size=chunk_size)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- GKD


@pytest.fixture(scope="module", params=["decoder", "t5"])
def gkd_pair(request):
  """(student, its params, teacher, its params) of one family."""
  if request.param == "decoder":
    student, teacher = _decoder("gpt2", dropout=0.1), _decoder("llama", d_model=48,
                                                               num_layers=2)
  else:  # padded head rows (num_real_tokens) on the teacher: they take no probability
    student, teacher = _t5("v1_1", dropout=0.1), _t5("v1_0", d_model=48, num_real_tokens=60)
  return student, _random_params(student, 0), teacher, _random_params(teacher, 1)


GKD_CASES = {
    "forward_kl": dict(divergence="forward_kl"),
    "reverse_kl": dict(divergence="reverse_kl", normalization="token"),
    "jsd": dict(divergence="jsd", beta=0.5, loss_temperature=2.0),
    "tvd": dict(divergence="tvd"),
    "nll_rl": dict(divergence="nll", reward="exact_match", rl_alpha=0.3,
                   sample_temperature=0.7),
}


@pytest.mark.parametrize("case", sorted(GKD_CASES))
def test_gkd_chunked_equals_plain(gkd_pair, case):
  student, s_params, teacher, t_params = gkd_pair
  batch = _batch(5)
  if GKD_CASES[case].get("reward"):
    batch["reward"] = np.array([1.0, 0.0, 0.5, 0.25], np.float32)
  frozen = {"teacher": t_params}
  results = []
  for chunk_size in (0, CHUNK):
    cfg = gkd.default_objective_config()
    cfg.update(GKD_CASES[case], vocab_chunk_size=chunk_size)
    loss_fn = gkd.make_loss_fn(student, cfg, teacher_lm=teacher, eos_id=EOS)
    results.append(_value_grad_metrics(loss_fn, s_params, frozen, batch, jax.random.key(6)))
  _assert_same(*results)
  metrics = results[1][2]
  assert float(metrics["teacher_nll"]) > 0 and float(metrics["student_entropy"]) > 0
  if GKD_CASES[case].get("reward"):
    assert abs(float(metrics["rl_loss"])) > 1e-4


def test_gkd_chunked_sharded_loss_equals_unsharded_plain():
  # Under the trainer's mesh and logical axis rules the chunked loss shards like the plain one.
  student, teacher = _decoder("llama"), _decoder("gpt2", d_model=48)
  s_params, t_params = _random_params(student, 7), _random_params(teacher, 8)
  batch = _batch(9, b=8, lengths=[7, 1, 4, 0, 2, 7, 3, 5])
  cfgs = [gkd.default_objective_config() for _ in range(2)]
  cfgs[1].vocab_chunk_size = CHUNK
  plain, chunky = (gkd.make_loss_fn(student, c, teacher_lm=teacher, eos_id=EOS) for c in cfgs)
  want = _value_grad_metrics(plain, s_params, {"teacher": t_params}, batch, jax.random.key(0),
                             jit=True)

  mesh = mesh_lib.build_mesh(ml_collections.ConfigDict({"data": 2, "fsdp": 2, "tensor": 2}))
  s_shardings = partitioning.shardings_for(student.param_axes(), student.abstract_params(), mesh)
  t_shardings = partitioning.shardings_for(teacher.param_axes(), teacher.abstract_params(), mesh)
  batch_shardings = partitioning.batch_shardings(mesh, batch)
  with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.flax_rules()):
    got = _value_grad_metrics(chunky, jax.device_put(s_params, s_shardings),
                              {"teacher": jax.device_put(t_params, t_shardings)},
                              jax.device_put(batch, batch_shardings), jax.random.key(0),
                              jit=True)
  _assert_same(want, got)


# ----------------------------------------------------------------------------- validation


def test_bad_chunk_size_is_one_sentence():
  cfg = sft.default_objective_config()
  cfg.vocab_chunk_size = -1
  with pytest.raises(ValueError, match=r"^SFT vocab_chunk_size=-1 must be an integer >= 0 "
                                       r"\(0 = full logits, .*\)\.$"):
    sft.make_loss_fn(_decoder("gpt2"), cfg)
  cfg = gkd.default_objective_config()
  cfg.vocab_chunk_size = -8
  with pytest.raises(ValueError, match=r"^GKD vocab_chunk_size=-8 must be an integer >= 0 "):
    gkd.validate(cfg)
  # Configs are type-safe (`--config.objective.vocab_chunk_size=2.5` fails there); a hand-built
  # dict can still carry anything.
  for value in (2.5, True, "8", None):
    with pytest.raises(ValueError, match=r"^SFT vocab_chunk_size=.* must be an integer >= 0 "):
      sft.make_loss_fn(_decoder("gpt2"), ml_collections.ConfigDict(
          {"name": "sft", "normalization": "token", "vocab_chunk_size": value}))


def test_chunking_needs_models_with_a_head():
  class LogitsOnly:  # a model that exposes its logits but not hidden/head
    vocab_size = V
    config = ml_collections.ConfigDict({"num_real_tokens": None})

    def logits(self, params, batch, *, dropout_rng=None):
      return params["table"]

  cfg = sft.default_objective_config()
  sft.make_loss_fn(LogitsOnly(), cfg)  # fine without chunking
  cfg.vocab_chunk_size = 4
  with pytest.raises(ValueError, match="needs models that expose hidden"):
    sft.make_loss_fn(LogitsOnly(), cfg)
  cfg = gkd.default_objective_config()
  cfg.vocab_chunk_size = 4
  with pytest.raises(ValueError, match="LogitsOnly has no hidden"):
    gkd.make_loss_fn(_decoder("gpt2"), cfg, teacher_lm=LogitsOnly(), eos_id=EOS)


def test_configs_without_the_key_do_not_chunk():
  # Sharpening builds its SFT loss from a ConfigDict of its own, without the key.
  lm = _decoder("gpt2")
  loss_fn = sft.make_loss_fn(lm, ml_collections.ConfigDict(
      {"name": "sft", "normalization": "sequence"}))
  loss, _ = loss_fn(_random_params(lm, 0), {}, _batch(0), None, 0)
  assert np.isfinite(float(loss))


# ----------------------------------------------------------------------------- memory


def test_chunked_sft_lowers_compiled_memory():
  # Measured on CPU (jax 0.10.2): plain 664.6 MiB, chunked (16 positions) 88.9 MiB, ratio 0.13;
  # the [B, T, V] float32 logits are 128 MiB, and the plain step's temporaries hold five such.
  vocab, b, t = 32768, 8, 128
  lm = _decoder("gpt2", d_model=64, vocab=vocab, max_len=256)
  params = lm.abstract_params()
  rng = np.random.default_rng(0)
  batch = dict(prompt=rng.integers(0, vocab, (b, 8)).astype(np.int32),
               prompt_mask=np.ones((b, 8), np.int32),
               response=rng.integers(0, vocab, (b, t)).astype(np.int32),
               response_mask=np.ones((b, t), np.int32))
  memory = {}
  for chunk_size in (0, 16):
    cfg = sft.default_objective_config()
    cfg.vocab_chunk_size = chunk_size
    loss_fn = sft.make_loss_fn(lm, cfg)
    grad_fn = jax.value_and_grad(lambda p, x, f=loss_fn: f(p, {}, x, None, 0), has_aux=True)
    compiled = jax.jit(grad_fn).lower(params, batch).compile()
    memory[chunk_size] = peak.compiled_memory_bytes(compiled)
  logits_bytes = b * t * vocab * 4
  assert memory[0] > 2 * logits_bytes
  assert memory[16] < logits_bytes
  assert memory[16] / memory[0] < 0.5


def test_gkd_teacher_keeps_no_activations_and_chunking_drops_the_logits():
  # Temporary bytes of the jitted GKD value_and_grad with a 1- and a 6-layer teacher, measured
  # on CPU (jax 0.10.2), in MiB: the teacher's own gradient, which stores its activations,
  # 9.4 -> 45.7; GKD plain 101.3 -> 85.3 (one [B, T, V] float32 tensor is 16 MiB);
  # GKD chunked (4 positions) 7.7 -> 8.8.
  vocab, b, t = 4096, 8, 128
  student = _decoder("gpt2", vocab=vocab, max_len=256)
  rng = np.random.default_rng(0)
  batch = dict(prompt=rng.integers(0, vocab, (b, 8)).astype(np.int32),
               prompt_mask=np.ones((b, 8), np.int32),
               response=rng.integers(0, vocab, (b, t)).astype(np.int32),
               response_mask=np.ones((b, t), np.int32))
  stored, plain, chunky = {}, {}, {}
  for layers in (1, 6):
    teacher = _decoder("llama", d_model=64, num_layers=layers, vocab=vocab, max_len=256)
    t_params = teacher.abstract_params()
    # What the teacher would keep if it were differentiated: its activations, layer by layer.
    stored[layers] = _temp_bytes(jax.grad(lambda p: jnp.sum(teacher.hidden(p, batch))),
                                 t_params)
    for chunk_size, out in ((0, plain), (4, chunky)):
      cfg = gkd.default_objective_config()
      cfg.update(divergence="forward_kl", vocab_chunk_size=chunk_size)
      loss_fn = gkd.make_loss_fn(student, cfg, teacher_lm=teacher, eos_id=EOS)
      grad_fn = jax.value_and_grad(
          lambda p, tp, f=loss_fn: f(p, {"teacher": tp}, batch, None, 0), has_aux=True)
      out[layers] = _temp_bytes(grad_fn, student.abstract_params(), t_params)
  five_layers_of_activations = stored[6] - stored[1]
  assert five_layers_of_activations > 10 * 2**20
  assert plain[6] - plain[1] < 0.1 * five_layers_of_activations
  assert chunky[6] - chunky[1] < 0.1 * five_layers_of_activations
  logits_bytes = b * t * vocab * 4
  assert min(plain.values()) > 2 * logits_bytes  # student and teacher logits
  assert max(chunky.values()) < logits_bytes  # not even one [B, T, V] tensor
