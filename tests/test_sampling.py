"""Tests for jaxsi.sampling: cache correctness, greedy, distributions, EOS, N samples, sharding."""

import functools

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.stats
from jax.sharding import AxisType

from jaxsi import partitioning, sampling
from jaxsi.models import build, decoder, t5
from jaxsi.models.lm import LanguageModel

from delegating_lm import DelegatingLM  # tests/delegating_lm.py

B, S, T, N = 3, 6, 6, 2
PROMPT_LENGTHS = (6, 4, 1)


def tiny_config(kind):
  if kind == "t5":
    cfg = t5.preset("t5_tiny")  # vocab 128
    cfg.num_real_tokens = 120
    return cfg
  cfg = decoder.default_config(kind)
  cfg.update(vocab_size=64, d_model=32, num_layers=2, num_heads=4,
             num_kv_heads=4 if kind == "gpt2" else 2, head_dim=8, d_ff=64, max_len=32)
  if kind == "gpt2":
    cfg.num_real_tokens = 56
  return cfg


def perturbed_params(lm, seed=0, scale=0.1):
  """Fresh params with every leaf perturbed, so that biases and norms matter too."""
  leaves, treedef = jax.tree.flatten(lm.init(jax.random.key(seed)))
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(
      treedef, [x + scale * rng.normal(size=x.shape).astype(np.float32) for x in leaves])


def make_prompt(vocab, batch=B, seed=0, lengths=PROMPT_LENGTHS):
  rng = np.random.default_rng(seed)
  prompt = rng.integers(1, vocab, (batch, S)).astype(np.int32)
  mask = (np.arange(S)[None, :] >= (S - np.asarray(lengths))[:, None]).astype(np.int32)
  return prompt * mask, mask




class CountingLM(DelegatingLM):
  """Delegates to a real model and records every `prefill` call (they happen while tracing)."""

  def __init__(self, lm):
    super().__init__(lm)
    self.prefill_prompt_shapes = []

  def prefill(self, params, prompt, prompt_mask, max_new_tokens):
    self.prefill_prompt_shapes.append(tuple(prompt.shape))
    return super().prefill(params, prompt, prompt_mask, max_new_tokens)


@pytest.fixture(scope="module", params=["gpt2", "llama", "t5"])
def model(request):
  """(kind, model wrapped in CountingLM, params, jitted logits, sampler shared by the tests)."""
  lm = CountingLM(build(tiny_config(request.param)))
  sampler = sampling.make_sampler(lm, max_new_tokens=T, num_samples=N, eos_id=lm.vocab_size - 1)
  return request.param, lm, perturbed_params(lm), jax.jit(lm.logits), sampler


