"""Tests for jaxsi.objectives.sequencematch: the backspace layout, noise, schedule and loss."""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxsi import objectives
from jaxsi.models import build, decoder, t5
from jaxsi.objectives import sequencematch as sm

VOCAB = 32
BKSP = VOCAB - 1
EOS = 1

# ----------------------------------------------------------------------------- the stack walk


def test_stack_walk_hand_example():
  # 5 6 <b> 7 <b> <b> <b> 8: undo 6, undo 7, undo 5 (back at the prompt), a no-op at the prompt
  # boundary, then 8.
  b = BKSP
  out = sm.preprocess_actions(np.array([[5, 6, b, 7, b, b, b, 8]]), b, boundary_token=99)
  np.testing.assert_array_equal(out["response"], [[5, 6, 5, 7, 5, 99, 99, 8, 0]])
  np.testing.assert_array_equal(out["response_positions"], [[0, 1, 0, 1, 0, -1, -1, 0, 0]])
  np.testing.assert_array_equal(out["targets"], [[5, 6, b, 7, b, b, b, 8, 0]])
  np.testing.assert_array_equal(out["response_mask"], [[1, 1, 1, 1, 1, 1, 1, 1, 0]])
  np.testing.assert_array_equal(out["loss_mask"], [[1, 1, 1, 1, 1, 1, 1, 1, 0]])
  visible_rows = [[0], [0, 1], [2], [2, 3], [4], [], [], [7], [8]]
  expected = np.zeros((1, 9, 9), bool)
  for i, row in enumerate(visible_rows):
    expected[0, i, row] = True
  np.testing.assert_array_equal(out["response_visibility"], expected)
  assert out["response_visibility"].dtype == jnp.bool_


