"""GKD objective: loss vs NumPy, masking, frozen teacher, the λ coin, presets, REINFORCE, and a
sharded train step (decoder pair and T5 pair) that never retraces across response sources."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxsi import objectives
from jaxsi import mesh as mesh_lib
from jaxsi import partitioning
from jaxsi import state as state_lib
from jaxsi import step as step_lib
from jaxsi.models import decoder, t5
from jaxsi.objectives import gkd

V, B, S, T = 48, 4, 5, 6
EOS = 1
LENGTHS = np.array([6, 1, 4, 0])  # full, one token, partial, empty


# ----------------------------------------------------------------------------- helpers


def _decoder_lm(variant, d_model, num_layers, vocab=V):
  cfg = decoder.default_config(variant)
  cfg.update(vocab_size=vocab, d_model=d_model, num_layers=num_layers, num_heads=2,
             num_kv_heads=2 if variant == "gpt2" else 1, head_dim=8, d_ff=2 * d_model,
             max_len=32)
  return decoder.DecoderLM(cfg)


def _random_params(lm, seed):
  """Init params with every leaf perturbed, so distributions are far from uniform."""
  params = lm.init(jax.random.key(seed))
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  leaves = [x + 0.3 * rng.normal(size=x.shape).astype(np.float32) for x in leaves]
  return jax.tree.unflatten(treedef, leaves)


def _batch(seed, b=B, lengths=LENGTHS, vocab=V):
  rng = np.random.default_rng(seed)
  prompt = rng.integers(2, vocab, (b, S)).astype(np.int32)
  prompt_lengths = rng.integers(1, S + 1, b)
  prompt_mask = (np.arange(S)[None, :] >= (S - prompt_lengths)[:, None]).astype(np.int32)
  response = rng.integers(2, vocab, (b, T)).astype(np.int32)
  response_mask = (np.arange(T)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
  for row, length in enumerate(lengths):
    if length and row % 2 == 0:  # rows 0, 2: the last real token is EOS
      response[row, length - 1] = EOS
  response = np.where(response_mask > 0, response, 0).astype(np.int32)
  return dict(prompt=prompt, prompt_mask=prompt_mask, response=response,
              response_mask=response_mask)


@pytest.fixture(scope="module")
def pair():
  student = _decoder_lm("gpt2", 32, 1)
  teacher = _decoder_lm("llama", 32, 2)
  return student, _random_params(student, 0), teacher, _random_params(teacher, 1)


def _cfg(**overrides):
  cfg = gkd.default_objective_config()
  cfg.update(overrides)
  return cfg


def _np_log_softmax(x, temperature=1.0):
  x = np.asarray(x, np.float64) / temperature
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def np_divergence(name, t_logits, s_logits, beta, temperature):
  """One position's divergence in float64, from the definitions."""
  log_t = _np_log_softmax(t_logits, temperature)
  log_s = _np_log_softmax(s_logits, temperature)
  t, s = np.exp(log_t), np.exp(log_s)
  if name == "forward_kl":
    return np.sum(t * (log_t - log_s))
  if name == "reverse_kl":
    return np.sum(s * (log_s - log_t))
  if name == "tvd":
    return 0.5 * np.abs(t - s).sum()
  m = beta * t + (1 - beta) * s
  return beta * np.sum(t * (log_t - np.log(m))) + (1 - beta) * np.sum(s * (log_s - np.log(m)))


def np_gkd_loss(name, t_logits, s_logits, response, mask, *, beta=0.5, temperature=1.0,
                normalization="sequence"):
  """Explicit loops: per-token values, then per-sequence means or one token mean."""
  per_sequence, all_values = [], []
  for b in range(mask.shape[0]):
    values = []
    for t in range(mask.shape[1]):
      if not mask[b, t]:
        continue
      if name == "nll":
        values.append(-_np_log_softmax(s_logits[b, t], temperature)[response[b, t]])
      else:
        values.append(np_divergence(name, t_logits[b, t], s_logits[b, t], beta, temperature))
    if values:
      per_sequence.append(np.mean(values))
    all_values.extend(values)
  return np.mean(per_sequence) if normalization == "sequence" else np.mean(all_values)


