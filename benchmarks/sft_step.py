"""Speed, FLOPs, MFU and memory of one jitted SFT train step on the reference tiny model.

  python benchmarks/sft_step.py [--batch=16] [--prompt_len=32] [--response_len=32] [--steps=20]
                                [--warmup=2] [--max_seconds=30] [--dtype=float32]

Prints ONE JSON line. The step is what `jaxsi.trainer` runs per update: `step.make_train_step`
over the SFT loss (`objectives.make_loss_fn`, masked NLL) and an AdamW update, jitted with the
state donated, on a GPT-2-style model (vocabulary 512, 4 layers, width 256, 4 heads) and random
token batches with every position real. The step is compiled ahead of time (`compile_s`, and
XLA's memory and FLOP analyses of the executable), then timed over `steps` calls after
`warmup` untimed ones, each waiting for its result; `step_s` is the median.

FLOPs are the analytic matmul count of `jaxsi.flops.train_step_flops` (3 × forward); MFU
divides the FLOP/s this gives by `jaxsi.peak.measure_matmul_peak` on the default device, the
one the step runs on. The other benchmarks import this file: `sm_step.py` reuses
`bench_train_step` for SequenceMatch; `gkd_step.py` and `sampling.py` reuse `machine`,
`timed_calls` and `standard_keys`, so every benchmark's keys mean the same.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from jaxsi import flops  # noqa: E402  (after the path fix so the script runs from a checkout)
from jaxsi import objectives  # noqa: E402
from jaxsi import optim  # noqa: E402
from jaxsi import peak  # noqa: E402
from jaxsi import state as state_lib  # noqa: E402
from jaxsi import step as step_lib  # noqa: E402
from jaxsi.models import build, decoder  # noqa: E402
from jaxsi.objectives import sft  # noqa: E402

CONFIG = dict(vocab_size=512, num_layers=4, d_model=256, num_heads=4, num_kv_heads=4, head_dim=64,
              d_ff=1024, max_len=128)
LR = 1e-4


def add_fence_arg(parser: argparse.ArgumentParser) -> None:
  """--fence_residual_grads: the model knob (jaxsi/models/grad_fence.py), by default as advised."""
  parser.add_argument("--fence_residual_grads", type=int, choices=(0, 1), default=None,
                      help="1/0: the model knob on/off (default: on for CPU, off elsewhere)")


def fence_residual_grads(args: argparse.Namespace) -> bool:
  """The knob's value for this run: the flag, else on for CPU only (see grad_fence)."""
  if args.fence_residual_grads is not None:
    return bool(args.fence_residual_grads)
  return jax.default_backend() == "cpu"


def model_config(args: argparse.Namespace):
  """The reference GPT-2-style model config (see CONFIG) computing in `args.dtype`."""
  config = decoder.default_config("gpt2")
  config.update(CONFIG, dropout_rate=0.0, dtype=args.dtype,
                fence_residual_grads=fence_residual_grads(args))
  return config


def add_step_args(parser: argparse.ArgumentParser) -> None:
  """The flags every step benchmark shares."""
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--prompt_len", type=int, default=32)
  parser.add_argument("--steps", type=int, default=20, help="timed steps (median)")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
  parser.add_argument("--max_seconds", type=float, default=30.0,
                      help="stop timing once the timed steps add up to this (>= 3 steps)")
  parser.add_argument("--dtype", default="float32", choices=sorted(decoder.DTYPES),
                      help="model compute dtype (and the dtype of the peak matmul)")
  add_fence_arg(parser)


def machine() -> dict:
  """Where the benchmark ran."""
  return dict(device=str(jax.devices()[0].device_kind), platform=jax.default_backend(),
              num_devices=jax.device_count(), cpu_count=os.cpu_count(),
              # Other processes on the machine skew the timings.
              load_avg_1m=os.getloadavg()[0])


def xla_flops(compiled) -> float | None:
  """XLA's FLOP count of a compiled executable (`cost_analysis()["flops"]`), if it gives one.

  A `while_loop` body (the sampler's decode loop) is counted once, not once per iteration, so
  this is only meaningful for loop-free programs such as a train step.
  """
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per executable
    analysis = analysis[0] if analysis else None
  return float(analysis["flops"]) if analysis and "flops" in analysis else None


def timed_calls(call, *, steps: int, warmup: int, max_seconds: float) -> list[float]:
  """Seconds of up to `steps` calls of `call` (which must wait for its result) after warm-up.

  The caller has already made one untimed call (it checks the result), which counts towards
  `warmup`. Timing stops early once the timed calls add up to `max_seconds` (at least
  min(3, steps) are timed), so a run slowed down by a busy machine cannot stretch past a few
  minutes.
  """
  for _ in range(warmup - 1):
    call()
  times = []
  while len(times) < steps and (len(times) < 3 or sum(times) < max_seconds):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return times


