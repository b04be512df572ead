"""Speed of one on-policy GKD step: jaxsi vs the same step built from TRL's GKD pieces.

  python benchmarks/gkd_step.py [--batch=16] [--prompt_len=32] [--new_tokens=32] [--steps=10]
                                [--warmup=2] [--max_seconds=40] [--torch_threads=2]

Prints ONE JSON line. A step is what a GKD trainer does per optimizer update with λ = 1:
the student samples `new_tokens` tokens per prompt (temperature 1, top-k and top-p off), the
frozen teacher scores them, and the student takes a forward/backward pass of the generalized
JSD(0.5) and an AdamW update. Both sides run the same GPT-2-style models with identical weights
(jaxsi parameters exported with `jaxsi.models.to_pretrained`): a student of 4 layers, width 256,
4 heads and a teacher of 6 layers, width 384, 6 heads, vocabulary 512.

  jaxsi: `sampling.make_sampler` (jitted KV-cache sampler) then `step.make_train_step` over
    `objectives.make_loss_fn` (gkd), jitted with the state donated.
  TRL:   `GKDTrainer.generate_on_policy_outputs` (`model.generate`), the teacher's forward under
    `torch.no_grad`, the student's forward, `GKDTrainer.generalized_jsd_loss`, backward and a
    `torch.optim.AdamW` step: the body of `GKDTrainer.training_step` / `compute_loss` without
    the Trainer's data loading and logging around it.

Each side's time is the median over `steps` steps (fewer once they add up to `max_seconds`)
after `warmup` steps, waiting for the result of each step. jaxsi's sampler and train step are
compiled ahead of time (`compile_s`, never part of a step), so no timed step traces or
compiles; within a step, `sample_s` and `train_s` are the medians of the sampler call and of
the train step call. No row ever stops early: the EOS id lies outside the vocabulary (jaxsi)
or is unset (TRL), so every step samples exactly `new_tokens` tokens per row.

Accounting, with the keys of `sft_step.py` (see benchmarks/README.md): `tokens_per_s` counts
the tokens of the batch the step trains on, prompt + sampled response (B × (S + new_tokens)),
per second of the whole step, as the trainer's `train/tokens_per_s` does; `trl_tokens_per_s`
is the same count over TRL's step. `flops_per_step` = the sampling call
(`jaxsi.flops.decode_flops`, attention over the allocated cache, as jaxsi computes it) + the
train step (`jaxsi.flops.distillation_step_flops`: student forward and backward, teacher
forward); `mfu` divides its rate by the measured matmul peak of the default device.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import jax
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import sft_step  # noqa: E402  (the shared timing and accounting, next to this file)
from jaxsi import flops  # noqa: E402  (after the path fix so the script runs from a checkout)
from jaxsi import objectives  # noqa: E402
from jaxsi import optim  # noqa: E402
from jaxsi import peak  # noqa: E402
from jaxsi import sampling  # noqa: E402
from jaxsi import state as state_lib  # noqa: E402
from jaxsi import step as step_lib  # noqa: E402
from jaxsi.models import build, decoder, to_pretrained  # noqa: E402
from jaxsi.objectives import gkd  # noqa: E402

VOCAB = 512
STUDENT = dict(num_layers=4, d_model=256, num_heads=4)
TEACHER = dict(num_layers=6, d_model=384, num_heads=6)
BETA = 0.5
LR = 1e-4


def _model_config(num_layers: int, d_model: int, num_heads: int,
                  fence_residual_grads: bool) -> ml_collections.ConfigDict:
  config = decoder.default_config("gpt2")
  config.update(vocab_size=VOCAB, num_layers=num_layers, d_model=d_model, num_heads=num_heads,
                num_kv_heads=num_heads, head_dim=d_model // num_heads, d_ff=4 * d_model,
                max_len=128, dropout_rate=0.0,
                fence_residual_grads=fence_residual_grads)
  return config


def bench_jaxsi(student, teacher, prompt, prompt_mask, args) -> dict:
  """Times jaxsi's on-policy GKD step and accounts for it.

  Args:
    student: (LanguageModel, params), the trained model.
    teacher: (LanguageModel, params), the frozen teacher.
    prompt: [B, S] int32 prompts.
    prompt_mask: [B, S] int32, all ones.
    args: the parsed flags.

  Returns:
    The jaxsi keys of the JSON line (see benchmarks/README.md).
  """
  student_lm, student_params = student
  teacher_lm, teacher_params = teacher
  eos_id = VOCAB  # never sampled: every row runs all `new_tokens` steps
  objective = gkd.default_objective_config()
  objective.update(divergence="jsd", beta=BETA, lam=1.0)
  loss_fn = objectives.make_loss_fn(objective, student_lm, teacher_lm=teacher_lm, eos_id=eos_id)
  optim_cfg = optim.default_optim_config()
  optim_cfg.update(name="adamw", lr=LR)
  tx = optim.build_optimizer(optim_cfg)
  train_step = jax.jit(step_lib.make_train_step(loss_fn, tx), donate_argnums=(0,))
  sampler = sampling.make_sampler(student_lm, max_new_tokens=args.new_tokens, eos_id=eos_id)
  knobs = (np.float32(1.0), np.int32(0), np.float32(1.0))  # temperature, top-k, top-p: off
  frozen = {"teacher": jax.device_put(teacher_params)}
  prompt, prompt_mask = jax.device_put(prompt), jax.device_put(prompt_mask)
  run_rng = jax.random.key(0)
  state = jax.jit(lambda p: state_lib.create(p, tx))(jax.device_put(student_params))

  # Both programs are compiled ahead of time, like sft_step.py's step: the timed calls can then
  # never trace or compile again.
  start = time.perf_counter()
  compiled_sampler = sampler.jitted.lower(state.params, prompt, prompt_mask, run_rng,
                                          *knobs).compile()
  sample_compile_s = time.perf_counter() - start
  samples = jax.eval_shape(sampler.jitted, state.params, prompt, prompt_mask, run_rng, *knobs)
  batch_shapes = {"prompt": prompt, "prompt_mask": prompt_mask, "response": samples.tokens,
                  "response_mask": samples.mask}
  start = time.perf_counter()
  compiled_step = train_step.lower(state, frozen, batch_shapes, run_rng).compile()
  train_compile_s = time.perf_counter() - start
  box = {"state": state, "calls": 0, "phases": []}

  def gkd_step():
    state = box["state"]
    rng = jax.random.fold_in(run_rng, box["calls"])
    box["calls"] += 1
    start = time.perf_counter()
    out = compiled_sampler(state.params, prompt, prompt_mask, rng, *knobs)
    jax.block_until_ready(out)  # the trainer, too, waits for the samples (jaxsi.onpolicy)
    sampled = time.perf_counter()
    batch = {"prompt": prompt, "prompt_mask": prompt_mask, "response": out.tokens,
             "response_mask": out.mask}
    box["state"], metrics = compiled_step(state, frozen, batch, run_rng)
    jax.block_until_ready((box["state"], metrics))
    box["phases"].append((sampled - start, time.perf_counter() - sampled))
    return out, metrics

  out, metrics = gkd_step()
  assert int(out.length.min()) == args.new_tokens, "jaxsi stopped sampling early"
  assert np.isfinite(float(metrics["loss"])), metrics
  first_loss = float(metrics["loss"])
  times = sft_step.timed_calls(gkd_step, steps=args.steps, warmup=args.warmup,
                               max_seconds=args.max_seconds)
  phases = box["phases"][-len(times):]
  sample_s = statistics.median([p[0] for p in phases])
  train_s = statistics.median([p[1] for p in phases])

  sizes = dict(batch=args.batch, prompt_len=args.prompt_len)
  # What the sampler's arrays multiply: attention over the whole allocated cache, as the train
  # step's count covers every key of its dense [L, L] scores.
  sample_flops = flops.decode_flops(student_lm.config, new_tokens=args.new_tokens,
                                    full_cache=True, **sizes)
  train_flops = flops.distillation_step_flops(student_lm.config, teacher_lm.config,
                                              response_len=args.new_tokens, **sizes)
  tokens = int(np.asarray(prompt_mask).sum() + np.asarray(out.mask).sum())
  result = sft_step.standard_keys(times, tokens=tokens, flops_per_step=sample_flops + train_flops,
                                  dtype=student_lm.config.dtype,
                                  compiled=[compiled_sampler, compiled_step])
  peak_flops = result["peak_flops_per_s"]
  result.update(
      sample_s=sample_s, train_s=train_s,
      sample_tokens_per_s=args.batch * args.new_tokens / sample_s,
      sample_flops_per_step=sample_flops, train_flops_per_step=train_flops,
      xla_train_flops_per_step=sft_step.xla_flops(compiled_step),
      sample_mfu=sample_flops / sample_s / peak_flops, train_mfu=train_flops / train_s / peak_flops,
      sample_compiled_memory_bytes=peak.compiled_memory_bytes(compiled_sampler),
      train_compiled_memory_bytes=peak.compiled_memory_bytes(compiled_step),
      compile_s=sample_compile_s + train_compile_s, sample_compile_s=sample_compile_s,
      train_compile_s=train_compile_s, dtype=student_lm.config.dtype,
      jaxsi_step_s=result["step_s"], jaxsi_step_min_s=result["step_min_s"],
      jaxsi_timed_steps=result["timed_steps"], jaxsi_first_loss=first_loss)
  return result


def bench_trl(student, teacher, prompt, prompt_mask, args) -> dict:
  """Median seconds of the same step in PyTorch with TRL's GKD functions; None without trl."""
  os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
  try:
    import torch
    import transformers
    import trl
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      from trl.experimental.gkd import GKDTrainer
  except ImportError as e:
    return dict(trl_step_s=None, trl_version=None, trl_skipped=f"{type(e).__name__}: {e}")
  torch.set_num_threads(args.torch_threads)
  transformers.logging.set_verbosity_error()  # keep the output to the one JSON line
  transformers.logging.disable_progress_bar()
  torch.manual_seed(0)
  device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"

  def to_torch(lm, params):
    with tempfile.TemporaryDirectory() as directory:
      to_pretrained(lm, params, directory)
      return transformers.GPT2LMHeadModel.from_pretrained(directory).to(device)

  student_model = to_torch(*student).train()
  teacher_model = to_torch(*teacher).eval()
  optimizer = torch.optim.AdamW(student_model.parameters(), lr=LR, weight_decay=0.0)
  generation_config = transformers.GenerationConfig(
      max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=True,
      temperature=1.0, top_k=0, top_p=1.0, eos_token_id=None, pad_token_id=0)
  inputs = {"prompts": torch.from_numpy(np.asarray(prompt, np.int64)).to(device),
            "prompt_attention_mask": torch.from_numpy(np.asarray(prompt_mask, np.int64)).to(device)}

  def sync():
    if device == "cuda":
      torch.cuda.synchronize()

  def gkd_step():
    # GKDTrainer.training_step with λ = 1: sample from the student, then compute_loss.
    with torch.no_grad():
      input_ids, attention_mask, labels = GKDTrainer.generate_on_policy_outputs(
          student_model, inputs, generation_config)
    student_logits = student_model(input_ids=input_ids, attention_mask=attention_mask).logits
    with torch.no_grad():
      teacher_logits = teacher_model(input_ids=input_ids, attention_mask=attention_mask).logits
    loss = GKDTrainer.generalized_jsd_loss(
        student_logits=student_logits[:, :-1, :], teacher_logits=teacher_logits[:, :-1, :],
        labels=labels[:, 1:], beta=BETA)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync()
    return input_ids, loss

  input_ids, loss = gkd_step()
  assert input_ids.shape == (args.batch, args.prompt_len + args.new_tokens), input_ids.shape
  first_loss = loss.item()
  times = sft_step.timed_calls(gkd_step, steps=args.steps, warmup=args.warmup,
                               max_seconds=args.max_seconds)
  return dict(trl_step_s=statistics.median(times), trl_step_min_s=min(times),
              trl_timed_steps=len(times), trl_version=trl.__version__, trl_first_loss=first_loss,
              torch_threads=torch.get_num_threads(), torch_device=device,
              torch_version=torch.__version__)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--prompt_len", type=int, default=32)
  parser.add_argument("--new_tokens", type=int, default=32)
  parser.add_argument("--steps", type=int, default=10, help="timed steps per side (median)")
  parser.add_argument("--warmup", type=int, default=2,
                      help="untimed steps before timing, the first (compiling) call included")
  parser.add_argument("--max_seconds", type=float, default=40.0,
                      help="stop timing a side once its timed steps add up to this (>= 3 steps)")
  parser.add_argument("--torch_threads", type=int, default=2,
                      help="torch intra-op threads for the TRL side")
  sft_step.add_fence_arg(parser)
  args = parser.parse_args()

  fence = sft_step.fence_residual_grads(args)
  student_lm = build(_model_config(**STUDENT, fence_residual_grads=fence))
  teacher_lm = build(_model_config(**TEACHER, fence_residual_grads=fence))
  student = (student_lm, student_lm.init(jax.random.key(1)))
  teacher = (teacher_lm, teacher_lm.init(jax.random.key(2)))
  prompt = np.random.default_rng(0).integers(0, VOCAB, (args.batch, args.prompt_len)).astype(
      np.int32)
  prompt_mask = np.ones_like(prompt)

  result = dict(benchmark="gkd_step", variant="gpt2", vocab_size=VOCAB,
                fence_residual_grads=fence,
                student=STUDENT, teacher=TEACHER, batch=args.batch, prompt_len=args.prompt_len,
                new_tokens=args.new_tokens, divergence=f"jsd({BETA})", optimizer="adamw", lr=LR,
                steps=args.steps, warmup=args.warmup,
                # Other processes on the machine skew both sides (torch's thread pool suffers most).
                **sft_step.machine())
  # The jaxsi state is donated, so the TRL side exports the initial weights first.
  result.update(bench_trl(student, teacher, prompt, prompt_mask, args))
  result.update(bench_jaxsi(student, teacher, prompt, prompt_mask, args))
  trained_tokens = args.batch * (args.prompt_len + args.new_tokens)  # every slot is real
  result["trl_tokens_per_s"] = (trained_tokens / result["trl_step_s"]
                                if result["trl_step_s"] else None)
  result["speedup"] = (result["trl_step_s"] / result["jaxsi_step_s"]
                       if result["trl_step_s"] else None)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