def real_vocab(lm):
  return sampling.num_real_tokens(lm) or lm.vocab_size


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(axis=-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def reference_logits(lm, logits_fn, params, out):
  """Logits of a full teacher-forced forward pass, -inf on padded head rows, [R, T, V]."""
  logits = np.asarray(logits_fn(params, dict(prompt=out.prompt, prompt_mask=out.prompt_mask,
                                             response=out.tokens)), np.float64)
  logits[..., real_vocab(lm):] = -np.inf
  return logits


def reference_probs(logits, temperature, top_k, top_p):
  """NumPy sampling distribution: logits / temperature, top-k, then top-p (nucleus)."""
  logits = np.asarray(logits, np.float64)
  real = np.isfinite(logits)
  order = [i for i in np.argsort(-logits / temperature, kind="stable") if real[i]]
  if top_k:
    order = order[:top_k]
  x = logits[order] / temperature
  probs_sorted = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
  kept, mass = [], 0.0
  for index, p in zip(order, probs_sorted):
    kept.append(index)
    mass += p
    if top_p < 1 and mass >= top_p:
      break
  probs = np.zeros(len(logits))
  y = logits[kept] / temperature
  probs[kept] = np.exp(y - y.max()) / np.exp(y - y.max()).sum()
  return probs


def check_eos_layout(out, eos_id, pad_id, steps):
  """Every row: mask 1 through its first EOS, pad (and zero log-probs) after, flags consistent."""
  tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
  for row in range(tokens.shape[0]):
    eos_at = np.flatnonzero(tokens[row] == eos_id)
    end = eos_at[0] + 1 if eos_at.size else steps
    np.testing.assert_array_equal(mask[row], np.arange(steps) < end, err_msg=f"row {row}")
    assert (tokens[row, end:] == pad_id).all()
    assert (np.asarray(out.logprobs)[row, end:] == 0).all()
    assert (np.asarray(out.sample_logprobs)[row, end:] == 0).all()
    assert int(out.length[row]) == end
    assert bool(out.truncated[row]) == (eos_at.size == 0)


# ------------------------------------------------------------------ cache vs full forward pass


@pytest.mark.parametrize("knobs", [(1.0, 0, 1.0), (0.7, 5, 0.8)])
def test_logprobs_equal_teacher_forced_forward(model, knobs):
  kind, lm, params, logits_fn, sampler = model
  temperature, top_k, top_p = knobs
  prompt, prompt_mask = make_prompt(lm.vocab_size)
  out = sampler(params, prompt, prompt_mask, jax.random.key(3), temperature, top_k, top_p)
  chex.assert_shape([out.tokens, out.mask, out.logprobs, out.sample_logprobs], (B * N, T))
  np.testing.assert_array_equal(out.prompt, np.repeat(prompt, N, axis=0))
  np.testing.assert_array_equal(out.prompt_mask, np.repeat(prompt_mask, N, axis=0))
  assert (np.asarray(out.tokens) < real_vocab(lm)).all(), "a padded head row was sampled"

  logits = reference_logits(lm, logits_fn, params, out)
  tokens = np.asarray(out.tokens)
  want = np.take_along_axis(np_log_softmax(logits), tokens[..., None], -1)[..., 0]
  mask = np.asarray(out.mask) > 0
  np.testing.assert_allclose(np.asarray(out.logprobs)[mask], want[mask], atol=1e-5)
  # Under the sampling distribution (temperature, top-k, top-p) too, computed in NumPy.
  for row, t in zip(*np.nonzero(mask)):
    probs = reference_probs(logits[row, t], temperature, top_k, top_p)
    assert probs[tokens[row, t]] > 0, f"token outside the kept set at row {row}, step {t}"
    np.testing.assert_allclose(out.sample_logprobs[row, t], np.log(probs[tokens[row, t]]),
                               atol=1e-5, err_msg=f"{kind} row {row} step {t}")


def reference_greedy(lm, logits_fn, params, prompt, prompt_mask, eos_id, pad_id=0):
  """Argmax of a full forward pass per step (the response buffer grows one token at a time)."""
  tokens = np.full((prompt.shape[0], T), pad_id, np.int32)
  done = np.zeros(prompt.shape[0], bool)
  for t in range(T):
    # Causal: logits[:, t] only reads response[:, :t], so a fixed-length buffer is exact.
    logits = np.array(logits_fn(params, dict(prompt=prompt, prompt_mask=prompt_mask,
                                             response=tokens))[:, t])
    logits[:, real_vocab(lm):] = -np.inf
    token = np.where(done, pad_id, logits.argmax(-1))
    tokens[:, t] = token
    done |= token == eos_id
  return tokens


def test_greedy_equals_argmax_of_full_forward(model):
  kind, lm, params, logits_fn, sampler = model
  prompt, prompt_mask = make_prompt(lm.vocab_size, seed=1)
  free = reference_greedy(lm, logits_fn, params, prompt, prompt_mask, eos_id=-1)
  # An EOS that greedy meets in row 0 (at step 2 when possible), so the EOS path is covered.
  eos_id = int(free[0, 2]) if free[0, 2] not in free[0, :2] else int(free[0, 0])
  want = reference_greedy(lm, logits_fn, params, prompt, prompt_mask, eos_id=eos_id)
  assert (want == eos_id).any()
  greedy = jax.jit(functools.partial(sampling.greedy, lm.lm, max_new_tokens=T, eos_id=eos_id))
  out = greedy(params, prompt, prompt_mask)
  np.testing.assert_array_equal(out.tokens, want, err_msg=kind)
  check_eos_layout(out, eos_id, 0, T)
  np.testing.assert_array_equal(out.sample_logprobs, 0.0)
  # The shared sampler (its own EOS id) in three greedy-equivalent settings.
  want_free = reference_greedy(lm, logits_fn, params, prompt, prompt_mask,
                               eos_id=lm.vocab_size - 1)
  rng = jax.random.key(7)
  for name, knobs in {"temperature 0": (0.0, 0, 1.0), "top_k 1": (1.0, 1, 1.0),
                      "top_p 1e-6": (1.3, 0, 1e-6)}.items():
    got = sampler(params, prompt, prompt_mask, rng, *knobs)
    np.testing.assert_array_equal(got.tokens, np.repeat(want_free, N, axis=0),
                                  err_msg=f"{kind}: {name}")
    # A one-token sampling distribution: every draw has probability 1.
    np.testing.assert_allclose(got.sample_logprobs, 0.0, atol=1e-6)


# ------------------------------------------------------------------ distributions (fixed logits)


class FixedLogitsLM(LanguageModel):
  """A stub model whose next-token logits are always `params["logits"]` [V].

  It counts its decode steps at run time (through a host callback), which shows when the
  sampler's loop stops.
  """

  def __init__(self, vocab_size, num_real_tokens=None):
    self.config = ml_collections.ConfigDict({"num_real_tokens": num_real_tokens})
    self.vocab_size = vocab_size
    self.decode_steps_run = 0
    self.prefill_prompt_shapes = []

  def init(self, rng):
    return {"logits": jnp.zeros((self.vocab_size,))}

  def abstract_params(self):
    return jax.eval_shape(self.init, jax.random.key(0))

  def param_axes(self):
    return {"logits": jax.sharding.PartitionSpec(None)}

  def logits(self, params, batch, *, dropout_rng=None):
    b, t = batch["response"].shape
    return jnp.broadcast_to(params["logits"], (b, t, self.vocab_size))

  def prefill(self, params, prompt, prompt_mask, max_new_tokens):
    self.prefill_prompt_shapes.append(tuple(prompt.shape))
    b = prompt.shape[0]
    return jnp.broadcast_to(params["logits"], (b, self.vocab_size)), {"last": prompt[:, -1]}

  def _count(self):
    self.decode_steps_run += 1

  def decode_step(self, params, cache, token, slot, position, visible):
    jax.debug.callback(self._count)
    return jnp.broadcast_to(params["logits"], (token.shape[0], self.vocab_size)), {"last": token}


STUB_LOGITS = np.array([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 3.0], np.float32)


@pytest.fixture(scope="module")
def stub_sampler():
  # Row 7 is head padding (num_real_tokens = 7): it has the largest logit but must never appear,
  # and as the EOS id it never ends a row, so every row draws all its tokens.
  # 2 x 16000 draws: enough for the chi-square test to reject the closest wrong distribution
  # below (temperature 2.5 for 2.0) with power > 0.999; 8000 gave it a coin flip's chance.
  lm = FixedLogitsLM(8, num_real_tokens=7)
  return lm, sampling.make_sampler(lm, max_new_tokens=2, num_samples=16000, eos_id=7)


@pytest.mark.parametrize("knobs,wrong", [
    ((1.0, 0, 1.0), (1.25, 0, 1.0)),
    ((0.5, 0, 1.0), (1.0, 0, 1.0)),
    ((1.0, 3, 1.0), (1.0, 0, 1.0)),
    ((1.0, 0, 0.7), (1.0, 0, 1.0)),
    ((2.0, 4, 0.8), (2.5, 4, 0.8)),
])
def test_sampled_frequencies_match_the_distribution(stub_sampler, knobs, wrong):
  lm, sampler = stub_sampler
  params = {"logits": jnp.asarray(STUB_LOGITS)}
  prompt = np.ones((1, 3), np.int32)
  out = sampler(params, prompt, np.ones_like(prompt), jax.random.key(11), *knobs)
  tokens = np.asarray(out.tokens).ravel()
  counts = np.bincount(tokens, minlength=8).astype(np.float64)
  masked = np.where(np.arange(8) < 7, STUB_LOGITS, -np.inf)
  probs = reference_probs(masked, *knobs)
  support = probs > 0
  assert counts[~support].sum() == 0, f"tokens outside the kept set: {counts}"
  assert scipy.stats.chisquare(counts[support], probs[support] * counts.sum()).pvalue > 1e-3
  # The same test must reject a deliberately wrong distribution (it has the power to).
  bad = reference_probs(masked, *wrong)
  keep = bad > 0
  expected = bad[keep] / bad[keep].sum() * counts[keep].sum()
  assert scipy.stats.chisquare(counts[keep], expected).pvalue < 1e-3
  # Log-probs of each draw: model (temperature 1, real vocabulary) and sampling distribution.
  np.testing.assert_allclose(np.asarray(out.logprobs).ravel(),
                             np_log_softmax(masked)[tokens], atol=1e-5)
  np.testing.assert_allclose(np.asarray(out.sample_logprobs).ravel(), np.log(probs[tokens]),
                             atol=1e-5)


def test_eos_masks_pads_and_stops_the_loop():
  lm = FixedLogitsLM(6)
  steps, eos_id, pad_id = 8, 2, 5
  sampler = sampling.make_sampler(lm, max_new_tokens=steps, num_samples=6, eos_id=eos_id,
                                  pad_id=pad_id)
  prompt = np.ones((2, 3), np.int32)
  # P(EOS) = 0.1 per step: some rows end early, some are truncated.
  logits = np.log(np.array([0.3, 0.3, 0.1, 0.2, 0.1, 1e-9], np.float32))
  out = sampler({"logits": jnp.asarray(logits)}, prompt, np.ones_like(prompt),
                jax.random.key(0), 1.0, 0, 1.0)
  jax.block_until_ready(out)
  jax.effects_barrier()
  check_eos_layout(out, eos_id, pad_id, steps)
  truncated = np.asarray(out.truncated)
  assert truncated.any() and not truncated.all(), "the seed should give both kinds of rows"
  # The loop ran until the longest row ended: one decode step per token after the first.
  assert lm.decode_steps_run == int(out.length.max()) - 1

  # When every row emits EOS first, no decode step runs at all.
  lm.decode_steps_run = 0
  eos_first = np.where(np.arange(6) == eos_id, 10.0, 0.0).astype(np.float32)
  out = sampler({"logits": jnp.asarray(eos_first)}, prompt, np.ones_like(prompt),
                jax.random.key(0), 0.0, 0, 1.0)
  jax.block_until_ready(out)
  jax.effects_barrier()
  assert lm.decode_steps_run == 0
  np.testing.assert_array_equal(out.length, 1)
  np.testing.assert_array_equal(out.tokens[:, 1:], pad_id)
  assert not np.asarray(out.truncated).any()


# ------------------------------------------------------------------ N samples, compilation, rng


def test_n_samples_share_one_prefill_and_one_compilation(model):
  kind, counting, params, _, sampler = model
  prompt, prompt_mask = make_prompt(counting.vocab_size, seed=2)
  outs = [sampler(params, prompt, prompt_mask, jax.random.key(5), *knobs)
          for knobs in [(1.0, 0, 1.0), (0.6, 0, 1.0), (np.float32(1.5), np.int32(7), 0.9),
                        (jnp.float32(0.0), 0, 1.0)]]
  # One trace for every knob setting, and the prompt batch was prefilled once, with B rows.
  assert counting.prefill_prompt_shapes == [(B, S)], kind
  tokens = np.asarray(outs[0].tokens).reshape(B, N, T)
  for b in range(B):
    assert len({row.tobytes() for row in tokens[b]}) > 1, f"{kind}: prompt {b}'s samples agree"
  assert not np.array_equal(outs[0].tokens, outs[1].tokens)
  # Same rng, same knobs: same samples; another rng: different samples.
  again = sampler(params, prompt, prompt_mask, jax.random.key(5), 1.0, 0, 1.0)
  np.testing.assert_array_equal(again.tokens, outs[0].tokens)
  other = sampler(params, prompt, prompt_mask, jax.random.key(6), 1.0, 0, 1.0)
  assert not np.array_equal(other.tokens, outs[0].tokens)
  assert counting.prefill_prompt_shapes == [(B, S)]


def test_traced_knobs_never_retrace():
  lm = FixedLogitsLM(8)
  params = {"logits": jnp.asarray(STUB_LOGITS)}
  prompt, prompt_mask = make_prompt(lm.vocab_size)
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def jitted(params, prompt, prompt_mask, rng, **knobs):
    return sampling.sample(lm, params, prompt, prompt_mask, rng, max_new_tokens=3,
                           num_samples=2, eos_id=1, **knobs)

  for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.3, 4, 0.5), (0.0, 0, 1.0)]:
    out = jitted(params, prompt, prompt_mask, jax.random.key(0),
                 temperature=jnp.float32(temperature), top_k=jnp.int32(top_k),
                 top_p=jnp.float32(top_p))
    chex.assert_shape(out.tokens, (B * 2, 3))


