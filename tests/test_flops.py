"""FLOP counts against independent references, the matmul peak and the trainer's MFU metrics.

References for `jaxsi.flops`:
  - the model's own jaxpr: every `dot_general` it traces, 2 · (lhs size) · (rhs free size),
    summed over nested jaxprs: exact, since the analytic count is meant to be the matmuls;
  - XLA's cost analysis of the lowered HLO, which also counts elementwise work (norms,
    softmax, activations) and so lands slightly above the matmul count;
  - a hand computation for a 1-layer GPT-2.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jex_core

from jaxsi import config as config_lib
from jaxsi import flops
from jaxsi import metrics_writer
from jaxsi import objectives
from jaxsi import peak
from jaxsi import trainer
from jaxsi.models import build, decoder, t5
from jaxsi.objectives import gkd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sub_jaxprs(value):
  items = value if isinstance(value, (tuple, list)) else (value,)
  for item in items:
    if isinstance(item, jex_core.ClosedJaxpr):
      yield item.jaxpr
    elif isinstance(item, jex_core.Jaxpr):
      yield item


def _dot_flops(jaxpr) -> int:
  """2·m·n·k of every dot_general in `jaxpr` and the jaxprs nested in its equations."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
      lhs_shape, rhs_shape = (v.aval.shape for v in eqn.invars)
      rhs_free = [d for i, d in enumerate(rhs_shape) if i not in rhs_contract + rhs_batch]
      total += 2 * int(np.prod(lhs_shape)) * int(np.prod(rhs_free))
    for value in eqn.params.values():
      for sub in _sub_jaxprs(value):
        total += _dot_flops(sub)
  return total


def _traced_flops(fn, *args) -> int:
  return _dot_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def _config(kind: str):
  if kind in ("gpt2", "llama"):
    config = decoder.default_config(kind)
    config.update(vocab_size=96, num_layers=2, d_model=32, num_heads=4,
                  num_kv_heads=2 if kind == "llama" else 4, head_dim=8, d_ff=48, max_len=64)
  else:
    config = t5.default_config(kind)
    config.update(vocab_size=96, num_layers=2, num_decoder_layers=3, d_model=32, num_heads=4,
                  head_dim=8, d_ff=48, dropout_rate=0.0)
  return config


def _batch(b, s, t):
  return {"prompt": jnp.zeros((b, s), jnp.int32), "prompt_mask": jnp.ones((b, s), jnp.int32),
          "response": jnp.zeros((b, t), jnp.int32)}


KINDS = ("gpt2", "llama", "v1_0", "v1_1")


@pytest.mark.parametrize("kind", KINDS)
def test_forward_and_train_step_equal_the_traced_matmuls(kind):
  config = _config(kind)
  lm = build(config)
  params = lm.abstract_params()
  b, s, t = 3, 5, 7
  batch = _batch(b, s, t)
  forward = flops.forward_flops(config, batch=b, prompt_len=s, response_len=t)
  assert forward == _traced_flops(lm.logits, params, batch)
  # Backward: both operand gradients of every matmul, so exactly twice the forward's matmuls.
  grad = jax.grad(lambda p: lm.logits(p, batch).sum())
  assert flops.train_step_flops(config, batch=b, prompt_len=s, response_len=t) == (
      _traced_flops(grad, params))
  assert flops.batch_train_step_flops(config, batch) == 3 * forward


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_and_decode_step_equal_the_traced_matmuls(kind):
  config = _config(kind)
  lm = build(config)
  params = lm.abstract_params()
  b, s, new = 3, 5, 4
  prompt, prompt_mask = jnp.zeros((b, s), jnp.int32), jnp.ones((b, s), jnp.int32)
  prefill = lambda p: lm.prefill(p, prompt, prompt_mask, new)
  # jaxsi's decode step (and T5's prefill) multiply against the whole allocated cache; a
  # decoder's prefill against the prompt slots only.
  assert flops.prefill_flops(config, batch=b, prompt_len=s, cache_slots=new) == (
      _traced_flops(prefill, params))
  _, cache = jax.eval_shape(prefill, params)
  step = lambda p, c: lm.decode_step(p, c, jnp.zeros((b,), jnp.int32), jnp.int32(1),
                                     jnp.ones((b,), jnp.int32), jnp.ones((b, new), bool))
  assert flops.decode_step_flops(config, batch=b, prompt_len=s, response_slots=new) == (
      _traced_flops(step, params, cache))