# ----------------------------------------------------------------------------- loss values


CASES = [("forward_kl", 0.5, 1.0), ("reverse_kl", 0.5, 1.0), ("jsd", 0.1, 1.0),
         ("jsd", 0.9, 2.0), ("tvd", 0.5, 1.0), ("nll", 0.5, 0.5)]


@pytest.mark.parametrize("normalization", ["sequence", "token"])
@pytest.mark.parametrize("name,beta,tau", CASES)
def test_loss_matches_numpy(pair, name, beta, tau, normalization):
  student, s_params, teacher, t_params = pair
  batch = _batch(0)
  cfg = _cfg(divergence=name, beta=beta, loss_temperature=tau, normalization=normalization)
  loss_fn = gkd.make_loss_fn(student, cfg, teacher_lm=teacher, eos_id=EOS)
  loss, metrics = loss_fn(s_params, {"teacher": t_params}, batch, jax.random.key(0), 0)
  s_logits = np.asarray(student.logits(s_params, batch))
  t_logits = np.asarray(teacher.logits(t_params, batch))
  want = np_gkd_loss(name, t_logits, s_logits, batch["response"], batch["response_mask"],
                     beta=beta, temperature=tau, normalization=normalization)
  assert want > 1e-2  # distributions differ: the comparison means something
  np.testing.assert_allclose(loss, want, rtol=2e-5)
  np.testing.assert_allclose(metrics["divergence"], want, rtol=2e-5)
  np.testing.assert_allclose(metrics["loss"], want, rtol=2e-5)


def test_sequence_and_token_normalization_differ(pair):
  student, s_params, teacher, t_params = pair
  batch = _batch(1)
  values = [gkd.make_loss_fn(student, _cfg(normalization=n), teacher_lm=teacher, eos_id=EOS)(
      s_params, {"teacher": t_params}, batch, jax.random.key(0), 0)[0]
            for n in ("sequence", "token")]
  assert abs(float(values[0]) - float(values[1])) > 1e-4


def test_metrics_match_numpy(pair):
  student, s_params, teacher, t_params = pair
  batch = _batch(2)
  loss_fn = gkd.make_loss_fn(student, _cfg(loss_temperature=3.0), teacher_lm=teacher,
                             eos_id=EOS)
  _, metrics = jax.jit(loss_fn)(s_params, {"teacher": t_params}, batch, jax.random.key(0), 0)
  log_s = _np_log_softmax(student.logits(s_params, batch))  # metrics use temperature 1
  log_t = _np_log_softmax(teacher.logits(t_params, batch))
  mask = batch["response_mask"] > 0
  y = batch["response"]
  entropy = -(np.exp(log_s) * log_s).sum(-1)
  teacher_nll = -np.take_along_axis(log_t, y[..., None], -1)[..., 0]
  student_nll = -np.take_along_axis(log_s, y[..., None], -1)[..., 0]
  np.testing.assert_allclose(metrics["student_entropy"], entropy[mask].mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["teacher_nll"], teacher_nll[mask].mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["student_nll"], student_nll[mask].mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["response_length"], LENGTHS.mean())
  np.testing.assert_allclose(metrics["eos_rate"], 0.5)  # rows 0 and 2 end with EOS
  assert float(metrics["num_tokens"]) == LENGTHS.sum()
  assert set(metrics) == {"loss", "divergence", "student_entropy", "teacher_nll", "student_nll",
                          "response_length", "eos_rate", "num_tokens"}


# ----------------------------------------------------------------------------- masking


class _PoisonedLM:
  """Wraps a model and writes NaN/inf into its logits at masked response positions."""

  def __init__(self, inner):
    self.inner, self.vocab_size, self.config = inner, inner.vocab_size, inner.config

  def logits(self, params, batch, *, dropout_rng=None):
    logits = self.inner.logits(params, batch, dropout_rng=dropout_rng)
    valid = batch["response_mask"].astype(bool)[..., None]
    poison = jnp.where(jnp.arange(logits.shape[-1]) % 2 == 0, jnp.nan, jnp.inf)
    return jnp.where(valid, logits, poison)


