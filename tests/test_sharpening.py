"""Sharpening: self-reward vs PyTorch, best-of-N (shared prefill, reuse vs rescore, ties),
the RLHF/XPO losses on a categorical problem with a closed-form optimum, adaptive N, the
per-step preparer and config validation."""

import functools

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch
import transformers

from jaxsi import mesh as mesh_lib
from jaxsi import partitioning
from jaxsi import sampling
from jaxsi.models import decoder, from_pretrained
from jaxsi.models.lm import LanguageModel

from delegating_lm import DelegatingLM  # tests/delegating_lm.py
from jaxsi.objectives import sharpening

V, EOS = 40, 3
B, S, T = 4, 5, 6
PROMPT_LENGTHS = np.array([5, 3, 1, 2])
# Hand-checked: which response slots the reward counts (built with `_reward_batch`).
#   row 0: EOS at slot 2, mask runs past it to the end  -> slots 0..2 (EOS included)
#   row 1: no EOS, mask of length 4, EOS id in padding   -> slots 0..3
#   row 2: EOS at slot 4 = the last masked slot          -> slots 0..4
#   row 3: empty mask                                    -> nothing
EXPECTED_VALID = np.array([[1, 1, 1, 0, 0, 0],
                           [1, 1, 1, 1, 0, 0],
                           [1, 1, 1, 1, 1, 0],
                           [0, 0, 0, 0, 0, 0]], np.float64)


def _reward_batch(seed=0, pad_prompt_id=0):
  rng = np.random.default_rng(seed)
  prompt_mask = (np.arange(S)[None, :] >= (S - PROMPT_LENGTHS)[:, None]).astype(np.int32)
  prompt = np.where(prompt_mask > 0, rng.integers(4, V, (B, S)), pad_prompt_id).astype(np.int32)
  response = rng.integers(4, V, (B, T)).astype(np.int32)
  response_mask = np.zeros((B, T), np.int32)
  response[0, 2] = EOS
  response_mask[0, :] = 1
  response_mask[1, :4] = 1
  response[1, 5] = EOS
  response[2, 4] = EOS
  response_mask[2, :5] = 1
  return dict(prompt=prompt, prompt_mask=prompt_mask, response=response,
              response_mask=response_mask)


def _torch_log_softmax_at(logits, tokens):
  log_p = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), dim=-1).numpy()
  return np.take_along_axis(log_p, tokens[..., None].astype(np.int64), axis=-1)[..., 0]


def _randomize(model, seed):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      is_norm = p.ndim == 1 and ("ln" in name or "norm" in name) and name.endswith("weight")
      p.copy_(1.0 + 0.2 * noise if is_norm else 0.3 * noise)
  return model.eval()


def _gpt2_reference(model, batch):
  """log p of each response token from HF GPT-2, with jaxsi's left padding and positions."""
  prompt, prompt_mask, response = batch["prompt"], batch["prompt_mask"], batch["response"]
  ids = np.concatenate([prompt, response[:, :-1]], axis=1)
  mask = np.concatenate([prompt_mask, np.ones((B, T - 1), np.int32)], axis=1)
  n = prompt_mask.sum(1, keepdims=True)
  positions = np.concatenate([np.maximum(np.cumsum(prompt_mask, 1) - 1, 0),
                              n + np.arange(T - 1)[None]], axis=1)
  with torch.no_grad():
    logits = model(input_ids=torch.tensor(ids, dtype=torch.long),
                   attention_mask=torch.tensor(mask, dtype=torch.long),
                   position_ids=torch.tensor(positions, dtype=torch.long)).logits.numpy()
  return _torch_log_softmax_at(logits[:, S - 1:], response)


def _t5_reference(model, batch):
  decoder_ids = np.concatenate([np.zeros((B, 1), np.int64), batch["response"][:, :-1]], axis=1)
  with torch.no_grad():
    logits = model(input_ids=torch.tensor(batch["prompt"], dtype=torch.long),
                   attention_mask=torch.tensor(batch["prompt_mask"], dtype=torch.long),
                   decoder_input_ids=torch.tensor(decoder_ids, dtype=torch.long)).logits.numpy()
  return _torch_log_softmax_at(logits, batch["response"])


