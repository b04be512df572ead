"""Speed, FLOPs, MFU and memory of one jitted SequenceMatch train step on batches with backspaces.

  python benchmarks/sm_step.py [--batch=16] [--prompt_len=32] [--actions=32]
                               [--backspace_prob=0.15] [--steps=20] [--warmup=2]
                               [--max_seconds=30] [--dtype=float32]

Prints ONE JSON line, with the keys of `benchmarks/sft_step.py` (same model, optimizer, timing
and accounting; see there). The batch is what `jaxsi.sm_batches.BatchPreparer` hands the train
step, built once up front so only the step is timed: `actions` raw actions per row (random
tokens, each a <bksp> with probability `backspace_prob`, rows of `actions // 2` to `actions`
real actions) through `sequencematch.preprocess_actions`, i.e. the one-pass layout of width
actions + 1 with its stack-walk positions and [T, T] visibility; half the rows are data
(is_data = 1), half model samples, some of them truncated. The loss is
`objectives.make_loss_fn` for "sequencematch" past its BC phase (β = beta_end), so both the
BC and the SM terms are live. The vocabulary's last id (511) is the <bksp> row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import sft_step  # noqa: E402  (the shared step timing and accounting, next to this file)
from jaxsi import objectives  # noqa: E402
from jaxsi.models import build  # noqa: E402
from jaxsi.objectives import sequencematch as sm  # noqa: E402

PAD_ID = 0


def sm_batch(args, backspace_id: int) -> dict:
  """A preprocessed SequenceMatch batch of B rows (see the module docstring)."""
  rng = np.random.default_rng(0)
  b, width = args.batch, args.actions
  tokens = rng.integers(1, backspace_id, (b, width))  # neither pad nor <bksp>
  actions = np.where(rng.random((b, width)) < args.backspace_prob, backspace_id, tokens)
  lengths = rng.integers(max(1, width // 2), width + 1, b)
  mask = np.arange(width)[None, :] < lengths[:, None]
  layout = sm.preprocess_actions(actions.astype(np.int32), backspace_id, pad_id=PAD_ID,
                                 actions_mask_BxL=mask.astype(np.int32))
  is_data = np.arange(b) < b - b // 2
  batch = dict(layout)
  batch.update(
      prompt=jnp.asarray(rng.integers(1, backspace_id, (b, args.prompt_len)), jnp.int32),
      prompt_mask=jnp.ones((b, args.prompt_len), jnp.int32),
      is_data=jnp.asarray(is_data, jnp.int32),
      truncated=jnp.asarray(~is_data & (rng.random(b) < 0.5)))
  return batch


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sft_step.add_step_args(parser)
  parser.add_argument("--actions", type=int, default=32,
                      help="raw actions per row L (the response layout is L + 1 wide)")
  parser.add_argument("--backspace_prob", type=float, default=0.15)
  args = parser.parse_args()
  if not 0.0 <= args.backspace_prob < 1.0:
    parser.error(f"--backspace_prob={args.backspace_prob} must be in [0, 1).")

  lm = build(sft_step.model_config(args))
  objective = sm.default_objective_config()
  objective.update(bc_steps=0, anneal_steps=0)  # β = beta_end from step 0: SM terms are live
  backspace_id = sm.resolve_backspace_id(objective, lm)
  loss_fn = objectives.make_loss_fn(objective, lm)
  batch = sm_batch(args, backspace_id)
  real = np.asarray(batch["response_mask"]).astype(bool)
  backspace_rate = float((np.asarray(batch["targets"])[real] == backspace_id).mean())

  result = dict(benchmark="sm_step", variant="gpt2", **sft_step.CONFIG, dtype=args.dtype,
                fence_residual_grads=sft_step.fence_residual_grads(args),
                batch=args.batch, prompt_len=args.prompt_len, actions=args.actions,
                response_len=args.actions + 1, backspace_id=backspace_id,
                backspace_rate=backspace_rate, data_rows=int(np.asarray(batch["is_data"]).sum()),
                objective=(f"sequencematch(gamma={objective.gamma}, chi2={objective.chi2_coef}, "
                           f"{objective.weighting}, {objective.terminal})"),
                optimizer="adamw", lr=sft_step.LR, steps=args.steps, warmup=args.warmup,
                **sft_step.machine())
  result.update(sft_step.bench_train_step(lm, loss_fn, batch, args))
  print(json.dumps(result))


if __name__ == "__main__":
  main()
