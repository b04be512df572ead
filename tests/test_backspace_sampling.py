"""Backspace sampling (SequenceMatch): materialized text, the training layout, the prompt."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from jaxsi import partitioning, sampling
from jaxsi.models import build, decoder, t5

from delegating_lm import DelegatingLM  # tests/delegating_lm.py
from jaxsi.objectives import sequencematch as sm

B, S, N, T = 3, 6, 2, 5     # prompts, prompt width, samples per prompt, max_new_tokens
L = 2 * T                   # the default max_actions
R = B * N
EOS = 2
PROMPT_LENGTHS = (6, 4, 1)


@functools.lru_cache(maxsize=None)
def tiny_lm(kind):
  if kind == "t5":
    cfg = t5.preset("t5_tiny")  # vocab 128
    cfg.num_real_tokens = 120
  else:
    cfg = decoder.default_config(kind)
    cfg.update(vocab_size=64, d_model=32, num_layers=2, num_heads=4,
               num_kv_heads=4 if kind == "gpt2" else 2, head_dim=8, d_ff=64, max_len=32,
               num_real_tokens=56)
  lm = build(cfg)
  leaves, treedef = jax.tree.flatten(lm.init(jax.random.key(0)))
  rng = np.random.default_rng(0)
  # Perturbed so that biases and norms matter too.
  params = jax.tree.unflatten(
      treedef, [x + 0.1 * rng.normal(size=x.shape).astype(np.float32) for x in leaves])
  return lm, params, cfg.num_real_tokens - 1  # <bksp> = the last real id


def make_prompt(vocab):
  rng = np.random.default_rng(0)
  prompt = rng.integers(3, vocab, (B, S)).astype(np.int32)
  mask = (np.arange(S)[None, :] >= (S - np.asarray(PROMPT_LENGTHS))[:, None]).astype(np.int32)
  return prompt * mask, mask


def materialize(actions, backspace_id, eos_id=EOS, max_new_tokens=T, max_actions=L):
  """NumPy reference: (the actions a row takes, its kept tokens, whether it ended with EOS)."""
  taken, stack = [], []
  for action in actions[:max_actions]:
    taken.append(int(action))
    if action == backspace_id:
      stack = stack[:-1]
      continue
    stack.append(int(action))
    if action == eos_id:
      return taken, stack, True
    if len(stack) == max_new_tokens:
      break
  return taken, stack, False


@pytest.fixture(scope="module", params=["gpt2", "t5"])
def model(request):
  lm, params, backspace_id = tiny_lm(request.param)
  run = jax.jit(lambda params, prompt, mask, rng, forced: sampling.sample(
      lm, params, prompt, mask, rng, max_new_tokens=T, num_samples=N, eos_id=EOS,
      backspace_id=backspace_id, forced_actions=forced, return_logits=True))
  return request.param, lm, params, backspace_id, run


def forced_rows(backspace_id, vocab, seed=0):
  """Rows of forced actions (-1 = sampled) covering backspace runs, the boundary and caps."""
  k = backspace_id
  rng = np.random.default_rng(seed)
  forced = np.full((R, L), -1, np.int32)
  forced[0, :9] = [5, 6, k, 7, k, k, k, 13, EOS]  # undo 6, 7, 5, a no-op at the prompt
  forced[1, :8] = [k, k, 9, k, k, 11, 12, EOS]   # backspaces at the prompt boundary
  forced[2] = [4, k, 4, k, 4, k, 4, k, 4, k]     # never settles: capped by max_actions
  forced[3, :6] = [8, 9, k, 10, EOS, 12]         # ends at EOS; the 12 is never taken
  forced[4, :] = rng.integers(3, vocab, L)       # random tokens and backspaces
  forced[4, rng.random(L) < 0.4] = k
  # row 5: sampled freely
  return forced


def test_forced_actions_give_the_expected_materialized_text(model):
  kind, lm, params, backspace_id, run = model
  prompt, prompt_mask = make_prompt(50)
  forced = forced_rows(backspace_id, 50)
  out = run(params, prompt, prompt_mask, jax.random.key(1), forced)
  actions, actions_mask = np.asarray(out.actions), np.asarray(out.actions_mask)
  tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
  assert actions.shape == actions_mask.shape == (R, L) and tokens.shape == (R, T)
  for row in range(R):
    source = actions[row] if row == R - 1 else forced[row]
    taken, kept, ended = materialize(source, backspace_id)
    n = len(taken)
    np.testing.assert_array_equal(actions_mask[row], np.arange(L) < n, err_msg=f"{kind} {row}")
    np.testing.assert_array_equal(actions[row, :n], taken, err_msg=f"{kind} row {row}")
    assert (actions[row, n:] == 0).all()
    np.testing.assert_array_equal(tokens[row, :len(kept)], kept, err_msg=f"{kind} row {row}")
    np.testing.assert_array_equal(mask[row], np.arange(T) < len(kept))
    assert (tokens[row, len(kept):] == 0).all()
    assert int(out.length[row]) == len(kept) and bool(out.truncated[row]) == (not ended)
  # The hand-made rows, spelled out.
  assert tokens[0].tolist() == [13, EOS, 0, 0, 0] and not out.truncated[0]
  assert tokens[1].tolist() == [11, 12, EOS, 0, 0] and actions_mask[1].sum() == 8
  assert int(out.length[2]) == 0 and actions_mask[2].sum() == L and out.truncated[2]
  assert tokens[3, :3].tolist() == [8, 10, EOS] and not out.truncated[3]
  # Prompts are returned untouched, repeated per sample.
  np.testing.assert_array_equal(out.prompt, np.repeat(prompt, N, axis=0))
  np.testing.assert_array_equal(out.prompt_mask, np.repeat(prompt_mask, N, axis=0))


def test_step_logits_equal_the_one_pass_training_layout(model):
  kind, lm, params, backspace_id, run = model
  prompt, prompt_mask = make_prompt(50)
  forced = forced_rows(backspace_id, 50, seed=1)
  out = run(params, prompt, prompt_mask, jax.random.key(2), forced)
  layout = sm.preprocess_actions(out.actions, backspace_id, actions_mask_BxL=out.actions_mask,
                                 boundary_token=sm.boundary_tokens(lm, out.prompt))
  logits = np.asarray(jax.jit(lm.logits)(params, dict(layout, prompt=out.prompt,
                                                      prompt_mask=out.prompt_mask)))
  assert logits.shape[1] == L + 1
  real = lm.config.num_real_tokens
  live = np.asarray(out.actions_mask) > 0
  got = np.asarray(out.action_logits)[..., :real]
  np.testing.assert_allclose(got[live], logits[:, :L, :real][live], atol=1e-5, rtol=0,
                             err_msg=kind)
  # Padded head rows are never drawn from.
  assert np.isneginf(np.asarray(out.action_logits)[live][:, real:]).all()
  assert (np.asarray(out.actions) < real).all()


def test_backspace_never_deletes_the_prompt(model):
  kind, lm, params, backspace_id, run = model
  k = backspace_id
  prompt, prompt_mask = make_prompt(50)
  forced = np.full((R, L), k, np.int32)          # nothing but backspaces ...
  forced[:, 3] = 7                               # ... around one token
  out = run(params, prompt, prompt_mask, jax.random.key(3), forced)
  assert (np.asarray(out.length) == 0).all() and (np.asarray(out.tokens) == 0).all()
  assert np.asarray(out.truncated).all() and (np.asarray(out.actions_mask) == 1).all()
  logits = np.asarray(out.action_logits)
  real = lm.config.num_real_tokens
  # Every state but the one right after the 7 is "the prompt alone": the prefill's logits.
  for step in (1, 2, 3, 5, 6, L - 1):
    np.testing.assert_allclose(logits[:, step, :real], logits[:, 0, :real], atol=1e-5,
                               err_msg=f"{kind} step {step}")
  assert np.abs(logits[:, 4, :real] - logits[:, 0, :real]).max() > 1e-3


class FavoursBackspace(DelegatingLM):
  """Delegates to a real model and adds 3 to the <bksp> logit, so samples backspace often."""

  def __init__(self, lm, backspace_id):
    super().__init__(lm)
    self.bias = jnp.zeros((lm.vocab_size,)).at[backspace_id].set(3.0)

  def logits(self, params, batch, *, dropout_rng=None):
    return super().logits(params, batch, dropout_rng=dropout_rng) + self.bias

  def prefill(self, params, prompt, prompt_mask, max_new_tokens):
    logits, cache = self.lm.prefill(params, prompt, prompt_mask, max_new_tokens)
    return logits + self.bias, cache

  def decode_step(self, params, cache, token, slot, position, visible):
    logits, cache = self.lm.decode_step(params, cache, token, slot, position, visible)
    return logits + self.bias, cache


def test_sampled_backspaces_follow_the_stack():
  """Freely sampled backspaces: the text is what the stack keeps, the draw is reproducible."""
  base, params, backspace_id = tiny_lm("gpt2")
  lm = FavoursBackspace(base, backspace_id)
  prompt, prompt_mask = make_prompt(50)
  sampler = sampling.make_sampler(lm, max_new_tokens=T, num_samples=N, eos_id=EOS,
                                  backspace_id=backspace_id)
  out = sampler(params, prompt, prompt_mask, jax.random.key(4), 1.0, 0, 1.0)
  actions, actions_mask = np.asarray(out.actions), np.asarray(out.actions_mask)
  assert (actions[actions_mask > 0] == backspace_id).any()
  for row in range(R):
    taken, kept, ended = materialize(actions[row][actions_mask[row] > 0], backspace_id)
    np.testing.assert_array_equal(np.asarray(out.tokens)[row, :len(kept)], kept)
    assert int(out.length[row]) == len(kept) and bool(out.truncated[row]) == (not ended)
    assert len(taken) == actions_mask[row].sum()
  # Same key, same samples.
  again = sampler(params, prompt, prompt_mask, jax.random.key(4), 1.0, 0, 1.0)
  np.testing.assert_array_equal(again.actions, out.actions)


def test_sharded_backspace_sampling_matches_unsharded():
  lm, params, backspace_id = tiny_lm("gpt2")
  prompt, prompt_mask = make_prompt(50)
  prompt, prompt_mask = np.concatenate([prompt, prompt[:1]]), np.concatenate(
      [prompt_mask, prompt_mask[:1]])  # 4 prompts x 2 samples: 8 rows over 4 batch shards
  mesh = jax.make_mesh((2, 2, 2), partitioning.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  kwargs = dict(max_new_tokens=T, num_samples=2, eos_id=EOS, backspace_id=backspace_id,
                max_actions=7)
  want = sampling.make_sampler(lm, **kwargs)(params, prompt, prompt_mask, jax.random.key(9),
                                             3.0, 0, 1.0)
  sharded = jax.device_put(
      params, partitioning.shardings_for(lm.param_axes(), lm.abstract_params(), mesh))
  got = sampling.make_sampler(lm, mesh=mesh, **kwargs)(sharded, prompt, prompt_mask,
                                                        jax.random.key(9), 3.0, 0, 1.0)
  assert got.actions.shape == (8, 7)
  for field in ("actions", "actions_mask", "tokens", "mask", "length", "truncated"):
    np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)
  np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(backspace_id=EOS), r"backspace_id=2 must be .* other than eos_id=2"),
    (dict(backspace_id=60), r"backspace_id=60 must be a Python int in \[0, 56\)"),
    (dict(max_actions=4), "max_actions=4 only applies to backspace sampling"),
    (dict(backspace_id=55, max_actions=0), "max_actions=0 must be a Python int >= 1"),
    (dict(return_logits=True), "backspace-sampler aids"),
])
def test_bad_backspace_arguments_fail_in_one_sentence(kwargs, message):
  lm, params, _ = tiny_lm("gpt2")
  prompt, prompt_mask = make_prompt(50)
  with pytest.raises(ValueError, match=message):
    sampling.sample(lm, params, prompt, prompt_mask, jax.random.key(0), max_new_tokens=3,
                    eos_id=EOS, **kwargs)


def test_forced_actions_of_the_wrong_shape_are_rejected():
  lm, params, backspace_id = tiny_lm("gpt2")
  prompt, prompt_mask = make_prompt(50)
  with pytest.raises(ValueError, match=r"forced_actions has shape \(3, 4\); expected \(3, 6\)"):
    sampling.sample(lm, params, prompt, prompt_mask, jax.random.key(0), max_new_tokens=3,
                    eos_id=EOS, backspace_id=backspace_id, forced_actions=jnp.zeros((3, 4)))