def _hf_model(kind):
  if kind == "gpt2":
    config = transformers.GPT2Config(vocab_size=V, n_embd=16, n_layer=1, n_head=2, n_positions=32,
                                     bos_token_id=1, eos_token_id=EOS)
    config._attn_implementation = "eager"  # pylint: disable=protected-access
    return _randomize(transformers.GPT2LMHeadModel(config), 1)
  config = transformers.T5Config(
      vocab_size=V, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
      relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
      feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0)
  return _randomize(transformers.T5ForConditionalGeneration(config), 2)


@pytest.mark.parametrize("kind", ["gpt2", "t5"])
def test_self_reward_matches_pytorch_with_hand_checked_masks(kind, tmp_path):
  model = _hf_model(kind)
  model.save_pretrained(tmp_path)
  lm, params = from_pretrained(str(tmp_path))
  batch = _reward_batch()
  token_log_p = (_gpt2_reference if kind == "gpt2" else _t5_reference)(model, batch)
  want = (token_log_p * EXPECTED_VALID).sum(axis=1)
  want_mean = want / np.maximum(EXPECTED_VALID.sum(axis=1), 1)

  reward = jax.jit(functools.partial(sharpening.self_reward, lm, eos_id=EOS))
  got = np.asarray(reward(params, batch))
  assert got.dtype == np.float32 and got.shape == (B,)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  assert got[3] == 0.0 and np.all(got[:3] < -1.0)  # empty row, real rows not trivially 0
  got_mean = sharpening.self_reward(lm, params, batch, eos_id=EOS, normalize=True)
  np.testing.assert_allclose(np.asarray(got_mean), want_mean, atol=1e-4, rtol=0)

  # Nothing outside the counted slots matters: prompt padding ids, tokens after the first
  # EOS, response padding.
  changed = {k: v.copy() for k, v in batch.items()}
  changed["prompt"] = np.where(batch["prompt_mask"] > 0, batch["prompt"], 7)
  changed["response"] = np.where(EXPECTED_VALID > 0, batch["response"], 9).astype(np.int32)
  np.testing.assert_allclose(np.asarray(reward(params, changed)), got, atol=1e-6)
  # Without eos_id the mask is trusted: row 0 then counts its tokens after EOS too.
  trusted = np.asarray(sharpening.self_reward(lm, params, batch))
  np.testing.assert_allclose(trusted[0], (token_log_p[0] * batch["response_mask"][0]).sum(),
                             atol=1e-4)


def test_response_validity_cuts_after_the_first_masked_in_eos():
  batch = _reward_batch()
  got = sharpening.response_validity(jnp.asarray(batch["response"]),
                                     jnp.asarray(batch["response_mask"]), EOS)
  np.testing.assert_array_equal(np.asarray(got), EXPECTED_VALID.astype(bool))
  # An EOS in a masked-out slot cuts nothing after it.
  response = np.array([[EOS, 5, 6, EOS, 7]])
  mask = np.array([[0, 1, 1, 1, 1]])
  np.testing.assert_array_equal(np.asarray(sharpening.response_validity(response, mask, EOS)),
                                [[False, True, True, True, False]])


# ----------------------------------------------------------------------------- best-of-N


class CountingLM(DelegatingLM):
  """Delegates to a real model and counts `prefill` and `logits` calls (made while tracing)."""

  def __init__(self, lm):
    super().__init__(lm)
    self.prefill_shapes, self.logits_calls = [], 0

  def logits(self, params, batch, *, dropout_rng=None):
    self.logits_calls += 1
    return super().logits(params, batch, dropout_rng=dropout_rng)

  def prefill(self, params, prompt, prompt_mask, max_new_tokens):
    self.prefill_shapes.append(tuple(prompt.shape))
    return super().prefill(params, prompt, prompt_mask, max_new_tokens)


SV, SN, ST = 16, 4, 5  # vocabulary, samples per prompt, max_new_tokens of the sampling tests


def _tiny_decoder(seed=0, num_real_tokens=14):
  cfg = decoder.default_config("gpt2")
  cfg.update(vocab_size=SV, d_model=16, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=8,
             d_ff=32, max_len=16, num_real_tokens=num_real_tokens)
  lm = decoder.DecoderLM(cfg)
  leaves, treedef = jax.tree.flatten(lm.init(jax.random.key(seed)))
  rng = np.random.default_rng(seed)
  params = jax.tree.unflatten(
      treedef, [x + 0.5 * rng.normal(size=x.shape).astype(np.float32) for x in leaves])
  return lm, params


