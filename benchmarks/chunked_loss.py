"""Memory and time of the loss's value and gradient with full logits vs chunked over positions.

  python benchmarks/chunked_loss.py [--objective=sft] [--vocab=32768] [--d_model=768]
                                    [--num_layers=2] [--batch=4] [--prompt_len=16]
                                    [--response_len=256] [--chunk=32] [--steps=3] [--warmup=1]
                                    [--max_seconds=20] [--dtype=float32]

Prints ONE JSON line. Both variants run `jax.jit(jax.value_and_grad(loss_fn))` of the same
objective on the same parameters and batch: "plain" with `objective.vocab_chunk_size=0` (the
[B, T, V] logits in full), "chunked" with `vocab_chunk_size=--chunk` (`jaxsi.objectives.chunked`:
the head on `chunk` positions at a time, recomputed in the backward pass). The model is
GPT-2-style with a GPT-2-small-width head (width 768, 12 heads, vocabulary 32768) and few
layers, so the head dominates as it does for small models with large vocabularies. With
`--objective=gkd` a 4-layer teacher of the same width and forward KL are added; its head is
chunked too. The optimizer update is left out: it is the same for both variants. For scale,
`features_grad_temp_bytes` is what the student's backward pass alone (features, no head, no
loss) keeps: neither variant can go below it, and remat, not chunking, lowers it.

Each variant is compiled ahead of time (XLA's memory analysis of the executable), then timed
over up to `steps` calls after `warmup` untimed ones (the first call, whose result is checked,
included), each waiting for its result, until the timed calls add up to `max_seconds` (at least
3). The chunked variant runs first, so where the device reports an allocator high-water mark
(GPUs, TPUs) the chunked one is its own and the plain one the larger of the two.
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# pylint: disable=g-import-not-at-top,wrong-import-position
import sft_step  # noqa: E402  (the shared flags, timing and machine keys, next to this file)
from jaxsi import peak  # noqa: E402  (after the path fix so the script runs from a checkout)
from jaxsi.models import decoder  # noqa: E402
from jaxsi.objectives import gkd, sft  # noqa: E402

EOS = 1  # only for GKD's EOS-rate metric


def _ratio(numerator, denominator):
  return numerator / denominator if numerator is not None and denominator else None


def model_config(args, num_layers: int):
  """GPT-2-style decoder of width `d_model` (64-wide heads) and `num_layers` layers."""
  config = decoder.default_config("gpt2")
  config.update(vocab_size=args.vocab, d_model=args.d_model, num_layers=num_layers,
                num_heads=args.d_model // 64, num_kv_heads=args.d_model // 64, head_dim=64,
                d_ff=4 * args.d_model, max_len=args.prompt_len + args.response_len,
                dropout_rate=0.0, dtype=args.dtype)
  return config


def loss_fn_for(args, student, teacher, chunk_size: int):
  """The objective's loss with `vocab_chunk_size=chunk_size`."""
  if args.objective == "sft":
    cfg = sft.default_objective_config()
    cfg.vocab_chunk_size = chunk_size
    return sft.make_loss_fn(student, cfg)
  cfg = gkd.default_objective_config()
  cfg.update(divergence="forward_kl", vocab_chunk_size=chunk_size)
  return gkd.make_loss_fn(student, cfg, teacher_lm=teacher, eos_id=EOS)