def test_stack_walk_masks_and_per_row_boundary():
  b = BKSP
  actions = np.array([[b, 3, 4, b, b, 9, 9], [2, 3, 4, 5, 9, 9, 9]])
  mask = np.array([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 1, 1]])  # row 1: prefix of 4 only
  loss_mask = np.array([[1, 1, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
  out = sm.preprocess_actions(actions, b, pad_id=7, actions_mask_BxL=mask,
                              loss_mask_BxL=loss_mask, boundary_token=np.array([40, 41]))
  np.testing.assert_array_equal(out["response"], [[40, 3, 4, 3, 40, 7, 7, 7],
                                                  [2, 3, 4, 5, 7, 7, 7, 7]])
  np.testing.assert_array_equal(out["response_positions"], [[-1, 0, 1, 0, -1, 0, 0, 0],
                                                            [0, 1, 2, 3, 0, 0, 0, 0]])
  np.testing.assert_array_equal(out["targets"], [[b, 3, 4, b, b, 7, 7, 7],
                                                 [2, 3, 4, 5, 7, 7, 7, 7]])
  np.testing.assert_array_equal(out["response_mask"], [[1, 1, 1, 1, 1, 0, 0, 0],
                                                       [1, 1, 1, 1, 0, 0, 0, 0]])
  np.testing.assert_array_equal(out["loss_mask"], [[1, 1, 0, 1, 1, 0, 0, 0],
                                                   [1, 1, 1, 1, 0, 0, 0, 0]])
  vis = np.asarray(out["response_visibility"])
  expected0 = [[], [1], [1, 2], [3], [], [5], [6], [7]]
  expected1 = [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3], [4], [5], [6], [7]]
  for row, expected in ((0, expected0), (1, expected1)):
    for i, cols in enumerate(expected):
      assert sorted(np.flatnonzero(vis[row, i])) == cols, (row, i)


def test_preprocess_under_jit_matches_host():
  actions = np.random.default_rng(0).integers(0, VOCAB, (3, 9)).astype(np.int32)
  host = sm.preprocess_actions(actions, BKSP, boundary_token=5)
  traced = jax.jit(lambda a: sm.preprocess_actions(a, BKSP, boundary_token=5))(actions)
  chex.assert_trees_all_equal(host, traced)


def test_preprocess_rejects_bad_shapes():
  with pytest.raises(ValueError, match=r"expected \[B, L\]"):
    sm.preprocess_actions(np.zeros(4, np.int32), BKSP)
  with pytest.raises(ValueError, match="actions_mask has shape"):
    sm.preprocess_actions(np.zeros((2, 4), np.int32), BKSP, actions_mask_BxL=np.ones((2, 3)))
  with pytest.raises(ValueError, match="integer token ids"):
    sm.preprocess_actions(np.zeros((2, 4), np.float32), BKSP)


# ------------------------------------------------- one pass equals per-state recomputation

B, S, L = 3, 5, 10


def random_actions(seed):
  """Rows with backspaces, including at the prompt boundary and in runs, and some padding."""
  rng = np.random.default_rng(seed)
  actions = rng.integers(2, VOCAB - 1, (B, L)).astype(np.int32)
  actions[rng.random((B, L)) < 0.35] = BKSP
  actions[0, :3] = [BKSP, 4, BKSP]             # no-op at the boundary, then back to the prompt
  actions[1, 3:7] = [BKSP, BKSP, BKSP, BKSP]   # a run that empties the response and beyond
  lengths = np.array([L, L - 3, 6])
  mask = (np.arange(L)[None, :] < lengths[:, None]).astype(np.int32)
  return actions, mask


def materialized_states(actions_row, n):
  """The token list after each of the first n actions (index 0 = before any action)."""
  states, state = [[]], []
  for a in actions_row[:n]:
    state = state[:-1] if a == BKSP else state + [int(a)]
    states.append(list(state))
  return states


LM_KEYS = ("prompt", "prompt_mask", "response", "response_mask", "response_positions",
           "response_visibility")


def per_state_batch(prompt, prompt_mask, actions, mask):
  """Reference rows: each state of each row materialized as a plain causal response.

  Returns the batch (a fixed B * (L + 1) rows, so one compiled shape serves every seed) and,
  per reference row, (source row b, action count j, state length): the reference row's logits
  at the state length are the model's next-action distribution in state s_j of row b.
  """
  index, states = [], []
  for b in range(B):
    for j, state in enumerate(materialized_states(actions[b], int(mask[b].sum()))):
      index.append((b, j, len(state)))
      states.append(state)
  rows = [b for b, _, _ in index] + [0] * (B * (L + 1) - len(index))
  response = np.zeros((len(rows), L + 1), np.int32)
  for i, state in enumerate(states):
    response[i, :len(state)] = state
  batch = dict(prompt=prompt[rows], prompt_mask=prompt_mask[rows], response=response,
               response_mask=np.ones_like(response),
               response_positions=np.broadcast_to(np.arange(L + 1, dtype=np.int32),
                                                  response.shape),
               response_visibility=np.broadcast_to(np.tril(np.ones((L + 1, L + 1), bool)),
                                                   (len(rows), L + 1, L + 1)))
  return batch, index


def concat_rows(*batches):
  return {k: np.concatenate([np.asarray(x[k]).astype(np.asarray(batches[-1][k]).dtype)
                             for x in batches]) for k in LM_KEYS}


def tiny_lm(kind):
  if kind == "t5":
    cfg = t5.preset("t5_tiny")
    cfg.update(vocab_size=VOCAB, num_layers=1, num_decoder_layers=2, dropout_rate=0.0,
               relative_attention_num_buckets=8, relative_attention_max_distance=16)
  else:
    cfg = decoder.default_config(kind)
    cfg.update(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4,
               num_kv_heads=4 if kind == "gpt2" else 2, head_dim=8, d_ff=64, max_len=32)
  lm = build(cfg)
  params = lm.init(jax.random.key(1))
  # Perturb every leaf so that zero biases or unit norms cannot hide a layout bug.
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(2)
  leaves = [x + 0.1 * rng.normal(size=x.shape).astype(np.float32) for x in leaves]
  return lm, jax.tree.unflatten(treedef, leaves)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "t5"])
