"""Sampling speed: jaxsi's jitted KV-cache sampler vs Hugging Face `generate` on the same weights.

  python benchmarks/sampling.py [--batch=16] [--prompt_len=32] [--new_tokens=32] [--repeats=5]
                                [--torch_threads=2]

Prints ONE JSON line. Both sides run a GPT-2-style model (vocab 512, 4 layers, width 256,
4 heads) with identical weights (jaxsi parameters exported with `jaxsi.models.to_pretrained`),
ancestral sampling at temperature 1 with top-k and top-p off, and exactly `new_tokens` tokens per
row (EOS can never stop either side early). Times are medians over `repeats` runs after a warm-up
call; jaxsi's sampler is compiled ahead of time and its compile time reported separately
(`compile_s`). The HF side runs with a fixed number of torch intra-op threads (`torch_threads`,
default 2 = the cores of the machine these numbers come from), not torch's machine-dependent
default, so runs on different machines stay comparable.

jaxsi's side also reports the keys of `sft_step.py` (see benchmarks/README.md), for one sampling
call as the step: `step_s` (= `jaxsi_s`), `tokens_per_s` (generated tokens, = `jaxsi_tokens_per_s`),
`flops_per_step` (`jaxsi.flops.decode_flops`: one prefill and `new_tokens` − 1 decode steps,
attention over the allocated cache as the sampler computes it), `mfu`, `peak_memory_bytes`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import sft_step  # noqa: E402  (the shared timing and accounting, next to this file)
from jaxsi import flops  # noqa: E402  (after the path fix so the script runs from a checkout)
from jaxsi import sampling  # noqa: E402
from jaxsi.models import build, decoder, to_pretrained  # noqa: E402

CONFIG = dict(vocab_size=512, num_layers=4, d_model=256, num_heads=4, num_kv_heads=4, head_dim=64,
              d_ff=1024, max_len=128)
# Explicit rather than torch's default (which follows the machine), so numbers are reproducible;
# 2 is the core count of the machine the recorded numbers come from.
DEFAULT_TORCH_THREADS = 2


def bench_jaxsi(lm, params, prompt, prompt_mask, args) -> dict:
  """Times jaxsi's compiled sampler on [B, S] prompts and accounts for it (see the README).

  `tokens_per_s` counts generated tokens (B × new_tokens) per second of one call, the number
  `generate` benchmarks quote; `flops_per_step` is `jaxsi.flops.decode_flops` for the call
  with attention over the whole allocated cache, as the sampler computes it.
  """
  # eos_id = vocab_size is never produced, so every row runs all `new_tokens` steps.
  sampler = sampling.make_sampler(lm, max_new_tokens=args.new_tokens, num_samples=1,
                                  eos_id=CONFIG["vocab_size"])
  knobs = (np.float32(1.0), np.int32(0), np.float32(1.0))  # temperature, top-k, top-p: off
  prompt, prompt_mask = jax.device_put(prompt), jax.device_put(prompt_mask)
  start = time.perf_counter()
  compiled = sampler.jitted.lower(params, prompt, prompt_mask, jax.random.key(0),
                                  *knobs).compile()
  compile_s = time.perf_counter() - start
  calls = iter(range(10 ** 6))

  def sample():
    return jax.block_until_ready(
        compiled(params, prompt, prompt_mask, jax.random.key(next(calls)), *knobs))

  out = sample()  # the warm-up call
  assert int(out.length.min()) == args.new_tokens, "jaxsi stopped early"
  times = sft_step.timed_calls(sample, steps=args.repeats, warmup=1, max_seconds=float("inf"))
  result = sft_step.standard_keys(
      times, tokens=args.batch * args.new_tokens,
      flops_per_step=flops.decode_flops(lm.config, batch=args.batch, prompt_len=args.prompt_len,
                                        new_tokens=args.new_tokens, full_cache=True),
      dtype=lm.config.dtype, compiled=[compiled])
  result.update(compile_s=compile_s, jaxsi_s=result["step_s"],
                jaxsi_tokens_per_s=result["tokens_per_s"])
  return result


def bench_hf(lm, params, prompt, args) -> dict:
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError:
    return dict(hf_tokens_per_s=None, hf_s=None)
  torch.set_num_threads(args.torch_threads)
  transformers.logging.set_verbosity_error()  # keep the output to the one JSON line
  transformers.logging.disable_progress_bar()
  torch.manual_seed(0)
  with tempfile.TemporaryDirectory() as directory:
    to_pretrained(lm, params, directory)
    model = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
  # No EOS and no pad token: generate must produce exactly `new_tokens` tokens per row.
  model.generation_config.eos_token_id = None
  model.generation_config.pad_token_id = 0
  input_ids = torch.from_numpy(np.asarray(prompt, np.int64))
  attention_mask = torch.ones_like(input_ids)

  def generate():
    with torch.inference_mode():
      return model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True,
                            temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.new_tokens,
                            min_new_tokens=args.new_tokens)

  out = generate()  # warm-up
  assert out.shape == (args.batch, args.prompt_len + args.new_tokens), out.shape
  seconds = statistics.median(sft_step.timed_calls(generate, steps=args.repeats, warmup=1,
                                                  max_seconds=float("inf")))
  return dict(hf_tokens_per_s=args.batch * args.new_tokens / seconds, hf_s=seconds,
              torch_threads=torch.get_num_threads())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--prompt_len", type=int, default=32)
  parser.add_argument("--new_tokens", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--torch_threads", type=int, default=DEFAULT_TORCH_THREADS,
                      help="torch intra-op threads for the HF side")
  args = parser.parse_args()
  if args.torch_threads < 1:
    parser.error(f"--torch_threads={args.torch_threads} must be a positive integer.")

  config = decoder.default_config("gpt2")
  config.update(CONFIG)
  lm = build(config)
  params = lm.init(jax.random.key(0))
  prompt = np.random.default_rng(0).integers(0, CONFIG["vocab_size"],
                                             (args.batch, args.prompt_len)).astype(np.int32)
  prompt_mask = np.ones_like(prompt)

  result = dict(benchmark="sampling", variant="gpt2", **CONFIG, dtype=config.dtype,
                batch=args.batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                temperature=1.0, top_k=0, top_p=1.0, repeats=args.repeats,
                torch_threads=args.torch_threads,
                # Other processes on the machine skew both sides (torch's thread pool suffers most).
                **sft_step.machine())
  result.update(bench_jaxsi(lm, params, prompt, prompt_mask, args))
  result.update(bench_hf(lm, params, prompt, args))
  if result["hf_tokens_per_s"]:
    result["speedup"] = result["jaxsi_tokens_per_s"] / result["hf_tokens_per_s"]
  else:
    result["speedup"] = None
  print(json.dumps(result))


if __name__ == "__main__":
  main()