def test_one_layer_gpt2_by_hand():
  config = decoder.default_config("gpt2")
  config.update(vocab_size=50, num_layers=1, d_model=16, num_heads=2, num_kv_heads=2,
                head_dim=8, d_ff=64, max_len=32)
  b, s, t = 2, 3, 4
  length = s + t - 1  # the last response token is never an input
  # The only layer is the last: keys and values of all positions, the rest on the t positions
  # whose logits are wanted.
  key_value = 2 * 2 * length * 16 * 16         # two [16 -> 2 x 8] projections
  query_out = 2 * 2 * t * 16 * 16
  attention = 2 * 2 * 2 * t * length * 8       # scores and mixing, 2 heads of width 8
  mlp = 2 * 2 * t * 16 * 64
  head = 2 * t * 16 * 50
  expected = b * (key_value + query_out + attention + mlp + head)
  assert flops.forward_flops(config, batch=b, prompt_len=s, response_len=t) == expected


@pytest.mark.parametrize("kind", ("gpt2", "v1_1"))
def test_xla_counts_within_three_percent_above(kind):
  """XLA counts the elementwise work too: ~1 % at width 256, so ours is a bit lower."""
  if kind == "gpt2":  # the benchmarks' reference shape
    config = decoder.default_config("gpt2")
    config.update(vocab_size=512, num_layers=4, d_model=256, num_heads=4, num_kv_heads=4,
                  head_dim=64, d_ff=1024, max_len=128)
  else:
    config = t5.default_config("v1_1")
    config.update(vocab_size=512, num_layers=2, num_decoder_layers=2, d_model=256, num_heads=4,
                  head_dim=64, d_ff=1024, dropout_rate=0.0)
  lm = build(config)
  b, s, t = 4, 32, 32
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in _batch(b, s, t).items()}
  params = lm.abstract_params()
  xla_forward = jax.jit(lm.logits).lower(params, batch).cost_analysis()["flops"]
  ours = flops.forward_flops(config, batch=b, prompt_len=s, response_len=t)
  assert ours < xla_forward < 1.03 * ours
  grad = jax.jit(jax.grad(lambda p, x: jnp.square(lm.logits(p, x)).sum()))
  xla_train = grad.lower(params, batch).cost_analysis()["flops"]
  ours_train = flops.train_step_flops(config, batch=b, prompt_len=s, response_len=t)
  assert ours_train < xla_train < 1.03 * ours_train


def _gkd_grad(student_config, teacher_config, eos_id):
  """∇ of the GKD (JSD 0.5) loss w.r.t. the student: `grad(params, frozen, batch)`."""
  student, teacher = build(student_config), build(teacher_config)
  objective = gkd.default_objective_config()
  objective.update(divergence="jsd", beta=0.5)
  loss_fn = objectives.make_loss_fn(objective, student, teacher_lm=teacher, eos_id=eos_id)
  grad = jax.grad(lambda p, f, x: loss_fn(p, f, x, jax.random.key(0), 0)[0])
  return grad, student.abstract_params(), {"teacher": teacher.abstract_params()}


@pytest.mark.parametrize("student_kind,teacher_kind", [("llama", "gpt2"), ("v1_0", "v1_1")])
def test_distillation_step_equals_the_traced_matmuls(student_kind, teacher_kind):
  """GKD's gradient: the student's forward and backward, the frozen teacher's forward once."""
  student_config = _config(student_kind)
  teacher_config = _config(teacher_kind)
  teacher_config.update(d_model=48, d_ff=64)  # a different size, as a real teacher
  b, s, t = 3, 5, 7
  batch = dict(_batch(b, s, t), response_mask=jnp.ones((b, t), jnp.int32))
  grad, params, frozen = _gkd_grad(student_config, teacher_config, eos_id=1)
  ours = flops.distillation_step_flops(student_config, teacher_config, batch=b, prompt_len=s,
                                       response_len=t)
  assert ours == _traced_flops(lambda p, f: grad(p, f, batch), params, frozen)
  assert ours == (flops.train_step_flops(student_config, batch=b, prompt_len=s, response_len=t)
                  + flops.forward_flops(teacher_config, batch=b, prompt_len=s, response_len=t))


def test_distillation_step_xla_counts_within_three_percent_above():
  """`benchmarks/gkd_step.py`'s shapes: XLA adds the divergence's elementwise work (~1 %)."""
  def gpt2(num_layers, d_model, num_heads):
    config = decoder.default_config("gpt2")
    config.update(vocab_size=512, num_layers=num_layers, d_model=d_model, num_heads=num_heads,
                  num_kv_heads=num_heads, head_dim=d_model // num_heads, d_ff=4 * d_model,
                  max_len=128, dropout_rate=0.0)
    return config

  student_config, teacher_config = gpt2(4, 256, 4), gpt2(6, 384, 6)
  b, s, t = 4, 32, 32
  batch = dict(_batch(b, s, t), response_mask=jnp.ones((b, t), jnp.int32))
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  grad, params, frozen = _gkd_grad(student_config, teacher_config, eos_id=512)
  xla = jax.jit(grad).lower(params, frozen, batch).cost_analysis()["flops"]
  ours = flops.distillation_step_flops(student_config, teacher_config, batch=b, prompt_len=s,
                                       response_len=t)
  assert ours < xla < 1.03 * ours