@pytest.fixture(scope="module")
def tiny():
  lm, params = _tiny_decoder()
  prompt = np.array([[0, 5, 6, 7], [0, 0, 8, 9]], np.int32)
  prompt_mask = (prompt > 0).astype(np.int32)
  return lm, params, prompt, prompt_mask


# One compiled sampler for every test: the knobs are traced arguments.
_sample_jit = jax.jit(functools.partial(sampling.sample, max_new_tokens=ST, num_samples=SN,
                                        eos_id=EOS), static_argnums=0)


def _all_samples(lm, params, prompt, prompt_mask, rng, temperature=1.0, top_k=0, top_p=1.0):
  return _sample_jit(lm, params, prompt, prompt_mask, rng, temperature=np.float32(temperature),
                     top_k=np.int32(top_k), top_p=np.float32(top_p))


def test_best_of_n_reuses_sampler_log_probs_at_temperature_one(tiny):
  lm, params, prompt, prompt_mask = tiny
  counting = CountingLM(lm)
  rng = jax.random.key(3)
  best = jax.jit(functools.partial(sharpening.best_of_n, counting, n=SN, max_new_tokens=ST,
                                   eos_id=EOS))(params, prompt, prompt_mask, rng)
  # One prefill of the [B, S] prompts, shared by the N samples; no teacher-forced rescoring.
  assert counting.prefill_shapes == [prompt.shape] and counting.logits_calls == 0
  chex.assert_shape([best.tokens, best.mask], (2, ST))
  chex.assert_shape([best.scores, best.lengths, best.all_truncated], (2, SN))

  out = _all_samples(lm, params, prompt, prompt_mask, rng)
  teacher_forced = sharpening.self_reward(
      lm, params, dict(prompt=out.prompt, prompt_mask=out.prompt_mask, response=out.tokens,
                       response_mask=out.mask), eos_id=EOS)
  scores = np.asarray(best.scores)
  np.testing.assert_allclose(scores.reshape(-1), np.asarray(teacher_forced), atol=1e-4)
  np.testing.assert_array_equal(best.log_likelihoods, best.scores)
  assert len(np.unique(np.round(scores, 4))) > 4  # distinct samples, a real choice
  index = np.asarray(best.index)
  np.testing.assert_array_equal(index, np.argmax(scores, axis=1))
  rows = np.arange(2) * SN + index
  np.testing.assert_array_equal(best.tokens, np.asarray(out.tokens)[rows])
  np.testing.assert_array_equal(best.mask, np.asarray(out.mask)[rows])
  np.testing.assert_array_equal(best.truncated, np.asarray(out.truncated)[rows])
  np.testing.assert_allclose(best.score, scores[np.arange(2), index])


def test_best_of_n_rescores_when_sampling_is_not_from_the_model_itself(tiny):
  lm, params, prompt, prompt_mask = tiny
  counting = CountingLM(lm)
  rng = jax.random.key(4)
  knobs = dict(temperature=0.7, top_k=6, top_p=0.95)
  best = jax.jit(functools.partial(sharpening.best_of_n, counting, n=SN, max_new_tokens=ST,
                                   eos_id=EOS, **knobs))(params, prompt, prompt_mask, rng)
  assert counting.logits_calls == 1  # the teacher-forced path ran
  out = _all_samples(lm, params, prompt, prompt_mask, rng, **knobs)
  # jaxsi's sampler also records temperature-1 log-probs; both paths must agree.
  from_sampler = np.asarray((out.logprobs * out.mask).sum(axis=1)).reshape(2, SN)
  np.testing.assert_allclose(np.asarray(best.scores), from_sampler, atol=1e-4)

  # Traced knobs: lax.cond picks the path at run time, with the same results.
  traced = jax.jit(functools.partial(sharpening.best_of_n, lm, n=SN, max_new_tokens=ST,
                                     eos_id=EOS, normalize=True))
  got = traced(params, prompt, prompt_mask, rng, temperature=jnp.float32(0.7),
               top_k=jnp.int32(6), top_p=jnp.float32(0.95))
  lengths = np.asarray(out.length).reshape(2, SN)
  np.testing.assert_allclose(np.asarray(got.scores), from_sampler / lengths, atol=1e-4)
  np.testing.assert_allclose(np.asarray(got.log_likelihoods), from_sampler, atol=1e-4)


