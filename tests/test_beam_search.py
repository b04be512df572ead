"""Tests for jaxsi.beam_search: greedy at beam size 1, exhaustive search on a 6-token vocabulary."""

import functools
import itertools

import jax
import numpy as np
import pytest

from jaxsi import beam_search as beam_lib
from jaxsi import sampling
from jaxsi.models import build, decoder, t5

S, T = 4, 3


def tiny_lm(kind, vocab, num_real=None):
  if kind == "t5":
    cfg = t5.preset("t5_tiny")
    cfg.update(vocab_size=vocab, d_model=32, head_dim=8, d_ff=64)
  else:
    cfg = decoder.default_config(kind)
    cfg.update(vocab_size=vocab, d_model=32, num_layers=2, num_heads=4,
               num_kv_heads=4 if kind == "gpt2" else 2, head_dim=8, d_ff=64, max_len=32)
  cfg.num_real_tokens = num_real
  lm = build(cfg)
  # Perturbed so that biases and norms matter; at this scale the next-token distributions are
  # flat enough that greedy is not optimal on these prompts.
  leaves, treedef = jax.tree.flatten(lm.init(jax.random.key(0)))
  rng = np.random.default_rng(1)
  params = jax.tree.unflatten(
      treedef, [x + 0.1 * rng.normal(size=x.shape).astype(np.float32) for x in leaves])
  return lm, params


def prompts(vocab, batch=2):
  prompt = np.random.default_rng(2).integers(1, vocab, (batch, S)).astype(np.int32)
  mask = np.ones_like(prompt)
  mask[1, :2] = 0
  return prompt * mask, mask


@functools.lru_cache(maxsize=None)
def beam_fn(lm, beam_size, eos_id):
  """Jitted beam search with a traced length penalty: one compilation per (model, beam size)."""
  return jax.jit(lambda params, prompt, prompt_mask, alpha: beam_lib.beam_search(
      lm, params, prompt, prompt_mask, beam_size=beam_size, max_new_tokens=T, eos_id=eos_id,
      length_penalty=alpha))


def run_beam(lm, params, prompt, prompt_mask, *, beam_size, eos_id, length_penalty):
  out = beam_fn(lm, beam_size, eos_id)(params, prompt, prompt_mask, np.float32(length_penalty))
  return jax.tree.map(np.asarray, out)


@functools.lru_cache(maxsize=None)
def cached_lm(kind, vocab, num_real=None):
  return tiny_lm(kind, vocab, num_real)


def exhaustive(lm, params, prompt, prompt_mask, *, eos_id, alpha):
  """Best hypothesis per prompt over every sequence of length <= T, by brute force in NumPy.

  A hypothesis ends with its first EOS (counted in its length) or has T tokens and no EOS; its
  score is log p / ((5 + length) / 6) ** alpha.

  Returns:
    (best tokens [B, T] padded with 0, best scores [B], {prompt: {hypothesis: score}}).
  """
  real = sampling.num_real_tokens(lm) or lm.vocab_size
  responses = np.array(list(itertools.product(range(real), repeat=T)), np.int32)  # [M, T]
  batch = prompt.shape[0]
  m = responses.shape[0]
  logits = np.asarray(jax.jit(lm.logits)(params, dict(
      prompt=np.repeat(prompt, m, axis=0), prompt_mask=np.repeat(prompt_mask, m, axis=0),
      response=np.tile(responses, (batch, 1)))), np.float64).reshape(batch, m, T, -1)
  logits = logits[..., :real]
  logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  best_tokens = np.zeros((batch, T), np.int32)
  best_scores = np.full(batch, -np.inf)
  table = []
  for b in range(batch):
    scores = {}
    for i, response in enumerate(responses):
      eos_at = np.flatnonzero(response == eos_id)
      length = eos_at[0] + 1 if eos_at.size else T
      hypothesis = tuple(response[:length])
      logp = logprobs[b, i, np.arange(length), response[:length]].sum()
      scores[hypothesis] = logp / ((5 + length) / 6) ** alpha
    hypothesis, score = max(scores.items(), key=lambda kv: kv[1])
    best_tokens[b, :len(hypothesis)] = hypothesis
    best_scores[b] = score
    table.append(scores)
  return best_tokens, best_scores, table