def test_one_pass_logits_equal_per_state_recomputation(kind):
  lm, params = tiny_lm(kind)
  logits_fn = jax.jit(lm.logits)
  for seed in range(3):
    rng = np.random.default_rng(100 + seed)
    prompt = rng.integers(2, VOCAB - 1, (B, S)).astype(np.int32)
    prompt_mask = (np.arange(S)[None, :] >= S - np.array([[5], [3], [1]])).astype(np.int32)
    actions, mask = random_actions(seed)
    layout = sm.preprocess_actions(actions, BKSP, actions_mask_BxL=mask,
                                   boundary_token=sm.boundary_tokens(lm, prompt))
    assert (np.asarray(layout["response_positions"]) == -1).any()  # the boundary case is hit
    one_pass_batch = dict(layout, prompt=prompt, prompt_mask=prompt_mask)
    reference_batch, index = per_state_batch(prompt, prompt_mask, actions, mask)
    # One call computes both (the rows do not interact), so one compilation serves all seeds.
    logits = np.asarray(logits_fn(params, concat_rows(one_pass_batch, reference_batch)))
    one_pass, reference = logits[:B], logits[B:]
    for i, (b, j, length) in enumerate(index):
      np.testing.assert_allclose(one_pass[b, j], reference[i, length], atol=1e-5, rtol=0,
                                 err_msg=f"{kind} seed {seed} row {b} state {j}")
    assert len(index) == mask.sum() + B  # states 0 .. n of every row were compared
    # The loss function writes the boundary token itself: any id there gives the same logits.
    unfilled = dict(sm.preprocess_actions(actions, BKSP, actions_mask_BxL=mask), prompt=prompt,
                    prompt_mask=prompt_mask)
    refilled = np.asarray(logits_fn(
        params, concat_rows(sm.fill_boundary_tokens(lm, unfilled), reference_batch)))
    np.testing.assert_array_equal(refilled[:B], one_pass)


# ----------------------------------------------------------------------------- noise


def test_noise_rates_masks_and_backspace_targets():
  rows, width = 300, 12
  actions = np.random.default_rng(0).integers(2, 20, (rows, width)).astype(np.int32)
  lengths = np.random.default_rng(1).integers(1, width + 1, rows)
  mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int32)
  p = 0.2
  out = sm.augment_with_noise(jax.random.key(3), actions, mask, noise_prob=p, backspace_id=BKSP,
                              vocab_size=VOCAB, max_len=3 * width, eos_id=EOS)
  acts, out_mask, loss_mask = (np.asarray(out[k]) for k in ("actions", "mask", "loss_mask"))
  assert not np.asarray(out["truncated"]).any()  # 3x width always fits
  inserted = 0
  for r in range(rows):
    n = int(out_mask[r].sum())
    assert out_mask[r, :n].all() and not out_mask[r, n:].any()
    seq, lm_row = acts[r, :n], loss_mask[r, :n]
    noise_slots = np.flatnonzero(lm_row == 0)
    # Every masked slot is a noise token followed by <bksp> (the target after the noise).
    assert (seq[noise_slots + 1] == BKSP).all()
    assert np.flatnonzero(seq == BKSP).tolist() == (noise_slots + 1).tolist()
    assert not np.isin(seq[noise_slots], [BKSP, EOS]).any()
    assert ((seq[noise_slots] >= 0) & (seq[noise_slots] < VOCAB)).all()
    # Dropping the pairs gives back the original actions, in order.
    keep = np.ones(n, bool)
    keep[noise_slots] = keep[noise_slots + 1] = False
    np.testing.assert_array_equal(seq[keep], actions[r, :lengths[r]])
    assert n == lengths[r] + 2 * len(noise_slots)
    inserted += len(noise_slots)
    assert (loss_mask[r, n:] == 0).all() and (acts[r, n:] == 0).all()
  total = lengths.sum()
  rate = inserted / total
  assert abs(rate - p) < 4 * np.sqrt(p * (1 - p) / total), rate  # binomial, 4 sigma
  # Noise ids cover the vocabulary except <bksp> and EOS.
  noise_ids = acts[(loss_mask == 0) & (out_mask == 1)]
  assert set(np.unique(noise_ids)) == set(range(VOCAB)) - {BKSP, EOS}


