"""SFT: masked NLL against a NumPy reference, masking, the loss_fn and the objective registry."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxsi import objectives
from jaxsi.objectives import sft

B, T, V = 4, 7, 13


def np_masked_nll(logits, targets, mask, normalization):
  """Float64 reference with explicit loops over sequences."""
  logits = np.asarray(logits, np.float64)
  per_sequence, all_nll, correct = [], [], 0
  for b in range(logits.shape[0]):
    nll_b = []
    for t in range(logits.shape[1]):
      if not mask[b, t]:
        continue
      row = logits[b, t]
      log_z = row.max() + np.log(np.sum(np.exp(row - row.max())))
      nll_b.append(log_z - row[targets[b, t]])
      correct += int(np.argmax(row) == targets[b, t])
    if nll_b:
      per_sequence.append(np.mean(nll_b))
    all_nll.extend(nll_b)
  token_mean = np.mean(all_nll)
  loss = np.mean(per_sequence) if normalization == "sequence" else token_mean
  return loss, token_mean, correct / len(all_nll), len(all_nll)


def _ragged_batch(seed):
  rng = np.random.default_rng(seed)
  logits = (rng.normal(size=(B, T, V)) * 3).astype(np.float32)
  targets = rng.integers(0, V, size=(B, T)).astype(np.int32)
  lengths = np.array([7, 1, 0, 4])  # full, one token, empty, partial
  mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int32)
  # Make some argmaxes right so that token_accuracy is neither 0 nor 1.
  targets[0, :3] = logits[0, :3].argmax(-1)
  return logits, targets, mask


@pytest.mark.parametrize("normalization", ["sequence", "token"])
def test_masked_nll_matches_numpy(normalization):
  logits, targets, mask = _ragged_batch(0)
  loss, metrics = sft.masked_nll(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask),
                                 normalization=normalization)
  ref_loss, ref_nll, ref_accuracy, ref_tokens = np_masked_nll(logits, targets, mask,
                                                              normalization)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=1e-6)
  np.testing.assert_allclose(metrics["nll"], ref_nll, rtol=1e-6)
  np.testing.assert_allclose(metrics["token_accuracy"], ref_accuracy, rtol=1e-6)
  assert metrics["num_tokens"] == ref_tokens == 12
  assert 0 < ref_accuracy < 1


def test_normalizations_differ_on_ragged_batches():
  logits, targets, mask = _ragged_batch(1)
  by_sequence, _ = sft.masked_nll(logits, targets, mask, normalization="sequence")
  by_token, _ = sft.masked_nll(logits, targets, mask, normalization="token")
  assert abs(float(by_sequence) - float(by_token)) > 1e-3


@pytest.mark.parametrize("normalization", ["sequence", "token"])
def test_masked_positions_have_no_effect(normalization):
  logits, targets, mask = _ragged_batch(2)
  rng = np.random.default_rng(3)
  other_logits = np.where(mask[..., None] > 0, logits,
                          rng.normal(size=logits.shape).astype(np.float32) * 1e4)
  other_logits[2, 0, 0] = np.inf
  other_logits[1, 5, 3] = np.nan
  other_targets = np.where(mask > 0, targets, rng.integers(-5, V + 5, size=targets.shape))

  def loss(x, y):
    return sft.masked_nll(x, jnp.asarray(y), jnp.asarray(mask), normalization=normalization)[0]

  value, grad = jax.value_and_grad(loss)(jnp.asarray(logits), targets)
  other_value, other_grad = jax.value_and_grad(loss)(jnp.asarray(other_logits), other_targets)
  np.testing.assert_allclose(other_value, value, rtol=1e-7)
  np.testing.assert_allclose(other_grad, grad, rtol=1e-6, atol=1e-9)
  np.testing.assert_array_equal(np.asarray(grad)[mask == 0], 0.0)
  assert np.abs(np.asarray(grad)[mask > 0]).max() > 1e-3


def test_gradient_matches_numpy():
  # d loss / d logits of a token-normalized NLL is (softmax - onehot) / num_tokens.
  logits, targets, mask = _ragged_batch(4)
  grad = jax.grad(lambda x: sft.masked_nll(x, targets, mask, normalization="token")[0])(
      jnp.asarray(logits))
  x = logits.astype(np.float64)
  probs = np.exp(x - x.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  expected = (probs - np.eye(V)[targets]) * mask[..., None] / mask.sum()
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-8)


def test_empty_batch_gives_zero_loss_and_finite_gradient():
  logits, targets, _ = _ragged_batch(5)
  mask = np.zeros((B, T), np.int32)
  for normalization in ("sequence", "token"):
    value, grad = jax.value_and_grad(
        lambda x: sft.masked_nll(x, targets, mask, normalization=normalization)[0])(
            jnp.asarray(logits))
    assert float(value) == 0.0
    np.testing.assert_array_equal(grad, 0.0)


class _BigramLM:
  """A stand-in model: the logits for slot t are a row of a [V, V] table picked by token t-1."""

  vocab_size = V

  def __init__(self):
    self.dropout_rngs = []

  def logits(self, params, batch, *, dropout_rng=None):
    self.dropout_rngs.append(dropout_rng)
    previous = jnp.concatenate([batch["prompt"][:, -1:], batch["response"][:, :-1]], axis=1)
    return params["table"][previous]


def test_loss_fn_via_registry():
  rng = np.random.default_rng(6)
  table = rng.normal(size=(V, V)).astype(np.float32)
  _, targets, mask = _ragged_batch(7)
  prompt = rng.integers(0, V, size=(B, 3)).astype(np.int32)
  batch = {"prompt": prompt, "prompt_mask": np.ones_like(prompt), "response": targets,
           "response_mask": mask}
  lm = _BigramLM()
  cfg = sft.default_objective_config()
  assert cfg.name == "sft" and cfg.normalization == "sequence"
  loss_fn = objectives.make_loss_fn(cfg, lm)
  key = jax.random.key(0)
  loss, metrics = jax.jit(loss_fn)({"table": table}, None, batch, key, jnp.int32(0))
  assert lm.dropout_rngs[-1] is not None  # the rng reaches the model (traced under jit)
  previous = np.concatenate([prompt[:, -1:], targets[:, :-1]], axis=1)
  ref_loss, ref_nll, ref_accuracy, _ = np_masked_nll(table[previous], targets, mask, "sequence")
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  np.testing.assert_allclose(metrics["nll"], ref_nll, rtol=1e-6)
  np.testing.assert_allclose(metrics["token_accuracy"], ref_accuracy, rtol=1e-6)
  assert set(metrics) == {"loss", "nll", "token_accuracy", "num_tokens"}

  # Gradients flow to the model parameters.
  grads = jax.grad(lambda p: loss_fn(p, None, batch, key, 0)[0])({"table": table})
  assert np.abs(np.asarray(grads["table"])).max() > 1e-3


def test_bad_names_raise_clear_errors():
  cfg = ml_collections.ConfigDict({"name": "dpo", "normalization": "sequence"})
  with pytest.raises(ValueError, match="Unknown objective name 'dpo'; expected one of .*sft"):
    objectives.make_loss_fn(cfg, _BigramLM())
  cfg = ml_collections.ConfigDict({"name": "sft", "normalization": "per_batch"})
  with pytest.raises(ValueError, match="'per_batch'; expected one of sequence, token"):
    objectives.make_loss_fn(cfg, _BigramLM())
  with pytest.raises(ValueError, match="do not fit targets"):
    sft.masked_nll(jnp.zeros((2, 3, 5)), jnp.zeros((2, 4), jnp.int32), jnp.ones((2, 4)))