def standard_keys(times: list[float], *, tokens: int, flops_per_step: float, dtype: str,
                  compiled: list) -> dict:
  """The keys every benchmark reports for its step (see benchmarks/README.md).

  Args:
    times: seconds of the timed calls of the step.
    tokens: the tokens one step is for (see each benchmark's `tokens_per_s`).
    flops_per_step: analytic model FLOPs of one step (`jaxsi.flops`).
    dtype: the model's compute dtype, also the dtype of the peak matmul.
    compiled: the compiled executables one step runs; the memory is the largest of them.

  Returns:
    step_s, step_min_s, timed_steps, tokens_per_s, flops_per_step, model_flops_per_s,
    peak_flops_per_s, mfu, peak_memory_bytes, memory_source, compiled_memory_bytes.
  """
  step_s = statistics.median(times)
  # Measured after the timing, so the two never compete for the device; more repeats than the
  # trainer's default because a shared machine's load comes in bursts.
  peak_flops = peak.measure_matmul_peak(dtype, repeats=21)
  compiled_sizes = [b for b in map(peak.compiled_memory_bytes, compiled) if b is not None]
  compiled_bytes = max(compiled_sizes) if compiled_sizes else None
  device_bytes = peak.device_peak_memory_bytes()
  return dict(
      step_s=step_s, step_min_s=min(times), timed_steps=len(times),
      tokens_per_s=tokens / step_s, flops_per_step=flops_per_step,
      model_flops_per_s=flops_per_step / step_s, peak_flops_per_s=peak_flops,
      mfu=flops_per_step / step_s / peak_flops,
      peak_memory_bytes=device_bytes if device_bytes is not None else compiled_bytes,
      memory_source="device_memory_stats" if device_bytes is not None else "memory_analysis",
      compiled_memory_bytes=compiled_bytes)


def bench_train_step(lm, loss_fn, batch: dict, args) -> dict:
  """Times `jax.jit(make_train_step(loss_fn, AdamW))` on `batch` and accounts for it.

  Args:
    lm: the model (its config gives the FLOPs).
    loss_fn: `loss_fn(params, frozen, batch, rng, step)`.
    batch: device arrays with at least prompt [B, S], prompt_mask [B, S], response [B, T] and
      response_mask [B, T].
    args: parsed `add_step_args` flags.

  Returns:
    The step's keys of the JSON line (see benchmarks/README.md).
  """
  optim_cfg = optim.default_optim_config()
  optim_cfg.update(name="adamw", lr=LR)
  tx = optim.build_optimizer(optim_cfg)
  state = jax.jit(lambda rng: state_lib.create(lm.init(rng), tx))(jax.random.key(0))
  rng = jax.random.key(1)
  train_step = jax.jit(step_lib.make_train_step(loss_fn, tx), donate_argnums=(0,))

  start = time.perf_counter()
  compiled = train_step.lower(state, {}, batch, rng).compile()
  compile_s = time.perf_counter() - start
  box = {"state": state}

  def run():
    box["state"], metrics = compiled(box["state"], {}, batch, rng)
    return jax.block_until_ready(metrics)

  first = run()
  assert np.isfinite(float(first["loss"])), first
  times = timed_calls(run, steps=args.steps, warmup=args.warmup, max_seconds=args.max_seconds)
  tokens = int(np.asarray(batch["prompt_mask"]).sum() + np.asarray(batch["response_mask"]).sum())
  result = standard_keys(times, tokens=tokens,
                         flops_per_step=flops.batch_train_step_flops(lm.config, batch),
                         dtype=lm.config.dtype, compiled=[compiled])
  result.update(xla_flops_per_step=xla_flops(compiled), compile_s=compile_s,
                first_loss=float(first["loss"]))
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_step_args(parser)
  parser.add_argument("--response_len", type=int, default=32)
  args = parser.parse_args()

  lm = build(model_config(args))
  objective = sft.default_objective_config()
  loss_fn = objectives.make_loss_fn(objective, lm)
  rng = np.random.default_rng(0)
  shape = {"prompt": (args.batch, args.prompt_len), "response": (args.batch, args.response_len)}
  batch = {key: jnp.asarray(rng.integers(1, CONFIG["vocab_size"], size), jnp.int32)
           for key, size in shape.items()}
  batch.update(prompt_mask=jnp.ones(shape["prompt"], jnp.int32),
               response_mask=jnp.ones(shape["response"], jnp.int32))

  result = dict(benchmark="sft_step", variant="gpt2", **CONFIG, dtype=args.dtype,
                fence_residual_grads=fence_residual_grads(args),
                batch=args.batch, prompt_len=args.prompt_len, response_len=args.response_len,
                objective=f"sft({objective.normalization})", optimizer="adamw", lr=LR,
                steps=args.steps, warmup=args.warmup, **machine())
  result.update(bench_train_step(lm, loss_fn, batch, args))
  print(json.dumps(result))


if __name__ == "__main__":
  main()