class UniformLM(LanguageModel):
  """A model whose next-token distribution is uniform over `allowed` (no EOS among them)."""

  def __init__(self, vocab, allowed):
    self.vocab_size = vocab
    self.config = ml_collections.ConfigDict()
    self.row = jnp.where(jnp.isin(jnp.arange(vocab), jnp.asarray(allowed)), 0.0, -1e9)

  def init(self, rng):
    return {}

  def abstract_params(self):
    return {}

  def param_axes(self):
    return {}

  def logits(self, params, batch, *, dropout_rng=None):
    return jnp.broadcast_to(self.row, batch["response"].shape + (self.vocab_size,))

  def prefill(self, params, prompt, prompt_mask, max_new_tokens):
    return jnp.broadcast_to(self.row, (prompt.shape[0], self.vocab_size)), jnp.zeros(
        (prompt.shape[0],))

  def decode_step(self, params, cache, token, slot, position, visible):
    return jnp.broadcast_to(self.row, (token.shape[0], self.vocab_size)), cache


def test_ties_go_to_the_first_sample():
  lm = UniformLM(8, allowed=[4, 5])
  prompt = np.ones((3, 2), np.int32)
  best = jax.jit(functools.partial(sharpening.best_of_n, lm, n=5, max_new_tokens=4, eos_id=EOS))(
      {}, prompt, np.ones_like(prompt), jax.random.key(0))
  # Every sample has 4 tokens of probability 1/2: equal scores, different tokens.
  np.testing.assert_allclose(np.asarray(best.scores), np.full((3, 5), 4 * np.log(0.5)),
                             atol=1e-5)
  np.testing.assert_array_equal(best.index, [0, 0, 0])
  assert np.all(best.all_truncated)


def test_select_best_first_wins_and_ranks_truncated_last():
  score = np.array([[1.0, 3.0, 3.0, 2.0], [0.0, -1.0, 5.0, 5.0], [2.0, 2.0, 1.0, 0.0]])
  truncated = np.array([[False, True, False, False], [True, True, True, True],
                        [True, False, False, True]])
  np.testing.assert_array_equal(sharpening.select_best(score, truncated), [1, 2, 0])
  np.testing.assert_array_equal(
      sharpening.select_best(score, truncated, drop_truncated=True), [2, 2, 1])
  valid = np.array([[True, False, False, True], [True, True, False, False],
                    [False, False, True, True]])
  np.testing.assert_array_equal(
      sharpening.select_best(score, truncated, drop_truncated=True, valid_BxN=valid), [3, 0, 2])


def test_best_of_n_drop_truncated_prefers_a_complete_sample():
  # EOS is likely but not certain; complete samples must win even when shorter ones tie.
  lm = UniformLM(8, allowed=[EOS, 4, 5, 6])
  prompt = np.ones((4, 2), np.int32)
  best = jax.jit(functools.partial(sharpening.best_of_n, lm, n=6, max_new_tokens=2, eos_id=EOS,
                                   drop_truncated=True))(
      {}, prompt, np.ones_like(prompt), jax.random.key(1))
  all_truncated, scores = np.asarray(best.all_truncated), np.asarray(best.scores)
  assert np.all(all_truncated.any(axis=1) & ~all_truncated.all(axis=1))  # a real choice
  assert not np.any(best.truncated)
  np.testing.assert_array_equal(best.index,
                                np.argmax(np.where(all_truncated, -np.inf, scores), axis=1))
  # A truncated sample ranks below a complete one of the same score.
  lengths = np.asarray(best.lengths)
  assert np.any((lengths == 2) & all_truncated) and np.any((lengths == 2) & ~all_truncated)


# ----------------------------------------------------------------------------- losses


class CategoricalLM(LanguageModel):
  """One categorical distribution over K outcomes, softmax(params["logits"]), at every slot."""

  def __init__(self, k):
    self.vocab_size = k
    self.config = ml_collections.ConfigDict()

  def init(self, rng):
    return {"logits": jnp.zeros((self.vocab_size,))}

  def abstract_params(self):
    return jax.eval_shape(self.init, jax.random.key(0))

  def param_axes(self):
    return {"logits": jax.sharding.PartitionSpec(None)}

  def logits(self, params, batch, *, dropout_rng=None):
    return jnp.broadcast_to(params["logits"], batch["response"].shape + (self.vocab_size,))

  def prefill(self, params, prompt, prompt_mask, max_new_tokens):
    return jnp.broadcast_to(params["logits"], (prompt.shape[0], self.vocab_size)), jnp.zeros(
        (prompt.shape[0],))

  def decode_step(self, params, cache, token, slot, position, visible):
    return jnp.broadcast_to(params["logits"], (token.shape[0], self.vocab_size)), cache