def test_noise_is_deterministic_per_rng_and_truncates():
  actions = np.arange(2, 10, dtype=np.int32)[None].repeat(6, 0)
  mask = np.ones_like(actions)
  kwargs = dict(noise_prob=0.3, backspace_id=BKSP, vocab_size=VOCAB)
  first = sm.augment_with_noise(jax.random.key(7), actions, mask, max_len=10, **kwargs)
  again = sm.augment_with_noise(jax.random.key(7), actions, mask, max_len=10, **kwargs)
  other = sm.augment_with_noise(jax.random.key(8), actions, mask, max_len=10, **kwargs)
  chex.assert_trees_all_equal(first, again)
  assert not np.array_equal(first["actions"], other["actions"])
  # The draws do not depend on the width: a wide output shows what the narrow one cut off.
  wide = sm.augment_with_noise(jax.random.key(7), actions, mask, max_len=30, **kwargs)
  for key in ("actions", "mask", "loss_mask"):
    np.testing.assert_array_equal(first[key], np.asarray(wide[key])[:, :10])
  wide_length = np.asarray(wide["mask"]).sum(1)
  np.testing.assert_array_equal(first["truncated"], wide_length > 10)
  assert np.asarray(first["truncated"]).any() and not np.asarray(first["truncated"]).all()
  none = sm.augment_with_noise(jax.random.key(7), actions, mask, max_len=10,
                               **dict(kwargs, noise_prob=0.0))
  np.testing.assert_array_equal(none["actions"], np.pad(actions, ((0, 0), (0, 2))))
  np.testing.assert_array_equal(none["loss_mask"], np.pad(mask, ((0, 0), (0, 2))))


def test_task_noise_and_bad_arguments():
  actions = np.array([[3, 4, 5]], np.int32)

  def wrong_digit(rng, acts, mask):
    del rng, mask
    return (acts + 1) % 10

  out = sm.augment_with_noise(jax.random.key(0), actions, np.ones_like(actions),
                              noise_prob=0.999, backspace_id=BKSP, vocab_size=VOCAB, max_len=9,
                              noise="task", task_noise_fn=wrong_digit)
  np.testing.assert_array_equal(out["actions"], [[4, BKSP, 3, 5, BKSP, 4, 6, BKSP, 5]])
  np.testing.assert_array_equal(out["loss_mask"], [[0, 1, 1, 0, 1, 1, 0, 1, 1]])
  with pytest.raises(ValueError, match="task_noise_fn"):
    sm.augment_with_noise(jax.random.key(0), actions, np.ones_like(actions), noise_prob=0.1,
                          backspace_id=BKSP, vocab_size=VOCAB, max_len=9, noise="task")
  with pytest.raises(ValueError, match="noise_prob=1.0"):
    sm.augment_with_noise(jax.random.key(0), actions, np.ones_like(actions), noise_prob=1.0,
                          backspace_id=BKSP, vocab_size=VOCAB, max_len=9)


# ----------------------------------------------------------------------------- schedule