@pytest.mark.parametrize("name", ["jsd", "nll"])
def test_masked_positions_have_no_effect(pair, name):
  student, s_params, teacher, t_params = pair
  batch = _batch(3)
  other = dict(batch)
  rng = np.random.default_rng(4)
  # Different tokens after the end of each response (in range: they are model inputs).
  other["response"] = np.where(batch["response_mask"] > 0, batch["response"],
                               rng.integers(0, V, batch["response"].shape)).astype(np.int32)
  assert (other["response"] != batch["response"]).any()
  cfg = _cfg(divergence=name)
  frozen = {"teacher": t_params}

  def value_and_grad(loss_fn, batch):
    return jax.value_and_grad(lambda p: loss_fn(p, frozen, batch, jax.random.key(0), 0)[0])(
        s_params)

  plain = gkd.make_loss_fn(student, cfg, teacher_lm=teacher, eos_id=EOS)
  poisoned = gkd.make_loss_fn(student, cfg, teacher_lm=_PoisonedLM(teacher), eos_id=EOS)
  value, grads = value_and_grad(plain, batch)
  _, metrics = plain(s_params, frozen, batch, jax.random.key(0), 0)
  for loss_fn in (plain, poisoned):
    other_value, other_grads = value_and_grad(loss_fn, other)
    np.testing.assert_allclose(other_value, value, rtol=1e-6)
    chex.assert_trees_all_close(other_grads, grads, rtol=1e-5, atol=1e-7)
    _, other_metrics = loss_fn(s_params, frozen, other, jax.random.key(0), 0)
    chex.assert_trees_all_close(other_metrics, metrics, rtol=1e-6)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-3


class _TableLM:
  """Stand-in model: logits are the params (a [B, T, V] table), whatever the batch."""

  def __init__(self, vocab, num_real_tokens=None):
    self.vocab_size = vocab
    self.config = ml_collections.ConfigDict({"num_real_tokens": num_real_tokens})

  def logits(self, params, batch, *, dropout_rng=None):
    del batch, dropout_rng
    return params["table"]


def test_padded_head_rows_take_no_probability():
  # Rows >= num_real_tokens are padding of the head: never sampled, so never compared.
  rng = np.random.default_rng(5)
  real = 40
  s_table = rng.normal(size=(B, T, V)).astype(np.float32) * 2
  t_table = rng.normal(size=(B, T, V)).astype(np.float32) * 2
  batch = _batch(5)
  student, teacher = _TableLM(V, real), _TableLM(V, real)
  loss_fn = gkd.make_loss_fn(student, _cfg(divergence="forward_kl"), teacher_lm=teacher,
                             eos_id=EOS)

  def loss(s, t):
    return loss_fn({"table": s}, {"teacher": {"table": t}}, batch, jax.random.key(0), 0)[0]

  value, grad = jax.value_and_grad(loss)(s_table, t_table)
  s_other, t_other = s_table.copy(), t_table.copy()
  s_other[..., real:] = 50.0
  t_other[..., real:] = -30.0
  other_value, other_grad = jax.value_and_grad(loss)(s_other, t_other)
  np.testing.assert_allclose(other_value, value, rtol=1e-6)
  np.testing.assert_allclose(other_grad, grad, rtol=1e-6, atol=1e-9)
  np.testing.assert_array_equal(np.asarray(grad)[..., real:], 0.0)
  want = np_gkd_loss("forward_kl", t_table[..., :real], s_table[..., :real], batch["response"],
                     batch["response_mask"])
  np.testing.assert_allclose(value, want, rtol=1e-5)


# ----------------------------------------------------------------------------- gradients


def test_teacher_gets_no_gradient_and_student_does(pair):
  student, s_params, teacher, t_params = pair
  batch = _batch(6)
  loss_fn = gkd.make_loss_fn(student, _cfg(divergence="jsd"), teacher_lm=teacher, eos_id=EOS)
  grad_params, grad_frozen = jax.grad(
      lambda p, f: loss_fn(p, f, batch, jax.random.key(0), 0)[0], argnums=(0, 1))(
          s_params, {"teacher": t_params})
  for leaf in jax.tree.leaves(grad_frozen):
    np.testing.assert_array_equal(leaf, 0.0)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grad_params))
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grad_params)) > 1e-3
  # Responses are integer data: there is nothing to differentiate through.
  assert np.issubdtype(batch["response"].dtype, np.integer)