K = 5


def _all_pairs_batch():
  y, y_prime = np.meshgrid(np.arange(K), np.arange(K), indexing="ij")
  rows = K * K
  return dict(prompt=np.ones((rows, 1), np.int32), prompt_mask=np.ones((rows, 1), np.int32),
              response=y.reshape(rows, 1).astype(np.int32),
              response_mask=np.ones((rows, 1), np.int32),
              response_prime=y_prime.reshape(rows, 1).astype(np.int32),
              response_prime_mask=np.ones((rows, 1), np.int32))


def _np_log_softmax(x):
  x = np.asarray(x, np.float64)
  return x - x.max() - np.log(np.exp(x - x.max()).sum())


def _cfg(**overrides):
  cfg = sharpening.default_objective_config()
  cfg.update(overrides)
  return cfg


BASE_LOGITS = np.array([1.0, 0.2, -0.5, 0.7, -1.3], np.float32)


@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_offline_loss_recovers_the_sharpened_distribution(beta):
  lm = CategoricalLM(K)
  loss_fn = sharpening.make_loss_fn(lm, _cfg(mode="rlhf", beta=beta), base_lm=lm, eos_id=None)
  batch = {k: jnp.asarray(v) for k, v in _all_pairs_batch().items()}
  frozen = {"base": {"logits": jnp.asarray(BASE_LOGITS)}}
  theta0 = np.array([0.3, -0.2, 0.5, 0.0, 0.1], np.float32)

  # The value against NumPy at a starting point.
  loss, metrics = loss_fn({"logits": jnp.asarray(theta0)}, frozen, batch, jax.random.key(0), 0)
  log_pi, log_base = _np_log_softmax(theta0), _np_log_softmax(BASE_LOGITS)
  y, y_prime = batch["response"][:, 0], batch["response_prime"][:, 0]
  residual = (beta * (log_pi[y] - log_base[y]) - beta * (log_pi[y_prime] - log_base[y_prime])
              - (log_base[y] - log_base[y_prime]))
  np.testing.assert_allclose(float(loss), np.mean(residual**2), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["residual_abs"]), np.abs(residual).mean(), rtol=1e-5)

  tx = optax.adam(0.05)

  @jax.jit
  def fit(theta):
    def step(carry, _):
      params, opt_state = carry
      grads = jax.grad(lambda p: loss_fn(p, frozen, batch, jax.random.key(0), 0)[0])(params)
      updates, opt_state = tx.update(grads, opt_state)
      return (optax.apply_updates(params, updates), opt_state), None
    params = {"logits": theta}
    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=3000)
    return params

  pi = np.asarray(jax.nn.softmax(fit(jnp.asarray(theta0))["logits"]))
  base = np.exp(log_base)
  want = base**(1 + 1 / beta) / np.sum(base**(1 + 1 / beta))
  np.testing.assert_allclose(pi, want, atol=1e-3)
  assert np.abs(want - base).max() > 0.05  # sharpening visibly moved the distribution


def test_xpo_adds_the_optimism_term():
  lm = CategoricalLM(K)
  alpha = 0.3
  batch = {k: jnp.asarray(v) for k, v in _all_pairs_batch().items()}
  frozen = {"base": {"logits": jnp.asarray(BASE_LOGITS)}}
  params = {"logits": jnp.asarray([0.3, -0.2, 0.5, 0.0, 0.1])}
  rlhf = sharpening.make_loss_fn(lm, _cfg(mode="rlhf"), base_lm=lm)
  xpo = sharpening.make_loss_fn(lm, _cfg(mode="xpo", xpo_alpha=alpha), base_lm=lm)
  plain, _ = rlhf(params, frozen, batch, jax.random.key(0), 0)
  loss, metrics = xpo(params, frozen, batch, jax.random.key(0), 0)
  log_pi = _np_log_softmax(params["logits"])
  optimism = log_pi[np.asarray(batch["response_prime"][:, 0])].mean()
  np.testing.assert_allclose(float(metrics["optimism"]), optimism, rtol=1e-5)
  # ADDED: loss = squared loss + α·mean log π(ỹ|x), so descending it lowers π(ỹ).
  np.testing.assert_allclose(float(loss), float(plain) + alpha * optimism, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["squared_loss"]), float(plain), rtol=1e-6)