def test_sm_weight_schedule():
  beta = lambda s: float(sm.sm_weight(s, bc_steps=100, anneal_steps=2000, beta_end=0.2))
  assert beta(0) == 1.0 and beta(99) == 1.0 and beta(100) == 1.0
  np.testing.assert_allclose(beta(1100), 0.6, atol=1e-6)
  np.testing.assert_allclose(beta(600), 1.0 - 0.8 * 0.25, atol=1e-6)
  np.testing.assert_allclose(beta(2100), 0.2, atol=1e-6)
  np.testing.assert_allclose(beta(10 ** 6), 0.2, atol=1e-6)
  assert float(sm.sm_weight(jnp.int32(5), bc_steps=5, anneal_steps=0, beta_end=0.3)) == \
      pytest.approx(0.3)
  assert float(sm.sm_weight(4, bc_steps=5, anneal_steps=0)) == 1.0
  traced = jax.jit(lambda s: sm.sm_weight(s, bc_steps=10))(jnp.int32(1010))
  np.testing.assert_allclose(traced, 0.6, atol=1e-6)


# ----------------------------------------------------------------------------- loss values


def np_logsumexp(x):
  m = x.max(-1, keepdims=True)
  return (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]


@pytest.mark.parametrize("weighting", ["discounted", "uniform"])
def test_data_only_without_chi2_equals_weighted_nll(weighting):
  rng = np.random.default_rng(0)
  b, t, v, gamma = 4, 9, 11, 0.9
  logits = (2.0 * rng.normal(size=(b, t, v))).astype(np.float32)
  targets = rng.integers(0, v, (b, t)).astype(np.int32)
  lengths = np.array([8, 5, 1, 3])
  response_mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
  loss_mask = response_mask.copy()
  loss_mask[0, 2] = loss_mask[1, 0] = 0  # noise slots
  truncated = np.array([False, True, False, True])
  sm_loss, aux = sm.sequencematch_loss(
      jnp.asarray(logits), targets, response_mask, loss_mask, np.ones(b), truncated,
      gamma=gamma, chi2_coef=0.0, weighting=weighting, terminal="zero")
  log_probs = logits - np_logsumexp(logits)[..., None]
  nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
  per_row = []
  for row in range(b):
    w = (gamma ** np.arange(t) if weighting == "discounted" else np.ones(t)) * loss_mask[row]
    per_row.append((w * nll[row]).sum() / w.sum())
  expected = np.mean(per_row)
  np.testing.assert_allclose(sm_loss, expected, atol=1e-6, rtol=0)
  np.testing.assert_allclose(aux["bc_loss"], expected, atol=1e-6, rtol=0)


def hand_terms(logits, actions, gamma, mode):
  """Per-transition (weight, r, V(s) - γV(s')) of one 3-action row, written out by hand."""
  v = np_logsumexp(logits)
  q = [logits[j, actions[j]] for j in range(3)]
  if mode == "zero":
    next_v = [v[1], v[2], 0.0]
  else:  # absorbing and truncated both read V(s_3) from the trailing slot
    next_v = [v[1], v[2], v[3]]
  terms = [(gamma ** j, q[j] - gamma * next_v[j], v[j] - gamma * next_v[j]) for j in range(3)]
  if mode == "absorbing":
    tail_q = logits[3, actions[2]]
    terms.append((gamma ** 3 / (1 - gamma), tail_q - gamma * v[3], (1 - gamma) * v[3]))
  return terms