# ------------------------------------------------------------------ sharding


def test_sharded_sampling_matches_unsharded():
  lm = build(tiny_config("gpt2"))
  params = perturbed_params(lm)
  # B * N = 8 rows; the prompts' 4 rows divide over the 4 devices of ("data", "fsdp").
  prompt, prompt_mask = make_prompt(lm.vocab_size, batch=4, lengths=(6, 4, 1, 3))
  mesh = jax.make_mesh((2, 2, 2), partitioning.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  kwargs = dict(max_new_tokens=T, num_samples=2, eos_id=3)
  want = sampling.make_sampler(lm, **kwargs)(params, prompt, prompt_mask, jax.random.key(9),
                                             0.9, 0, 0.95)
  sharded_params = jax.device_put(
      params, partitioning.shardings_for(lm.param_axes(), lm.abstract_params(), mesh))
  got = sampling.make_sampler(lm, mesh=mesh, **kwargs)(
      sharded_params, prompt, prompt_mask, jax.random.key(9), 0.9, 0, 0.95)
  assert got.tokens.sharding.spec == partitioning.batch_sharding(mesh, 2).spec
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_array_equal(got.mask, want.mask)
  np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)


# ------------------------------------------------------------------ input validation


def test_bad_inputs_fail_with_one_sentence():
  lm = FixedLogitsLM(8)
  params = lm.init(None)
  prompt = np.ones((2, 3), np.int32)
  rng = jax.random.key(0)
  call = functools.partial(sampling.sample, lm, params, prompt, np.ones_like(prompt), rng,
                           max_new_tokens=2, eos_id=1)
  with pytest.raises(ValueError, match="temperature=-1.0 must be a scalar >= 0"):
    call(temperature=-1.0)
  with pytest.raises(ValueError, match="top_k=-2 must be an integer scalar >= 0"):
    call(top_k=-2)
  with pytest.raises(ValueError, match="top_k=2.5 must be an integer"):
    call(top_k=2.5)
  with pytest.raises(ValueError, match=r"top_p=0.0 must be a scalar in \(0, 1\]"):
    call(top_p=0.0)
  with pytest.raises(ValueError, match="num_samples=0 must be a Python int >= 1"):
    call(num_samples=0)
  with pytest.raises(ValueError, match="max_new_tokens=2.0 must be a Python int >= 1"):
    sampling.make_sampler(lm, max_new_tokens=2.0, eos_id=1)
  with pytest.raises(ValueError, match=r"prompt \(2, 3\) and prompt_mask \(2, 4\)"):
    sampling.sample(lm, params, prompt, np.ones((2, 4)), rng, max_new_tokens=2, eos_id=1)
  sampler = sampling.make_sampler(lm, max_new_tokens=2, eos_id=1)
  with pytest.raises(ValueError, match=r"top_p=1.5 must be a scalar in \(0, 1\]"):
    sampler(params, prompt, np.ones_like(prompt), rng, 1.0, 0, 1.5)


