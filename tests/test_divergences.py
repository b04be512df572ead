"""Divergences against a float64 NumPy reference, their properties and their gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsi.objectives import divergences


def _np_log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def np_divergence(name, t_logits, s_logits, beta=None, temperature=1.0):
  """Float64 reference, written from the definitions."""
  log_t = _np_log_softmax(np.asarray(t_logits, np.float64) / temperature)
  log_s = _np_log_softmax(np.asarray(s_logits, np.float64) / temperature)
  t, s = np.exp(log_t), np.exp(log_s)

  def kl(p, log_p, log_q):
    # 0 log 0 = 0.
    return np.sum(np.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)

  if name == "forward_kl":
    return kl(t, log_t, log_s)
  if name == "reverse_kl":
    return kl(s, log_s, log_t)
  if name == "tvd":
    return 0.5 * np.abs(t - s).sum(axis=-1)
  with np.errstate(divide="ignore"):
    log_m = np.log(beta * t + (1 - beta) * s)  # > 0 wherever t > 0 or s > 0
  return beta * kl(t, log_t, log_m) + (1 - beta) * kl(s, log_s, log_m)


CASES = [("forward_kl", None), ("reverse_kl", None), ("tvd", None), ("jsd", 0.1), ("jsd", 0.5),
         ("jsd", 0.9)]


def _logits(seed, shape, scale):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=shape) * scale).astype(np.float32)


@pytest.mark.parametrize("scale", [0.5, 3.0, 30.0])
@pytest.mark.parametrize("name,beta", CASES)
def test_matches_numpy_reference(name, beta, scale):
  t = _logits(0, (3, 5, 37), scale)
  s = _logits(1, (3, 5, 37), scale)
  got = divergences.divergence(name, jnp.asarray(t), jnp.asarray(s), beta=beta)
  assert got.shape == (3, 5) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, np_divergence(name, t, s, beta), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("name,beta", CASES)
def test_large_magnitude_logits(name, beta):
  # Logits of order 1e4 (and a constant offset of 1e4) must not overflow: log space.
  t = _logits(2, (4, 50), 1.0) * 20.0 + 1e4
  s = _logits(3, (4, 50), 1.0) * 20.0 - 1e4
  t[:, 0] += 1e4  # one token far ahead of the rest
  got = divergences.divergence(name, jnp.asarray(t), jnp.asarray(s), beta=beta)
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, np_divergence(name, t, s, beta), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,beta", CASES)
def test_temperature(name, beta):
  t = _logits(4, (6, 23), 4.0)
  s = _logits(5, (6, 23), 4.0)
  got = divergences.divergence(name, jnp.asarray(t), jnp.asarray(s), beta=beta, temperature=2.5)
  np.testing.assert_allclose(got, np_divergence(name, t, s, beta, temperature=2.5),
                             rtol=2e-5, atol=2e-6)
  # A high temperature flattens both distributions toward uniform: the divergence shrinks.
  untempered = divergences.divergence(name, jnp.asarray(t), jnp.asarray(s), beta=beta)
  hot = divergences.divergence(name, jnp.asarray(t), jnp.asarray(s), beta=beta, temperature=50.0)
  assert np.all(np.asarray(hot) < np.asarray(untempered))


def test_masked_vocabulary_entries_give_finite_values():
  # A teacher logit of -inf (a token the teacher rules out) has probability 0.
  t = _logits(6, (2, 11), 2.0)
  s = _logits(7, (2, 11), 2.0)
  t_masked = t.copy()
  t_masked[:, 3] = -np.inf
  for name, beta in CASES:
    if name == "reverse_kl":
      continue  # KL(S||T) is truly infinite when T rules out a token S allows.
    got = divergences.divergence(name, jnp.asarray(t_masked), jnp.asarray(s), beta=beta)
    t_prob_zero = t.copy()
    t_prob_zero[:, 3] = -1e30  # the reference's softmax gives exactly 0 there
    np.testing.assert_allclose(got, np_divergence(name, t_prob_zero, s, beta), rtol=2e-5,
                               atol=2e-6)


def test_jsd_limits_at_the_ends_of_beta():
  t = _logits(8, (8, 29), 1.5)
  s = _logits(9, (8, 29), 1.5)
  forward = np_divergence("forward_kl", t, s)
  reverse = np_divergence("reverse_kl", t, s)
  previous_forward_err = previous_reverse_err = np.inf
  for eps in (1e-1, 1e-2, 1e-3, 1e-4):
    jsd_small = np.asarray(divergences.divergence("jsd", jnp.asarray(t), jnp.asarray(s), beta=eps))
    jsd_large = np.asarray(divergences.divergence("jsd", jnp.asarray(t), jnp.asarray(s),
                                                  beta=1 - eps))
    forward_err = np.max(np.abs(jsd_small / eps - forward) / forward)
    reverse_err = np.max(np.abs(jsd_large / eps - reverse) / reverse)
    assert forward_err < previous_forward_err and reverse_err < previous_reverse_err
    previous_forward_err, previous_reverse_err = forward_err, reverse_err
  assert previous_forward_err < 5e-3 and previous_reverse_err < 5e-3


@pytest.mark.parametrize("beta", [0.1, 0.3, 0.5, 0.77])
def test_jsd_swap_symmetry(beta):
  t = jnp.asarray(_logits(10, (5, 31), 2.0))
  s = jnp.asarray(_logits(11, (5, 31), 2.0))
  np.testing.assert_allclose(divergences.divergence("jsd", t, s, beta=beta),
                             divergences.divergence("jsd", s, t, beta=1 - beta),
                             rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name,beta", CASES)
def test_zero_iff_equal(name, beta):
  t = _logits(12, (6, 40), 3.0)
  s = _logits(13, (6, 40), 3.0)
  same = divergences.divergence(name, jnp.asarray(t), jnp.asarray(t), beta=beta)
  np.testing.assert_allclose(same, 0.0, atol=1e-6)
  # Logits that differ by a per-row constant give the same distribution.
  shifted = divergences.divergence(name, jnp.asarray(t), jnp.asarray(t + 7.0), beta=beta)
  np.testing.assert_allclose(shifted, 0.0, atol=1e-5)
  different = np.asarray(divergences.divergence(name, jnp.asarray(t), jnp.asarray(s), beta=beta))
  assert np.all(different > 1e-3)


@pytest.mark.parametrize("beta", [0.05, 0.3, 0.5, 0.9])
def test_jsd_bounded_by_binary_entropy(beta):
  entropy = -beta * np.log(beta) - (1 - beta) * np.log(1 - beta)
  t = _logits(14, (16, 64), 2.0)
  s = _logits(15, (16, 64), 2.0)
  # Nearly disjoint supports push the JSD up to (just under) its bound.
  disjoint_t = np.full((2, 64), -50.0, np.float32)
  disjoint_s = np.full((2, 64), -50.0, np.float32)
  disjoint_t[:, :32] = 0.0
  disjoint_s[:, 32:] = 0.0
  t = np.concatenate([t, disjoint_t])
  s = np.concatenate([s, disjoint_s])
  got = np.asarray(divergences.divergence("jsd", jnp.asarray(t), jnp.asarray(s), beta=beta))
  assert np.all(got >= 0) and np.all(got <= entropy + 1e-6)
  np.testing.assert_allclose(got[-2:], entropy, rtol=1e-4)


@pytest.mark.parametrize("name,beta", CASES)
def test_student_gradients_match_finite_differences(name, beta):
  t = _logits(16, (3, 9), 1.5).astype(np.float64)
  s = _logits(17, (3, 9), 1.5).astype(np.float64)

  def total(student):
    return jnp.sum(divergences.divergence(name, jnp.asarray(t, jnp.float32), student, beta=beta,
                                          temperature=1.3))

  grad = np.asarray(jax.grad(total)(jnp.asarray(s, jnp.float32)))
  h = 1e-5
  fd = np.zeros_like(s)
  for index in np.ndindex(*s.shape):
    plus, minus = s.copy(), s.copy()
    plus[index] += h
    minus[index] -= h
    fd[index] = (np_divergence(name, t, plus, beta, 1.3).sum()
                 - np_divergence(name, t, minus, beta, 1.3).sum()) / (2 * h)
  np.testing.assert_allclose(grad, fd, rtol=1e-4, atol=2e-6)
  assert np.abs(fd).max() > 1e-2  # the check is not vacuous


def test_bad_inputs_raise_clear_errors():
  t = jnp.zeros((2, 8))
  with pytest.raises(ValueError, match="forward_kl.*reverse_kl"):
    divergences.divergence("jsd", t, t, beta=0.0)
  with pytest.raises(ValueError, match="forward_kl.*reverse_kl"):
    divergences.divergence("jsd", t, t, beta=1.0)
  with pytest.raises(ValueError, match="strictly between 0 and 1"):
    divergences.divergence("jsd", t, t)
  with pytest.raises(ValueError, match="vocabulary width 8 .* 10"):
    divergences.divergence("forward_kl", t, jnp.zeros((2, 10)))
  with pytest.raises(ValueError, match="forward_kl, reverse_kl, jsd, tvd"):
    divergences.divergence("kl", t, t)
  with pytest.raises(ValueError, match="temperature"):
    divergences.divergence("tvd", t, t, temperature=0.0)
  assert divergences.NAMES == ("forward_kl", "reverse_kl", "jsd", "tvd")
