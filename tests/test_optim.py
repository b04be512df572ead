"""Schedules at hand-computed steps; Adafactor (T5 preset), AdamW and clipping against NumPy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsi import optim


def _cfg(**overrides):
  cfg = optim.default_optim_config()
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


SCHEDULE_CASES = [
    # (config overrides, {step: expected learning rate})
    (dict(lr=3e-4), {0: 3e-4, 5: 3e-4, 10**6: 3e-4}),
    (dict(lr=1e-3, warmup_steps=10), {0: 0.0, 5: 5e-4, 10: 1e-3, 100: 1e-3}),
    (dict(lr=1.0, schedule="linear", warmup_steps=10, total_steps=110, end_lr_fraction=0.1),
     {0: 0.0, 5: 0.5, 10: 1.0, 60: 0.55, 110: 0.1, 200: 0.1}),
    (dict(lr=1.0, schedule="linear", total_steps=4), {0: 1.0, 1: 0.75, 3: 0.25, 4: 0.0}),
    # cos(pi / 4) = 0.70710678: 2 * (0.25 + 0.75 * (1 + 0.70710678) / 2) = 1.78033009.
    (dict(lr=2.0, schedule="cosine", warmup_steps=10, total_steps=110, end_lr_fraction=0.25),
     {0: 0.0, 5: 1.0, 10: 2.0, 35: 1.78033009, 60: 1.25, 110: 0.5, 500: 0.5}),
    # T5: base 1.0 and 10k warmup steps peak at 0.01, then 1 / sqrt(step).
    (dict(lr=1.0, schedule="rsqrt", warmup_steps=10000),
     {0: 0.0, 5000: 0.005, 10000: 0.01, 40000: 0.005, 1000000: 0.001}),
]


@pytest.mark.parametrize("overrides,expected", SCHEDULE_CASES)
def test_schedules_at_chosen_steps(overrides, expected):
  schedule = optim.build_schedule(_cfg(**overrides))
  jitted = jax.jit(schedule)
  for step, value in expected.items():
    np.testing.assert_allclose(schedule(step), value, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(jitted(jnp.int32(step)), value, rtol=1e-6, atol=1e-9)


def _rms(x):
  return np.sqrt(np.mean(np.square(x)))


def np_adafactor(params, grads_per_step, lrs, weight_decay=0.0):
  """Adafactor (Shazeer & Stern 2018) with the T5 settings, written from the paper.

  Factored second moments for matrices whose two dimensions are both >= 128: row
  and column means of g^2 + 1e-30, decayed with beta2_t = 1 - t^-0.8, combined as
  V = R C^T / mean(R). Update g / sqrt(V), divided by max(1, RMS(update)); step
  size lr * max(RMS(param), 1e-3). Weight decay lr * wd * param for ndim >= 2.

  Returns:
    (list of per-step update dicts, list of per-step clip denominators).
  """
  params = {k: v.astype(np.float64) for k, v in params.items()}
  moments = {}
  all_updates, clip_denominators = [], []
  for t, (grads, lr) in enumerate(zip(grads_per_step, lrs), start=1):
    beta2 = 1.0 - t ** -0.8
    updates = {}
    for name, p in params.items():
      g = grads[name].astype(np.float64)
      g2 = g * g + 1e-30
      if p.ndim == 2 and min(p.shape) >= 128:
        row, col = moments.get(name, (np.zeros(p.shape[0]), np.zeros(p.shape[1])))
        row = beta2 * row + (1 - beta2) * g2.mean(axis=1)
        col = beta2 * col + (1 - beta2) * g2.mean(axis=0)
        moments[name] = (row, col)
        v = np.outer(row, col) / row.mean()
      else:
        v = beta2 * moments.get(name, np.zeros(p.shape)) + (1 - beta2) * g2
        moments[name] = v
      u = g / np.sqrt(v)
      denominator = max(1.0, _rms(u) / 1.0)
      clip_denominators.append(denominator)
      u = u / denominator
      step = lr * max(_rms(p), 1e-3) * u
      if p.ndim >= 2:
        step = step + lr * weight_decay * p
      updates[name] = -step
    params = {k: params[k] + updates[k] for k in params}
    all_updates.append(updates)
  return all_updates, clip_denominators


def _run_optax(tx, params, grads_per_step):
  params = jax.tree.map(jnp.asarray, params)
  state = tx.init(params)
  update_fn = jax.jit(tx.update)
  all_updates = []
  for grads in grads_per_step:
    updates, state = update_fn(jax.tree.map(jnp.asarray, grads), state, params)
    params = optax.apply_updates(params, updates)
    all_updates.append(jax.tree.map(np.asarray, updates))
  return all_updates


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adafactor_t5_preset_matches_numpy(weight_decay):
  rng = np.random.default_rng(0)
  params = {
      "factored": (rng.normal(size=(256, 130)) * 0.5).astype(np.float32),   # both dims >= 128
      "narrow": (rng.normal(size=(64, 200)) * 0.05).astype(np.float32),     # 64 < 128: not factored
      "vector": (rng.normal(size=(300,)) * 1e-4).astype(np.float32),        # RMS under the 1e-3 floor
  }
  # Row/column structure in the gradients, so the factored estimate differs from the full one.
  scales = [1.0, 10.0, 0.1]  # the jump at step 2 makes update clipping bite
  grads_per_step = []
  for scale in scales:
    grads = {}
    for name, p in params.items():
      g = rng.normal(size=p.shape)
      if p.ndim == 2:
        g = (g * rng.uniform(0.1, 3.0, size=(p.shape[0], 1))
             * rng.uniform(0.1, 3.0, size=p.shape[1]))
      grads[name] = (g * scale).astype(np.float32)
    grads_per_step.append(grads)

  cfg = _cfg(name="adafactor", lr=0.1, schedule="cosine", total_steps=8,
             weight_decay=weight_decay)
  lrs = [0.1 * (1 + math.cos(math.pi * step / 8)) / 2 for step in range(3)]
  got = _run_optax(optim.build_optimizer(cfg), params, grads_per_step)
  expected, clip_denominators = np_adafactor(params, grads_per_step, lrs, weight_decay)
  assert max(clip_denominators) > 1.05  # update clipping was exercised
  assert _rms(params["vector"]) < 1e-3 < _rms(params["narrow"])  # both sides of the floor
  for step in range(3):
    for name in params:
      # atol covers float32 cancellation where the decay and the update nearly cancel.
      np.testing.assert_allclose(got[step][name], expected[step][name], rtol=2e-5,
                                 atol=1e-6 * np.abs(expected[step][name]).max(),
                                 err_msg=f"step {step + 1}, {name}")


def np_adamw(params, grads_per_step, lrs, b1, b2, eps, weight_decay, clip_norm=None):
  """AdamW (Loshchilov & Hutter) with bias correction and lr-coupled decay for ndim >= 2."""
  params = {k: v.astype(np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in params.items()}
  v = {k: np.zeros_like(p) for k, p in params.items()}
  all_updates = []
  for t, (grads, lr) in enumerate(zip(grads_per_step, lrs), start=1):
    grads = {k: g.astype(np.float64) for k, g in grads.items()}
    if clip_norm:
      norm = math.sqrt(sum(np.sum(g * g) for g in grads.values()))
      grads = {k: g * min(1.0, clip_norm / norm) for k, g in grads.items()}
    updates = {}
    for name, p in params.items():
      m[name] = b1 * m[name] + (1 - b1) * grads[name]
      v[name] = b2 * v[name] + (1 - b2) * grads[name] ** 2
      m_hat = m[name] / (1 - b1 ** t)
      v_hat = v[name] / (1 - b2 ** t)
      u = m_hat / (np.sqrt(v_hat) + eps)
      if p.ndim >= 2:
        u = u + weight_decay * p
      updates[name] = -lr * u
    params = {k: params[k] + updates[k] for k in params}
    all_updates.append(updates)
  return all_updates


def _adamw_problem(seed, grad_scales):
  rng = np.random.default_rng(seed)
  params = {"w": rng.normal(size=(5, 3)).astype(np.float32),
            "b": rng.normal(size=(3,)).astype(np.float32)}
  grads_per_step = [{k: (rng.normal(size=p.shape) * s).astype(np.float32)
                     for k, p in params.items()} for s in grad_scales]
  return params, grads_per_step


def test_adamw_matches_numpy():
  params, grads_per_step = _adamw_problem(1, [1.0, 0.3])
  # Linear decay from 0.01 to 0.005 over 4 steps: 0.01 at step 0, 0.00875 at step 1.
  cfg = _cfg(name="adamw", lr=0.01, schedule="linear", total_steps=4, end_lr_fraction=0.5,
             b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.1)
  got = _run_optax(optim.build_optimizer(cfg), params, grads_per_step)
  expected = np_adamw(params, grads_per_step, [0.01, 0.00875], 0.8, 0.95, 1e-6, 0.1)
  for step in range(2):
    for name in params:
      np.testing.assert_allclose(got[step][name], expected[step][name], rtol=1e-5, atol=1e-9)


def test_gradient_clipping_by_global_norm():
  # Step 1's gradient (global norm ~20) is clipped to norm 1, step 2's (~0.2) is not; Adam
  # then sees a different ratio between the two steps than without clipping.
  params, grads_per_step = _adamw_problem(2, [5.0, 0.05])
  norms = [math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values()))
           for grads in grads_per_step]
  assert norms[0] > 1.0 > norms[1]
  common = dict(name="adamw", lr=0.01, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0)
  got = _run_optax(optim.build_optimizer(_cfg(grad_clip_norm=1.0, **common)), params,
                   grads_per_step)
  expected = np_adamw(params, grads_per_step, [0.01, 0.01], 0.9, 0.99, 1e-8, 0.0, clip_norm=1.0)
  unclipped = np_adamw(params, grads_per_step, [0.01, 0.01], 0.9, 0.99, 1e-8, 0.0)
  for name in params:
    np.testing.assert_allclose(got[1][name], expected[1][name], rtol=1e-5, atol=1e-9)
    assert np.abs(unclipped[1][name] - expected[1][name]).max() > 1e-4  # clipping mattered
  # grad_clip_norm = 0 (or None) turns clipping off.
  for off in (0.0, None):
    got_off = _run_optax(optim.build_optimizer(_cfg(grad_clip_norm=off, **common)), params,
                         grads_per_step)
    for name in params:
      np.testing.assert_allclose(got_off[1][name], unclipped[1][name], rtol=1e-5, atol=1e-9)


def test_bad_configs_raise_clear_errors():
  with pytest.raises(ValueError, match="optim.name 'sgd'; expected one of adafactor, adamw"):
    optim.build_optimizer(_cfg(name="sgd"))
  with pytest.raises(ValueError, match="optim.schedule 'step'; expected one of constant, linear"):
    optim.build_schedule(_cfg(schedule="step"))
  with pytest.raises(ValueError, match="total_steps must be greater than optim.warmup_steps"):
    optim.build_schedule(_cfg(schedule="cosine", warmup_steps=10, total_steps=10))
  with pytest.raises(ValueError, match="warmup_steps must be >= 1 for the rsqrt schedule"):
    optim.build_schedule(_cfg(schedule="rsqrt", warmup_steps=0))
  with pytest.raises(ValueError, match="end_lr_fraction must lie in"):
    optim.build_schedule(_cfg(schedule="linear", total_steps=10, end_lr_fraction=2.0))