# ----------------------------------------------------------------------------- REINFORCE


def _rl_setup(rewards, alpha, tau=1.5, gamma=0.7, normalization="sequence"):
  rng = np.random.default_rng(7)
  s_table = rng.normal(size=(B, T, V)).astype(np.float32) * 2
  t_table = rng.normal(size=(B, T, V)).astype(np.float32) * 2
  batch = _batch(7)
  batch["reward"] = np.asarray(rewards, np.float32)
  cfg = _cfg(divergence="forward_kl", loss_temperature=tau, sample_temperature=gamma,
             reward="exact_match", rl_alpha=alpha, normalization=normalization)
  loss_fn = gkd.make_loss_fn(_TableLM(V), cfg, teacher_lm=_TableLM(V), eos_id=EOS)

  def loss(s):
    return loss_fn({"table": s}, {"teacher": {"table": t_table}}, batch, jax.random.key(0), 0)

  return s_table, t_table, batch, loss


def test_reinforce_loss_and_gradient_match_numpy():
  alpha, tau, gamma = 0.3, 1.5, 0.7
  rewards = [1.0, 0.0, 0.5, 2.0]
  s_table, t_table, batch, loss = _rl_setup(rewards, alpha, tau, gamma)
  (value, metrics), grad = jax.value_and_grad(loss, has_aux=True)(s_table)

  mask, y = batch["response_mask"].astype(np.float64), batch["response"]
  r = np.asarray(rewards, np.float64)
  advantage = r - r.mean()
  log_s_gamma = _np_log_softmax(s_table, gamma)
  seq_log_prob = (np.take_along_axis(log_s_gamma, y[..., None], -1)[..., 0] * mask).sum(-1)
  divergence = np_gkd_loss("forward_kl", t_table, s_table, y, mask, temperature=tau)
  rl = -(1 - alpha) * np.mean(advantage * seq_log_prob)
  np.testing.assert_allclose(value, alpha * divergence + rl, rtol=1e-5)
  np.testing.assert_allclose(metrics["rl_loss"], rl, rtol=1e-5)
  np.testing.assert_allclose(metrics["reward"], r.mean(), rtol=1e-6)
  np.testing.assert_allclose(metrics["divergence"], divergence, rtol=1e-5)

  # d/ds of KL(T||S) at temperature tau is (S - T) / tau; each token weighs
  # 1 / (num non-empty rows * its row's length) under "sequence" normalization.
  s_tau, t_tau = np.exp(_np_log_softmax(s_table, tau)), np.exp(_np_log_softmax(t_table, tau))
  lengths = mask.sum(-1)
  weight = mask / np.maximum(lengths, 1)[:, None] / (lengths > 0).sum()
  d_divergence = weight[..., None] * (s_tau - t_tau) / tau
  # d/ds of -(1-alpha)/B * A_b * log softmax(s/gamma)[y] is
  # -(1-alpha)/B * A_b * (onehot(y) - S_gamma) / gamma.
  onehot = np.eye(V)[y]
  d_rl = (-(1 - alpha) / B * advantage[:, None, None] * mask[..., None]
          * (onehot - np.exp(log_s_gamma)) / gamma)
  np.testing.assert_allclose(grad, alpha * d_divergence + d_rl, rtol=1e-4, atol=1e-7)
  # Descending the loss raises the log-probability of the best row's response.
  best = int(np.argmax(r))
  assert (np.asarray(grad)[best][mask[best] > 0, y[best][mask[best] > 0]] < 0).all()