def test_filter_logits_keeps_top_k_and_nucleus():
  logits = jnp.asarray([[3.0, 1.0, 2.0, 0.0, -1.0]])
  got = sampling.filter_logits(logits, jnp.int32(2), jnp.float32(1.0))
  np.testing.assert_array_equal(np.isfinite(got[0]), [True, False, True, False, False])
  # Softmax of the logits: ~[.64, .09, .24, .03, .01]: p = 0.7 needs the two largest.
  got = sampling.filter_logits(logits, jnp.int32(0), jnp.float32(0.7))
  np.testing.assert_array_equal(np.isfinite(got[0]), [True, False, True, False, False])
  got = sampling.filter_logits(logits, jnp.int32(0), jnp.float32(0.5))
  np.testing.assert_array_equal(np.isfinite(got[0]), [True, False, False, False, False])
  np.testing.assert_array_equal(got[0, 0], 3.0)


def test_draw_from_probs_is_the_inverse_cdf():
  rng = np.random.default_rng(0)
  probs = rng.random((64, 50)).astype(np.float32) ** 4  # uneven rows
  probs[rng.random(probs.shape) < 0.3] = 0.0  # filtered-out tokens
  probs[:, 0] = 0.0
  probs[:, -5:] = 0.0  # padded head rows at the end
  probs[0, :] = 0.0
  probs[0, 7] = 1e-30  # one tiny positive entry: the only possible draw
  uniform = rng.random(64).astype(np.float32)
  got = np.asarray(sampling.draw_from_probs(jnp.asarray(probs), jnp.asarray(uniform)))
  # NumPy reference in float64: the first token whose running sum exceeds u * total.
  cdf = np.cumsum(probs.astype(np.float64), axis=1)
  want = np.array([np.searchsorted(c, u * c[-1], side="right") for c, u in zip(cdf, uniform)])
  np.testing.assert_array_equal(got, want)
  assert got[0] == 7
  # The ends of [0, 1): u = 0 is the first positive token, the largest float below 1 the last
  # (with no positive probability small enough to fall inside the top 2^-24 of the mass).
  probs = np.where(probs > 0, probs + 0.1, 0.0).astype(np.float32)
  probs[0, 7] = 1.0
  positive = probs > 0
  first = positive.argmax(axis=1)
  last = probs.shape[1] - 1 - positive[:, ::-1].argmax(axis=1)
  for u, expect in ((0.0, first), (np.nextafter(np.float32(1), np.float32(0)), last)):
    got = sampling.draw_from_probs(jnp.asarray(probs), jnp.full((64,), u, jnp.float32))
    np.testing.assert_array_equal(got, expect, err_msg=f"u={u}")


def test_draw_from_probs_never_returns_a_zero_probability_token():
  # Many tiny probabilities after a large one: float32 running sums stop growing there, so a
  # naive "count of cdf <= u" could land on the zero entries between and after them.
  probs = np.zeros((1, 4096), np.float32)
  probs[0, 0] = 1.0
  probs[0, 1::2] = 1e-9
  # Half spread over [0, 1), half the 2048 largest floats below 1: the tail where the draw
  # lands among the tiny probabilities (they hold the top ~2e-6 of the mass).
  tail = np.float32(1) - np.arange(1, 2049, dtype=np.float32) * np.float32(2.0 ** -24)
  uniform = np.concatenate([np.linspace(0.0, 1.0, 2048, endpoint=False, dtype=np.float32), tail])
  got = np.asarray(sampling.draw_from_probs(jnp.broadcast_to(jnp.asarray(probs), (4096, 4096)),
                                            jnp.asarray(uniform)))
  assert (probs[0, got] > 0).all(), np.unique(got[probs[0, got] == 0])
  assert (got[:2048] == 0).all()  # token 0 holds all but ~2e-6 of the mass
  assert (got[2048:] > 0).sum() > 0  # the tail does reach the tiny tokens
