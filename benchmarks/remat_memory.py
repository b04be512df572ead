"""Memory of one value-and-gradient of the SFT loss under each remat policy, scanned or not.

  python benchmarks/remat_memory.py [--vocab=32000] [--d_model=512] [--num_layers=8]
                                    [--batch=8] [--prompt_len=16] [--response_len=512]

Prints ONE JSON line. A Llama-style decoder (64-wide heads, d_ff = 2.75 x width) is compiled,
never run, for `jax.jit(jax.value_and_grad(sft_loss))` with abstract parameters and batch, once
per `model.remat_policy` (`jaxsi.models.remat.POLICIES`) with `model.scan_layers` off and on.
`temp_bytes` is XLA's temporaries from the executable's memory analysis (what the activations
kept for the backward pass occupy), `compile_s` the compile time of each variant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# pylint: disable=g-import-not-at-top,wrong-import-position
import sft_step  # noqa: E402  (the machine keys, next to this file)
from jaxsi.models import build, decoder, remat  # noqa: E402
from jaxsi.objectives import sft  # noqa: E402


def _temp_bytes(args, policy: str, scan: bool) -> tuple[int, float]:
  """(XLA temporaries in bytes, compile seconds) of one variant."""
  config = decoder.default_config("llama")
  config.update(vocab_size=args.vocab, d_model=args.d_model, num_layers=args.num_layers,
                num_heads=args.d_model // 64, num_kv_heads=args.d_model // 64, head_dim=64,
                d_ff=int(2.75 * args.d_model), max_len=args.prompt_len + args.response_len,
                remat_policy=policy, scan_layers=scan)
  lm = build(config)
  objective = sft.default_objective_config()
  loss_fn = sft.make_loss_fn(lm, objective)
  ints = lambda length: jax.ShapeDtypeStruct((args.batch, length), jnp.int32)  # noqa: E731
  batch = {"prompt": ints(args.prompt_len), "prompt_mask": ints(args.prompt_len),
           "response": ints(args.response_len), "response_mask": ints(args.response_len)}

  def loss(params, batch):
    return loss_fn(params, {}, batch, None, jnp.int32(0))[0]

  start = time.perf_counter()
  compiled = jax.jit(jax.value_and_grad(loss)).lower(lm.abstract_params(), batch).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes), time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--vocab", type=int, default=32000)
  parser.add_argument("--d_model", type=int, default=512)
  parser.add_argument("--num_layers", type=int, default=8)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--prompt_len", type=int, default=16)
  parser.add_argument("--response_len", type=int, default=512)
  args = parser.parse_args()
  result = dict(benchmark="remat_memory", variant="llama", vocab_size=args.vocab,
                d_model=args.d_model, num_layers=args.num_layers, batch=args.batch,
                prompt_len=args.prompt_len, response_len=args.response_len, **sft_step.machine())
  for scan in (False, True):
    for policy in remat.POLICIES:
      key = f"{'scanned' if scan else 'unscanned'}_{policy}"
      result[f"{key}_temp_bytes"], result[f"{key}_compile_s"] = _temp_bytes(args, policy, scan)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