def test_equal_rewards_make_the_rl_term_vanish():
  alpha = 0.4
  s_table, _, batch, loss = _rl_setup([0.7] * B, alpha)
  (value, metrics), grad = jax.value_and_grad(loss, has_aux=True)(s_table)
  s_table2, _, _, plain_loss = _rl_setup([0.0] * B, 1.0)  # alpha = 1: distillation only
  (plain_value, _), plain_grad = jax.value_and_grad(plain_loss, has_aux=True)(s_table2)
  assert float(metrics["rl_loss"]) == 0.0
  np.testing.assert_allclose(value, alpha * plain_value, rtol=1e-6)
  np.testing.assert_allclose(grad, alpha * np.asarray(plain_grad), rtol=1e-5, atol=1e-9)


def test_rl_needs_rewards_in_the_batch():
  s_table, _, batch, loss = _rl_setup([0.0] * B, 0.5)
  del batch["reward"]
  with pytest.raises(ValueError, match=r"needs batch\['reward'\]"):
    loss(s_table)


# ----------------------------------------------------------------------------- the coin


def test_coin_frequencies_and_determinism():
  key = jax.random.key(42)
  steps = range(1000)
  never = [gkd.response_source(_cfg(lam=0.0), key, s) for s in steps]
  always = [gkd.response_source(_cfg(lam=1.0), key, s) for s in steps]
  half = [gkd.response_source(_cfg(lam=0.5), key, s) for s in steps]
  assert set(never) == {"dataset"}
  assert set(always) == {"student"}
  assert set(half) == {"dataset", "student"}
  # Binomial(1000, 0.5): mean 500, sd 15.8; 5 sd either side.
  assert 420 <= half.count("student") <= 580
  # Same (rng, step) -> same answer, on every call; exactly the documented derivation.
  assert [gkd.response_source(_cfg(lam=0.5), key, s) for s in steps] == half
  for s in (0, 1, 17, 999):
    u = float(jax.random.uniform(jax.random.fold_in(key, s), (), jnp.float32))
    assert half[s] == ("student" if u <= 0.5 else "dataset")
  # A raw uint32 key works too, and another run key gives another sequence.
  raw = [gkd.response_source(_cfg(lam=0.5), jax.random.PRNGKey(42), s) for s in range(200)]
  other = [gkd.response_source(_cfg(lam=0.5), jax.random.key(43), s) for s in range(200)]
  assert other != half[:200] and 60 <= raw.count("student") <= 140


def test_seqkd_always_samples_the_teacher():
  key = jax.random.key(0)
  assert {gkd.response_source(_cfg(preset="seqkd", lam=1.0), key, s) for s in range(50)} == {
      "teacher"}
  assert {gkd.response_source(_cfg(preset="sft"), key, s) for s in range(50)} == {"dataset"}


# ----------------------------------------------------------------------------- config


def test_presets_follow_the_spec_table():
  table = {"sft": (0.0, "nll"), "supervised_kd": (0.0, "forward_kl"), "seqkd": (0.0, "nll"),
           "imitkd": (0.5, "forward_kl"), "fdistill": (0.5, "tvd"), "on_policy": (1.0, "jsd")}
  for preset, (lam, divergence) in table.items():
    cfg = _cfg(preset=preset, lam=0.25, divergence="jsd")
    cfg.lock()
    resolved = gkd.apply_preset(cfg)
    assert (resolved.lam, resolved.divergence, resolved.preset) == (lam, divergence, preset)
    assert cfg.lam == 0.25 and cfg.divergence == "jsd"  # the input is untouched
    assert gkd.apply_preset(resolved).to_dict() == resolved.to_dict()  # idempotent
  on_policy = gkd.apply_preset(_cfg(preset="on_policy", divergence="reverse_kl"))
  assert on_policy.divergence == "reverse_kl"  # "any" divergence: the user's stays
  custom = gkd.apply_preset(_cfg(lam=0.25))
  assert (custom.lam, custom.divergence) == (0.25, "jsd")


def test_defaults():
  cfg = gkd.default_objective_config()
  assert (cfg.name, cfg.preset, cfg.divergence, cfg.beta, cfg.lam) == ("gkd", "", "jsd", 0.5, 1.0)
  assert (cfg.loss_temperature, cfg.sample_temperature, cfg.top_k, cfg.top_p) == (1.0, 1.0, 0, 1.0)
  assert cfg.normalization == "sequence" and cfg.reward == "" and cfg.max_new_tokens is None
  assert not gkd.uses_rewards(cfg) and gkd.uses_rewards(_cfg(reward="rouge2"))