def test_pair_loss_needs_pairs_and_the_base():
  lm = CategoricalLM(K)
  loss_fn = sharpening.make_loss_fn(lm, _cfg(mode="rlhf"), base_lm=lm)
  batch = _all_pairs_batch()
  del batch["response_prime"]
  with pytest.raises(ValueError, match=r"lacks \['response_prime'\]; prepare each step"):
    loss_fn({"logits": jnp.zeros(K)}, {"base": {"logits": jnp.zeros(K)}}, batch, None, 0)
  with pytest.raises(ValueError, match=r"needs frozen=\{'base': base_params\}"):
    loss_fn({"logits": jnp.zeros(K)}, {}, _all_pairs_batch(), None, 0)
  with pytest.raises(ValueError, match="mode 'xpo' needs the frozen base model"):
    sharpening.make_loss_fn(lm, _cfg(mode="xpo"))


def test_sft_mode_is_the_masked_nll():
  lm = CategoricalLM(K)
  loss_fn = sharpening.make_loss_fn(lm, _cfg(mode="sft", normalization="token"))
  batch = _all_pairs_batch()
  params = {"logits": jnp.asarray(BASE_LOGITS)}
  loss, _ = loss_fn(params, {}, batch, jax.random.key(0), 0)
  want = -_np_log_softmax(BASE_LOGITS)[batch["response"][:, 0]].mean()
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_sft_mode_takes_the_chunked_loss():
  lm, params = _tiny_decoder()
  rng = np.random.default_rng(3)
  batch = {"prompt": jnp.asarray(rng.integers(1, 14, (3, 4)), jnp.int32),
           "prompt_mask": jnp.ones((3, 4), jnp.int32),
           "response": jnp.asarray(rng.integers(1, 14, (3, 5)), jnp.int32),
           "response_mask": jnp.asarray([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]],
                                        jnp.int32)}

  def value_and_grad(chunk):
    loss_fn = sharpening.make_loss_fn(lm, _cfg(mode="sft", vocab_chunk_size=chunk))
    loss = lambda p: loss_fn(p, {}, batch, None, 0)[0]
    # The chunked loss runs the head under a scan over positions; the plain one has no scan.
    assert ("scan" in str(jax.make_jaxpr(loss)(params))) == (chunk > 0)
    return jax.value_and_grad(loss)(params)

  (loss, grads), (want_loss, want_grads) = value_and_grad(2), value_and_grad(0)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match=r"^Sharpening vocab_chunk_size=2 applies to mode 'sft' "
                     r"only \(mode 'rlhf' scores whole sequences\); set it to 0\.$"):
    sharpening.validate(_cfg(mode="rlhf", vocab_chunk_size=2))
  with pytest.raises(ValueError, match=r"^Sharpening vocab_chunk_size=-1 must be an integer"):
    sharpening.validate(_cfg(vocab_chunk_size=-1))


# ----------------------------------------------------------------------------- adaptive N


def _stub_draw(log_likelihood_BxM, chunk, calls, score_BxM=None):
  """draw(i) returning samples [i*chunk, (i+1)*chunk) of fixed per-prompt values."""
  score_BxM = log_likelihood_BxM if score_BxM is None else score_BxM
  rows = log_likelihood_BxM.shape[0]

  def draw(i):
    calls.append(i)
    part = slice(i * chunk, (i + 1) * chunk)
    ll = log_likelihood_BxM[:, part]
    c = ll.shape[1]
    sample_id = np.arange(i * chunk, i * chunk + c)
    return sharpening.ScoredSamples(
        tokens=np.broadcast_to(sample_id[None, :, None], (rows, c, 1)),
        mask=np.ones((rows, c, 1), np.int32), score=score_BxM[:, part], log_likelihood=ll,
        length=np.ones((rows, c), np.int32), truncated=np.zeros((rows, c), bool))

  return draw


def _reference_num_samples(log_likelihood, k, delta, n_max):
  """The rule written directly: stop at the first j with 1 / max_{i<=j} p_i <= k / ln(2/δ)."""
  mu = np.log(2 / delta)
  for j in range(1, min(len(log_likelihood), n_max) + 1):
    if 1.0 / np.exp(np.max(log_likelihood[:j])) <= k / mu:
      return j, True
  return min(len(log_likelihood), n_max), False


