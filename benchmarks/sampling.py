"""Sampling speed: jaxsi's jitted KV-cache sampler vs Hugging Face `generate` on the same weights.

  python benchmarks/sampling.py [--batch=16] [--prompt_len=32] [--new_tokens=32] [--repeats=5]
                                [--torch_threads=2]

Prints ONE JSON line. Both sides run a GPT-2-style model (vocab 512, 4 layers, width 256,
4 heads) with identical weights (jaxsi parameters exported with `jaxsi.models.to_pretrained`),
ancestral sampling at temperature 1 with top-k and top-p off, and exactly `new_tokens` tokens per
row (EOS can never stop either side early). Times are medians over `repeats` runs after a warm-up
call; jaxsi's compile time is reported separately. The HF side runs with a fixed number of torch
intra-op threads (`torch_threads`, default 2 = the cores of the machine these numbers come from),
not torch's machine-dependent default, so runs on different machines stay comparable.
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxsi import sampling  # noqa: E402  (after the path fix so the script runs from a checkout)
from jaxsi.models import build, decoder, to_pretrained  # noqa: E402

CONFIG = dict(vocab_size=512, num_layers=4, d_model=256, num_heads=4, num_kv_heads=4, head_dim=64,
              d_ff=1024, max_len=128)
# Explicit rather than torch's default (which follows the machine), so numbers are reproducible;
# 2 is the core count of the machine the recorded numbers come from.
DEFAULT_TORCH_THREADS = 2


def median_seconds(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def bench_jaxsi(lm, params, prompt, prompt_mask, args) -> dict:
  # eos_id = vocab_size is never produced, so every row runs all `new_tokens` steps.
  sampler = sampling.make_sampler(lm, max_new_tokens=args.new_tokens, num_samples=1,
                                  eos_id=CONFIG["vocab_size"])
  rng = jax.random.key(0)
  start = time.perf_counter()
  out = sampler(params, prompt, prompt_mask, rng, 1.0, 0, 1.0)
  jax.block_until_ready(out)
  compile_s = time.perf_counter() - start
  assert int(out.length.min()) == args.new_tokens, "jaxsi stopped early"
  calls = iter(range(1, 10 ** 6))
  seconds = median_seconds(
      lambda: jax.block_until_ready(
          sampler(params, prompt, prompt_mask, jax.random.key(next(calls)), 1.0, 0, 1.0)),
      args.repeats)
  return dict(jaxsi_tokens_per_s=args.batch * args.new_tokens / seconds, jaxsi_s=seconds,
              compile_s=compile_s)


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
  seconds = median_seconds(generate, args.repeats)
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

  result = dict(benchmark="sampling", variant="gpt2", **CONFIG, batch=args.batch,
                prompt_len=args.prompt_len, new_tokens=args.new_tokens, temperature=1.0, top_k=0,
                top_p=1.0, repeats=args.repeats, device=str(jax.devices()[0].device_kind),
                platform=jax.default_backend(), num_devices=jax.device_count(),
                cpu_count=os.cpu_count(), torch_threads=args.torch_threads,
                # Other processes on the machine skew both sides (torch's thread pool suffers most).
                load_avg_1m=os.getloadavg()[0])
  result.update(bench_jaxsi(lm, params, prompt, prompt_mask, args))
  result.update(bench_hf(lm, params, prompt, args))
  if result["hf_tokens_per_s"]:
    result["speedup"] = result["jaxsi_tokens_per_s"] / result["hf_tokens_per_s"]
  else:
    result["speedup"] = None
  print(json.dumps(result))


if __name__ == "__main__":
  main()