def test_sampling_settings():
  assert gkd.sampling_settings(_cfg(sample_temperature=0.7, top_k=5, top_p=0.9), 12) == {
      "max_new_tokens": 12, "temperature": 0.7, "top_k": 5, "top_p": 0.9}
  assert gkd.sampling_settings(_cfg(max_new_tokens=8), 12)["max_new_tokens"] == 8
  with pytest.raises(ValueError, match="max_new_tokens=16 exceeds the batch's response width 12"):
    gkd.sampling_settings(_cfg(max_new_tokens=16), 12)


@pytest.mark.parametrize("overrides,message", [
    (dict(divergence="jsd", beta=0.0), "use forward_kl"),
    (dict(divergence="jsd", beta=1.0), "use reverse_kl"),
    (dict(divergence="kl"), "Unknown GKD divergence 'kl'; expected one of forward_kl"),
    (dict(preset="gkd"), "Unknown GKD preset 'gkd'"),
    (dict(lam=1.5), r"lam=1.5 is out of range; expected a number in \[0.0, 1.0\]"),
    (dict(loss_temperature=0.0), "loss_temperature=0.0 is out of range"),
    (dict(top_p=0.0), "top_p=0.0 is out of range"),
    (dict(top_k=-1), "top_k=-1 must be an integer >= 0"),
    (dict(normalization="batch"), "Unknown normalization 'batch'"),
    (dict(reward="bleu"), "Unknown reward 'bleu'; expected one of exact_match, rouge2, rougeL"),
    (dict(reward="exact_match", rl_alpha=2.0), "rl_alpha=2.0 is out of range"),
    (dict(reward="exact_match", lam=0.0), "needs student samples"),
    (dict(reward="exact_match", sample_temperature=0.0), "sample_temperature > 0"),
])
def test_bad_configs_fail_clearly(overrides, message):
  with pytest.raises(ValueError, match=message):
    gkd.validate(_cfg(**overrides))


def test_unknown_key_and_bad_models_fail_clearly(pair):
  student, _, teacher, _ = pair
  cfg = _cfg()
  cfg.lamda = 0.5
  with pytest.raises(ValueError, match=r"unknown keys \['lamda'\]"):
    gkd.validate(cfg)
  wide = _decoder_lm("gpt2", 32, 1, vocab=64)
  with pytest.raises(ValueError, match="teacher's vocabulary width 64 differs from the "
                                       "student's 48"):
    gkd.make_loss_fn(student, _cfg(), teacher_lm=wide, eos_id=EOS)
  with pytest.raises(ValueError, match="end-of-sequence id"):
    gkd.make_loss_fn(student, _cfg(), teacher_lm=teacher)
  assert gkd.make_loss_fn(student, _cfg(eos_id=EOS), teacher_lm=teacher) is not None


def test_registry_builds_gkd(pair):
  student, s_params, teacher, t_params = pair
  assert "gkd" in objectives.names()
  loss_fn = objectives.make_loss_fn(_cfg(divergence="tvd"), student, teacher_lm=teacher,
                                    eos_id=EOS)
  batch = _batch(8)
  loss, _ = loss_fn(s_params, {"teacher": t_params}, batch, jax.random.key(0), 0)
  want = np_gkd_loss("tvd", np.asarray(teacher.logits(t_params, batch)),
                     np.asarray(student.logits(s_params, batch)), batch["response"],
                     batch["response_mask"])
  np.testing.assert_allclose(loss, want, rtol=2e-5)


# ----------------------------------------------------------------------------- sharded step


def _t5_lm(d_model, num_layers, dropout):
  cfg = t5.preset("t5_tiny")
  cfg.update(vocab_size=V, d_model=d_model, num_layers=num_layers,
             num_decoder_layers=num_layers, num_heads=2, head_dim=8, d_ff=2 * d_model,
             dropout_rate=dropout)
  return t5.T5LM(cfg)