def test_adaptive_stopping_rule_on_a_stub():
  k, delta, n_max = 10.0, 0.1, 7
  threshold = np.log(np.log(2 / delta) / k)  # ≈ -1.2054
  ll = np.array([[-5.0, -1.0, -9.0, -9.0, -9.0, -9.0, -9.0, -9.0],
                 [-3.0, -4.0, -2.0, threshold - 1e-3, threshold + 1e-3, -9.0, -9.0, -9.0],
                 [-3.0, -3.0, -3.0, -3.0, -3.0, -3.0, -3.0, -0.1]])
  # Scores differ from log-likelihoods (as with normalize): sample 2 of prompt 0 scores best
  # but was drawn after prompt 0 stopped, so it must not be chosen.
  score = np.array([[0.0, 1.0, 9.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                    [1.0, 3.0, 2.0, 3.0, 0.5, 9.0, 9.0, 9.0],
                    [0.0, 0.0, 0.0, 0.0, 0.0, 5.0, 0.0, 9.0]])
  calls = []
  got = sharpening.adaptive_best_of_n(_stub_draw(ll, 2, calls, score), k=k, delta=delta,
                                      n_max=n_max)
  assert calls == [0, 1, 2, 3]  # chunks of 2: 2 + 2 + 2 + 1 (cut at n_max)
  for b in range(3):
    assert (got.num_samples[b], got.stopped[b]) == _reference_num_samples(ll[b], k, delta, n_max)
  np.testing.assert_array_equal(got.num_samples, [2, 5, 7])
  np.testing.assert_array_equal(got.stopped, [True, True, False])
  np.testing.assert_array_equal(got.index, [1, 1, 5])  # first-wins tie in prompt 1
  np.testing.assert_array_equal(got.tokens[:, 0], [1, 1, 5])
  np.testing.assert_allclose(got.score, [1.0, 3.0, 5.0])
  np.testing.assert_allclose(got.log_likelihood, [-1.0, -4.0, -3.0])
  assert got.scores.shape == (3, 7)

  # The rule is checked sample by sample: chunks of 1 give the same N; and drawing stops as
  # soon as every prompt has stopped.
  one = sharpening.adaptive_best_of_n(_stub_draw(ll, 1, [], score), k=k, delta=delta,
                                      n_max=n_max)
  np.testing.assert_array_equal(one.num_samples, got.num_samples)
  np.testing.assert_array_equal(one.index, got.index)
  calls = []
  early = sharpening.adaptive_best_of_n(_stub_draw(ll[:1], 2, calls), k=k, delta=delta,
                                        n_max=n_max)
  assert calls == [0] and early.num_samples.tolist() == [2]


def test_adaptive_num_samples_rejects_bad_constants():
  with pytest.raises(ValueError, match=r"adaptive_n.delta=1.5 must be a number in \(0, 1\)"):
    sharpening.adaptive_num_samples(np.zeros((1, 2)), k=1.0, delta=1.5, n_max=4)
  with pytest.raises(ValueError, match="adaptive_n.k=0 must be a number > 0"):
    sharpening.adaptive_log_threshold(0, 0.1)


# ----------------------------------------------------------------------------- preparer


def _peaked(k, token, height=12.0):
  """CategoricalLM params putting almost all mass on `token`."""
  return {"logits": jnp.where(jnp.arange(k) == token, height, 0.0)}


def test_preparer_draws_from_the_right_models_on_a_mesh():
  # Policy and base are categorical models peaked on different tokens, so every prepared
  # response shows which model drew it.
  k, width, rows, seed, step = 8, 5, 8, 5, 7
  lm = CategoricalLM(k)
  policy_params, frozen = _peaked(k, 5), {"base": _peaked(k, 6)}
  mesh = mesh_lib.build_mesh(ml_collections.ConfigDict({"data": 4, "fsdp": 2, "tensor": 1}))
  host_batch = dict(prompt=np.ones((rows, 2), np.int32), prompt_mask=np.ones((rows, 2), np.int32),
                    response=np.zeros((rows, width), np.int32),
                    response_mask=np.zeros((rows, width), np.int32))
  batch = {name: jax.device_put(v, partitioning.batch_sharding(mesh, 2))
           for name, v in host_batch.items()}
  common = dict(base_lm=lm, eos_id=EOS, pad_id=0, response_width=width, seed=seed, mesh=mesh)


  # Online SFT-Sharpening: the best-of-N of the BASE under the documented step key.
  base_only = {"logits": jnp.asarray([0.0, 0.0, 0.0, 1.5, 1.0, 0.5, 1.2, 0.0])}
  out, metrics = sharpening.make_preparer(lm, _cfg(online=True, n=3, max_new_tokens=4),
                                          **common)(step, batch, policy_params, {"base": base_only})
  key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), sharpening.SAMPLE_STREAM),
                           step)
  want = jax.jit(functools.partial(sharpening.best_of_n, lm, n=3, max_new_tokens=4, eos_id=EOS))(
      base_only, host_batch["prompt"], host_batch["prompt_mask"], key)
  np.testing.assert_array_equal(np.asarray(out["response"])[:, :4], want.tokens)
  np.testing.assert_array_equal(np.asarray(out["response_mask"])[:, :4], want.mask)
  assert np.all(np.asarray(out["response_mask"])[:, 4:] == 0)
  np.testing.assert_allclose(float(metrics["bon_reward"]), float(want.score.mean()), atol=1e-5)
  assert len(np.unique(np.round(np.asarray(want.scores), 4))) > 2  # a real choice among N
  assert out["response"].sharding.is_equivalent_to(partitioning.batch_sharding(mesh, 2), 2)

  preparers = {}
  for mode, y_token in (("rlhf", 6), ("xpo", 5)):
    cfg = _cfg(mode=mode, max_new_tokens=4)
    assert sharpening.extra_batch_keys(cfg) == {"response_prime": 2, "response_prime_mask": 2}
    preparers[mode] = sharpening.make_preparer(lm, cfg, **common)
    out, _ = preparers[mode](step, batch, policy_params, frozen)
    assert set(out) == set(host_batch) | {"response_prime", "response_prime_mask"}
    # rlhf: y and y' from the base (6); xpo: y from the policy (5), ỹ from the base (6).
    np.testing.assert_array_equal(np.asarray(out["response"]),
                                  np.pad(np.full((rows, 4), y_token), ((0, 0), (0, 1))))
    np.testing.assert_array_equal(np.asarray(out["response_prime"]),
                                  np.pad(np.full((rows, 4), 6), ((0, 0), (0, 1))))
    np.testing.assert_array_equal(np.asarray(out["response_mask"]),
                                  np.pad(np.ones((rows, 4)), ((0, 0), (0, 1))))
    assert out["response_prime"].sharding.is_equivalent_to(partitioning.batch_sharding(mesh, 2), 2)
    loss, _ = sharpening.make_loss_fn(lm, cfg, base_lm=lm, eos_id=EOS)(
        policy_params, frozen, out, jax.random.key(0), 0)
    assert np.isfinite(float(loss))
  # Samples are a pure function of the step.
  flat = {"base": {"logits": jnp.zeros(k)}}
  draw = lambda at_step: np.asarray(
      preparers["rlhf"](at_step, batch, policy_params, flat)[0]["response"])
  np.testing.assert_array_equal(draw(step), draw(step))
  assert not np.array_equal(draw(step), draw(step + 1))


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("overrides, message", [
    ({"mode": "dpo"}, "Unknown sharpening mode 'dpo'; expected one of sft, rlhf, xpo."),
    ({"n": 0}, "Sharpening n=0 must be an integer >= 1."),
    ({"temperature": 0.0}, "Sharpening temperature=0.0 must be a number > 0"),
    ({"beta": -1.0}, "Sharpening beta=-1.0 must be a number > 0."),
    ({"mode": "rlhf", "online": True}, "online=True applies to mode 'sft' only"),
    ({"normalization": "sum"}, "Unknown normalization 'sum'"),
])
def test_validate_names_the_bad_value(overrides, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")
                     .replace(".", r"\.")):
    sharpening.validate(_cfg(**overrides))


def test_validate_rejects_unknown_keys_and_adaptive_online():
  cfg = _cfg()
  cfg.unlock()
  cfg.bogus = 1
  with pytest.raises(ValueError, match=r"unknown keys \['bogus'\]"):
    sharpening.validate(cfg)
  cfg = _cfg(online=True)
  cfg.adaptive_n.enabled = True
  with pytest.raises(ValueError, match="adaptive_n works in the generate stage only"):
    sharpening.validate(cfg)
  assert sharpening.needs_preparer(_cfg(mode="rlhf"))
  assert not sharpening.needs_preparer(_cfg())