@pytest.mark.parametrize("kind,num_real,alpha", [("gpt2", 5, 0.6), ("gpt2", 5, 0.0),
                                                 ("t5", None, 0.6)])
def test_wide_beam_equals_exhaustive_search(kind, num_real, alpha):
  lm, params = cached_lm(kind, 6, num_real)
  prompt, prompt_mask = prompts(6, batch=4)
  eos_id = 2
  want_tokens, want_scores, table = exhaustive(lm, params, prompt, prompt_mask, eos_id=eos_id,
                                               alpha=alpha)
  # Beam size 36 >= V ** (T - 1): every prefix survives, so the search is exhaustive.
  got = run_beam(lm, params, prompt, prompt_mask, beam_size=36, eos_id=eos_id,
                 length_penalty=alpha)
  np.testing.assert_allclose(got.scores, want_scores, atol=1e-5)
  np.testing.assert_array_equal(got.tokens, want_tokens)
  np.testing.assert_array_equal(got.mask, want_tokens_mask(want_tokens, eos_id))
  # Narrower beams return a real hypothesis, scored correctly, never above the optimum.
  greedy_scores = None
  for beam_size in (1, 2):
    out = run_beam(lm, params, prompt, prompt_mask, beam_size=beam_size, eos_id=eos_id,
                   length_penalty=alpha)
    for b in range(prompt.shape[0]):
      hypothesis = tuple(out.tokens[b, :out.mask[b].sum()])
      np.testing.assert_allclose(out.scores[b], table[b][hypothesis], atol=1e-5)
      assert out.scores[b] <= want_scores[b] + 1e-6
    if beam_size == 1:
      greedy_scores = out.scores
  # The search is worth something: the optimum beats greedy on some prompt here.
  assert (want_scores > greedy_scores + 1e-4).any()


def want_tokens_mask(tokens, eos_id):
  mask = np.ones_like(tokens)
  for b, row in enumerate(tokens):
    eos_at = np.flatnonzero(row == eos_id)
    if eos_at.size:
      mask[b, eos_at[0] + 1:] = 0
  return mask


@pytest.mark.parametrize("kind", ["gpt2", "llama", "t5"])
def test_beam_size_one_equals_greedy(kind):
  lm, params = tiny_lm(kind, vocab=32)
  prompt, prompt_mask = prompts(32, batch=3)
  steps = 5
  # Row 0's greedy first token as EOS: row 0 ends at once while the others (likely) go on.
  first_logits, _ = lm.prefill(params, prompt, prompt_mask, steps)
  eos_id = int(np.argmax(first_logits[0]))
  want = jax.jit(functools.partial(sampling.greedy, lm, max_new_tokens=steps, eos_id=eos_id))(
      params, prompt, prompt_mask)
  assert (np.asarray(want.length) > 1).any()
  got = jax.jit(functools.partial(beam_lib.beam_search, lm, beam_size=1, max_new_tokens=steps,
                                  eos_id=eos_id, length_penalty=0.6))(params, prompt, prompt_mask)
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_array_equal(got.mask, want.mask)
  length = np.asarray(want.mask).sum(1)
  np.testing.assert_allclose(got.scores, np.asarray(want.logprobs).sum(1)
                             / ((5 + length) / 6) ** 0.6, atol=1e-5)


def test_bad_arguments_fail_with_one_sentence():
  lm = build(decoder.default_config("gpt2").copy_and_resolve_references())
  lm.vocab_size = 6  # validation runs before the model is touched: no parameters needed
  prompt, prompt_mask = prompts(6)
  call = functools.partial(beam_lib.beam_search, lm, None, prompt, prompt_mask,
                           max_new_tokens=2)
  with pytest.raises(ValueError, match="beam_size=0 must be a Python int >= 1"):
    call(beam_size=0, eos_id=1)
  with pytest.raises(ValueError, match=r"eos_id=6 must be an int in \[0, vocab_size=6\)"):
    call(beam_size=2, eos_id=6)
  with pytest.raises(ValueError, match="length_penalty=nan must be a finite scalar"):
    call(beam_size=2, eos_id=1, length_penalty=float("nan"))