def bench_variant(loss_fn, params, frozen, batch, args) -> tuple[dict, tuple]:
  """Compiles and times the jitted value_and_grad of `loss_fn`.

  Returns:
    (the variant's JSON keys, (loss, grads) of its first call).
  """
  def value_and_grad(p, f, b):
    return jax.value_and_grad(lambda q: loss_fn(q, f, b, None, jnp.int32(0)), has_aux=True)(p)

  start = time.perf_counter()
  compiled = jax.jit(value_and_grad).lower(params, frozen, batch).compile()
  compile_s = time.perf_counter() - start

  def run():
    return jax.block_until_ready(compiled(params, frozen, batch))

  (loss, _), grads = run()
  assert np.isfinite(float(loss)), loss
  times = sft_step.timed_calls(run, steps=args.steps, warmup=args.warmup,
                               max_seconds=args.max_seconds)

  compiled_bytes = peak.compiled_memory_bytes(compiled)
  analysis = compiled.memory_analysis()
  device_bytes = peak.device_peak_memory_bytes()
  keys = dict(
      step_s=statistics.median(times), step_min_s=min(times), timed_steps=len(times),
      compile_s=compile_s, compiled_memory_bytes=compiled_bytes,
      temp_bytes=int(analysis.temp_size_in_bytes) if analysis is not None else None,
      peak_memory_bytes=device_bytes if device_bytes is not None else compiled_bytes,
      memory_source="device_memory_stats" if device_bytes is not None else "memory_analysis",
      loss=float(loss))
  return keys, (loss, grads)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sft_step.add_step_args(parser)
  parser.set_defaults(batch=4, prompt_len=16, steps=3, warmup=1, max_seconds=20.0)
  parser.add_argument("--objective", default="sft", choices=("sft", "gkd"))
  parser.add_argument("--vocab", type=int, default=32768)
  parser.add_argument("--d_model", type=int, default=768)
  parser.add_argument("--num_layers", type=int, default=2)
  parser.add_argument("--teacher_layers", type=int, default=4)
  parser.add_argument("--response_len", type=int, default=256)
  parser.add_argument("--chunk", type=int, default=32, help="vocab_chunk_size of the chunked run")
  args = parser.parse_args()

  student = decoder.DecoderLM(model_config(args, args.num_layers))
  params = student.init(jax.random.key(0))
  teacher, frozen = None, {}
  if args.objective == "gkd":
    teacher = decoder.DecoderLM(model_config(args, args.teacher_layers))
    frozen = {"teacher": teacher.init(jax.random.key(1))}
  rng = np.random.default_rng(0)
  b, s, t = args.batch, args.prompt_len, args.response_len
  batch = dict(prompt=jnp.asarray(rng.integers(2, args.vocab, (b, s)), jnp.int32),
               prompt_mask=jnp.ones((b, s), jnp.int32),
               response=jnp.asarray(rng.integers(2, args.vocab, (b, t)), jnp.int32),
               response_mask=jnp.ones((b, t), jnp.int32))

  result = dict(benchmark="chunked_loss", objective=args.objective, variant="gpt2",
                vocab_size=args.vocab, d_model=args.d_model, num_layers=args.num_layers,
                teacher_layers=args.teacher_layers if teacher is not None else None,
                dtype=args.dtype, batch=b, prompt_len=s, response_len=t, chunk_size=args.chunk,
                logits_bytes=b * t * args.vocab * 4, steps=args.steps, warmup=args.warmup,
                **sft_step.machine())
  # The floor under both variants: the student's own backward pass without head or loss.
  features_grad = jax.jit(jax.grad(lambda p, x: jnp.sum(student.hidden(p, x).astype(jnp.float32))))
  analysis = features_grad.lower(params, batch).compile().memory_analysis()
  result["features_grad_temp_bytes"] = (int(analysis.temp_size_in_bytes)
                                        if analysis is not None else None)
  outputs = {}
  for name, chunk_size in (("chunked", args.chunk), ("plain", 0)):
    keys, outputs[name] = bench_variant(loss_fn_for(args, student, teacher, chunk_size), params,
                                        frozen, batch, args)
    result.update({f"{name}_{key}": value for key, value in keys.items()})

  (plain_loss, plain_grads), (chunked_loss, chunked_grads) = outputs["plain"], outputs["chunked"]
  differences = jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), plain_grads,
                             chunked_grads)
  result.update(
      loss_abs_diff=abs(float(plain_loss) - float(chunked_loss)),
      grad_max_abs_diff=max(jax.tree.leaves(differences)),
      grad_max_abs=max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(plain_grads)),
      temp_ratio=_ratio(result["chunked_temp_bytes"], result["plain_temp_bytes"]),
      memory_ratio=_ratio(result["chunked_peak_memory_bytes"], result["plain_peak_memory_bytes"]),
      time_ratio=_ratio(result["chunked_step_s"], result["plain_step_s"]))
  print(json.dumps(result))


if __name__ == "__main__":
  main()