def _sampled(batch, seed):
  """What the trainer puts in the batch after sampling: new tokens, mask through first EOS."""
  rng = np.random.default_rng(seed)
  b = batch["response"].shape[0]
  tokens = rng.integers(2, V, (b, T)).astype(np.int32)
  lengths = rng.integers(1, T + 1, b)
  mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int32)
  tokens[np.arange(b), lengths - 1] = np.where(lengths < T, EOS, tokens[np.arange(b), -1])
  return dict(batch, response=np.where(mask > 0, tokens, 0).astype(np.int32),
              response_mask=mask)


@pytest.mark.parametrize("family", ["decoder", "t5"])
def test_sharded_train_step_serves_every_source_without_retracing(family):
  if family == "decoder":
    student, teacher = _decoder_lm("llama", 32, 1), _decoder_lm("gpt2", 48, 1)
    cfg = _cfg(divergence="jsd", beta=0.9, reward="exact_match", rl_alpha=0.5)
  else:
    student, teacher = _t5_lm(32, 1, 0.1), _t5_lm(48, 1, 0.0)
    cfg = _cfg(divergence="reverse_kl", normalization="token")
  mesh = mesh_lib.build_mesh(ml_collections.ConfigDict({"data": 2, "fsdp": 2, "tensor": 2}))
  tx = optax.sgd(1e-2)
  loss_fn = gkd.make_loss_fn(student, cfg, teacher_lm=teacher, eos_id=EOS)

  abstract_state = jax.eval_shape(lambda r: state_lib.create(student.init(r), tx),
                                  jax.random.key(0))
  state_shardings = state_lib.shardings(abstract_state, student.param_axes(), mesh)
  teacher_shardings = {"teacher": partitioning.shardings_for(
      teacher.param_axes(), teacher.abstract_params(), mesh)}
  s_params, t_params = _random_params(student, 10), _random_params(teacher, 11)
  state = jax.device_put(state_lib.create(s_params, tx), state_shardings)
  frozen = jax.device_put({"teacher": t_params}, teacher_shardings)

  b = 8
  dataset_batch = _batch(9, b=b, lengths=[6, 1, 4, 0, 2, 6, 3, 5])
  if gkd.uses_rewards(cfg):
    dataset_batch["reward"] = np.zeros(b, np.float32)  # not student samples: RL term off
  student_batch = _sampled(dataset_batch, 12)
  teacher_batch = _sampled(dataset_batch, 13)
  if gkd.uses_rewards(cfg):
    student_batch["reward"] = np.linspace(0.0, 1.0, b).astype(np.float32)
  batch_shardings = partitioning.batch_shardings(mesh, dataset_batch)
  replicated = partitioning.replicated(mesh)

  @chex.assert_max_traces(n=1)
  def traced_step(state, frozen, batch, rng):
    return step_lib.make_train_step(loss_fn, tx)(state, frozen, batch, rng)

  train_step = jax.jit(traced_step,
                       in_shardings=(state_shardings, teacher_shardings, batch_shardings,
                                     replicated),
                       out_shardings=(state_shardings, replicated), donate_argnums=(0,))
  run_rng = jax.random.key(3)
  # The unsharded loss of the first step, for comparison.
  want, _ = jax.jit(loss_fn)(s_params, {"teacher": t_params}, dataset_batch,
                             jax.random.fold_in(run_rng, 0), jnp.int32(0))
  chex.clear_trace_counter()
  losses = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.flax_rules()):
    for batch in (dataset_batch, student_batch, teacher_batch):
      state, metrics = train_step(state, frozen, jax.device_put(batch, batch_shardings), run_rng)
      losses.append(float(metrics["loss"]))
      assert all(np.isfinite(float(v)) for v in metrics.values())
  assert int(state.step) == 3
  np.testing.assert_allclose(losses[0], want, rtol=1e-4)
  assert state.params  # still a live (non-donated) pytree
  leaf = jax.tree.leaves(state.params)[0]
  assert leaf.sharding.mesh.shape == mesh.shape