def test_decode_flops_sums_prefill_and_steps():
  config = _config("llama")
  b, s, new, n = 2, 5, 4, 3
  full = flops.decode_flops(config, batch=b, prompt_len=s, new_tokens=new, num_samples=n,
                            full_cache=True)
  assert full == (flops.prefill_flops(config, batch=b, prompt_len=s, cache_slots=new)
                  + (new - 1) * flops.decode_step_flops(config, batch=b * n, prompt_len=s,
                                                        response_slots=new))
  current = flops.decode_flops(config, batch=b, prompt_len=s, new_tokens=new, num_samples=n)
  assert current == (flops.prefill_flops(config, batch=b, prompt_len=s)
                     + sum(flops.decode_step_flops(config, batch=b * n, prompt_len=s,
                                                   response_slots=j + 1)
                           for j in range(new - 1)))
  assert current < full


def test_bad_inputs_name_the_value():
  with pytest.raises(ValueError, match="family 'bert'"):
    flops.forward_flops({"family": "bert"}, batch=1, prompt_len=1, response_len=1)
  with pytest.raises(ValueError, match="response_len=0"):
    flops.forward_flops(_config("gpt2"), batch=1, prompt_len=1, response_len=0)
  with pytest.raises(ValueError, match="'d_ff'"):
    flops.forward_flops({"family": "decoder", "variant": "gpt2", "num_heads": 1,
                         "num_kv_heads": 1, "head_dim": 1, "d_model": 1, "num_layers": 1},
                        batch=1, prompt_len=1, response_len=1)


def test_matmul_peak_is_measured_once_and_cached(monkeypatch):
  calls = []
  measure = peak._measure
  monkeypatch.setattr(peak, "_measure", lambda *a: calls.append(a) or measure(*a))
  first = peak.measure_matmul_peak(jnp.float32, size=64, repeats=2)
  assert np.isfinite(first) and first > 0
  assert peak.measure_matmul_peak(jnp.float32, size=64, repeats=2) == first
  assert len(calls) == 1
  together = peak.measure_matmul_peak(jnp.float32, size=64, repeats=2,
                                      devices=jax.local_devices())
  assert np.isfinite(together) and together > 0 and len(calls) == 2


def test_run_peak_flops_env(monkeypatch):
  monkeypatch.setenv(peak.PEAK_ENV, "2.5e12")
  assert peak.run_peak_flops() == 2.5e12 * jax.device_count()
  monkeypatch.setenv(peak.PEAK_ENV, "0")
  assert peak.run_peak_flops() is None
  monkeypatch.setenv(peak.PEAK_ENV, "fast")
  with pytest.raises(ValueError, match="'fast' is not a number"):
    peak.run_peak_flops()


def test_compiled_memory_subtracts_donated_buffers():
  x = jax.ShapeDtypeStruct((1000,), jnp.float32)
  plain = jax.jit(lambda a: a * 2.0).lower(x).compile()
  donated = jax.jit(lambda a: a * 2.0, donate_argnums=0).lower(x).compile()
  assert peak.compiled_memory_bytes(plain) >= 8000  # 4000-byte argument and output
  assert peak.compiled_memory_bytes(donated) == peak.compiled_memory_bytes(plain) - 4000


def test_trainer_logs_model_flops_and_mfu(tmp_path, monkeypatch):
  monkeypatch.setenv(peak.PEAK_ENV, "1e9")
  config = config_lib.load(os.path.join(ROOT, "configs/arithmetic_sft.py:tiny"), [
      ("train.progress", "false"), ("train.steps", "3"), ("optim.warmup_steps", "1"),
      ("train.eval_every", "0"), ("train.checkpoint_every", "0"), ("eval.at_end", "false")])
  trainer.train(config, str(tmp_path))
  rows = [r for r in metrics_writer.read(str(tmp_path)) if "train/loss" in r]
  assert rows and all(r["train/model_flops_per_s"] > 0 for r in rows)
  for row in rows:
    assert row["train/mfu"] == pytest.approx(row["train/model_flops_per_s"]
                                             / (1e9 * jax.device_count()))