@pytest.mark.parametrize("mode", ["zero", "absorbing", "truncated"])
def test_terminal_and_truncation_match_hand_computation(mode):
  gamma, c = 0.9, 0.5
  data_logits = np.array([[0.5, -1.0, 2.0], [1.0, 0.0, -0.5], [-0.3, 0.8, 0.1], [2.0, 1.5, -1.0]])
  model_logits = np.array([[0.1, 0.2, 0.3], [-1.0, 1.0, 0.0], [0.7, -0.2, 0.4], [0.0, 0.9, 1.2]])
  data_actions, model_actions = [2, 1, 0], [1, 0, 0]  # both end in EOS = 0 at the third action
  logits = np.stack([data_logits, model_logits]).astype(np.float32)
  targets = np.array([data_actions + [0], model_actions + [0]], np.int32)
  response_mask = np.array([[1, 1, 1, 0], [1, 1, 1, 0]])
  truncated = np.full(2, mode == "truncated")
  terminal = "absorbing" if mode == "absorbing" else "zero"
  loss, aux = sm.sequencematch_loss(jnp.asarray(logits), targets, response_mask, response_mask,
                                    np.array([1, 0]), truncated, gamma=gamma, chi2_coef=c,
                                    terminal=terminal)
  hand_mode = "absorbing" if mode in ("absorbing", "truncated") else "zero"
  data = hand_terms(data_logits, data_actions, gamma, hand_mode)
  model = hand_terms(model_logits, model_actions, gamma, hand_mode)
  if mode == "truncated":  # no absorbing tail, just the bootstrap
    data, model = data[:3], model[:3]

  def mean(terms, f):
    return sum(t[0] * f(t) for t in terms) / sum(t[0] for t in terms)

  r, td, r2 = (lambda t: t[1]), (lambda t: t[2]), (lambda t: t[1] ** 2)
  expected = (-mean(data, r) + 0.5 * (mean(data, td) + mean(model, td))
              + c * 0.5 * (mean(data, r2) + mean(model, r2)))
  np.testing.assert_allclose(loss, expected, atol=1e-5, rtol=0)
  np.testing.assert_allclose(aux["data_reward"], mean(data, r), atol=1e-5, rtol=0)
  np.testing.assert_allclose(aux["model_reward"], mean(model, r), atol=1e-5, rtol=0)
  if mode == "absorbing":  # the discounted weights of the row sum to exactly 1 / (1 - γ)
    np.testing.assert_allclose(sum(t[0] for t in data), 1 / (1 - gamma), rtol=1e-12)


@pytest.mark.parametrize("terminal", ["zero", "absorbing"])
def test_gradients_match_central_finite_differences(terminal):
  with jax.enable_x64(True):
    rng = np.random.default_rng(1)
    b, t, v = 3, 5, 4
    logits = rng.normal(size=(b, t, v))
    targets = rng.integers(0, v, (b, t))
    response_mask = (np.arange(t)[None] < np.array([[4], [2], [3]])).astype(np.int32)
    loss_mask = response_mask.copy()
    loss_mask[0, 1] = 0
    is_data = np.array([1, 0, 1])
    truncated = np.array([False, True, False])

    def loss(x):
      return sm.sequencematch_loss(x, targets, response_mask, loss_mask, is_data, truncated,
                                   gamma=0.8, chi2_coef=0.3, terminal=terminal)[0]

    grad = np.asarray(jax.grad(loss)(jnp.asarray(logits)))
    assert grad.dtype == np.float64
    loss_jit = jax.jit(loss)
    eps = 1e-6
    numeric = np.zeros_like(logits)
    for idx in np.ndindex(logits.shape):
      step = np.zeros_like(logits)
      step[idx] = eps
      numeric[idx] = (float(loss_jit(jnp.asarray(logits + step)))
                      - float(loss_jit(jnp.asarray(logits - step)))) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, atol=1e-8, rtol=1e-6)
    # Trailing slots enter only through V(s'): row 1's truncation bootstrap always, row 0's
    # terminal state only when it is absorbing. Slots past the trailing one take no part.
    assert np.abs(grad[1, 2]).max() > 1e-3
    if terminal == "absorbing":
      assert np.abs(grad[0, 4]).max() > 1e-3
    else:
      np.testing.assert_array_equal(grad[0, 4], 0.0)
    np.testing.assert_array_equal(grad[1, 3:], 0.0)
    np.testing.assert_array_equal(grad[2, 4], 0.0)


def test_padded_vocab_rows_take_no_part():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 4, 6)).astype(np.float32)
  padded = logits.copy()
  padded[..., 5] = np.nan  # a padding row's logits must not matter, even NaN
  targets = rng.integers(0, 5, (2, 4))
  mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]])
  kwargs = dict(gamma=0.9, chi2_coef=0.1)
  a = sm.sequencematch_loss(jnp.asarray(logits[..., :5]), targets, mask, mask, np.array([1, 0]),
                            **kwargs)
  b = sm.sequencematch_loss(jnp.asarray(padded), targets, mask, mask, np.array([1, 0]),
                            num_real_tokens=5, **kwargs)
  chex.assert_trees_all_close(a, b, atol=1e-6)


# ----------------------------------------------------------------------------- config, loss_fn


def test_config_validation():
  cfg = sm.default_objective_config()
  sm.validate(cfg)
  assert (cfg.gamma, cfg.chi2_coef, cfg.weighting, cfg.terminal) == (0.998, 0.01, "discounted",
                                                                     "zero")
  assert (cfg.anneal_steps, cfg.beta_end, cfg.backspace_id) == (2000, 0.2, None)
  for key, value, match in (("gamma", 0.0, "gamma=0.0"), ("weighting", "geo", "weighting"),
                            ("terminal", "none", "terminal"), ("chi2_coef", -1.0, "chi2_coef"),
                            ("bc_steps", -1, "bc_steps"), ("noise", "gauss", "noise"),
                            ("max_actions", 0, "max_actions")):
    bad = sm.default_objective_config()
    bad[key] = value
    with pytest.raises(ValueError, match=match):
      sm.validate(bad)
  bad = sm.default_objective_config()
  bad.update(terminal="absorbing", weighting="uniform")
  with pytest.raises(ValueError, match="absorbing"):
    sm.validate(bad)
  with pytest.raises(ValueError, match="unknown keys"):
    sm.validate(ml_collections.ConfigDict(dict(cfg.to_dict(), extra=1)))


def test_loss_fn_combines_bc_and_sm_on_a_model():
  lm, params = tiny_lm("llama")
  cfg = sm.default_objective_config()
  cfg.update(bc_steps=10, anneal_steps=100, chi2_coef=0.1)
  assert sm.resolve_backspace_id(cfg, lm) == BKSP
  loss_fn = jax.jit(objectives.make_loss_fn(cfg, lm))
  actions, mask = random_actions(0)
  prompt = np.random.default_rng(0).integers(2, VOCAB - 1, (B, S)).astype(np.int32)
  batch = dict(sm.preprocess_actions(actions, BKSP, actions_mask_BxL=mask), prompt=prompt,
               prompt_mask=np.ones((B, S), np.int32), is_data=np.array([1, 1, 0]),
               truncated=np.array([False, False, True]))
  rng = jax.random.key(0)
  value_and_grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  (loss0, metrics0), _ = value_and_grad(params, {}, batch, rng, jnp.int32(0))
  np.testing.assert_allclose(loss0, metrics0["bc_loss"], rtol=1e-6)
  (loss_mid, metrics), grads = value_and_grad(params, {}, batch, rng, jnp.int32(60))
  beta = 1.0 - 0.8 * 0.5
  np.testing.assert_allclose(metrics["beta"], beta, rtol=1e-6)
  np.testing.assert_allclose(loss_mid, beta * metrics["bc_loss"] + (1 - beta) * metrics["sm_loss"],
                             rtol=1e-5)
  # Independent check of the SM value from the model's logits.
  reference = jax.jit(lambda p, x: sm.sequencematch_loss(
      lm.logits(p, sm.fill_boundary_tokens(lm, x)), x["targets"], x["response_mask"],
      x["loss_mask"], x["is_data"], x["truncated"], gamma=cfg.gamma, chi2_coef=0.1)[0])
  expected = reference(params, batch)
  np.testing.assert_allclose(metrics["sm_loss"], expected, rtol=1e-5)
  valid = np.asarray(batch["response_mask"]).astype(bool)
  np.testing.assert_allclose(metrics["backspace_rate"],
                             (np.asarray(batch["targets"])[valid] == BKSP).mean(), rtol=1e-6)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  with pytest.raises(ValueError, match="is_data"):
    without_is_data = {k: v for k, v in batch.items() if k != "is_data"}
    value_and_grad(params, {}, without_is_data, rng, jnp.int32(0))
