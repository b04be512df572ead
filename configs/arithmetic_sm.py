"""SequenceMatch (imitation with backspace) on the synthetic arithmetic task, offline.

  python -m jaxsi.train --config=configs/arithmetic_sm.py --workdir=runs/sm
  python -m jaxsi.train --config=configs/arithmetic_sm.py:tiny --workdir=/tmp/sm   # seconds
  python -m jaxsi.tools.sm_sweep --config=configs/arithmetic_sm.py:small --workdir=runs/sm_sweep \
      --seeds=0,1,2 --noise=0,0.1,0.2   # MLE vs BC vs SM, the README table (CPU minutes)

Spec: spec/sequencematch.md (Cundy & Ermon, ICLR 2024). The model gains a <bksp> action (id 98,
the first padding row of the 128-wide head after the char tokenizer's 98 ids); data responses
are augmented with (wrong token, <bksp>) pairs; training is `objective.bc_steps` steps of BC,
then β·L_BC + (1 − β)·L_SM with β annealed from 1 to `beta_end` over `anneal_steps`, on
batches of half data, half samples from a replay buffer refreshed every `sample_every` steps
(`jaxsi.sm_batches`). Evals decode with backspace and score the text that remains.

The paper's schedule (k = 10,000 BC steps for arithmetic, β annealed over 2,000, LR warmup
2,000 then cosine) is scaled to a CPU-size run: 2,000 steps with k = 1,000 and the same 5 : 1
ratio of BC to anneal steps, warmup 100.

Noise knobs: --config.objective.noise_prob=0.2 (0 = plain BC data), --config.objective.noise=
random|task ("task" inserts a wrong digit or sign, "random" any token).

Variants: "" (GPT-2-style decoder, the demo), "small" (2 layers, 1,000 steps of batch 32, the
first 500 BC, β annealed over 100: the README's CPU reproduction, under a CPU-minute per run),
"tiny" (a few steps; tests and smoke runs).
"""

import ml_collections

from jaxsi import config as config_lib
from jaxsi.data import tasks
from jaxsi.data import tokenizers
from jaxsi.models import decoder
from jaxsi.objectives import sequencematch

VARIANTS = ("", "small", "tiny")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or ""
  if variant not in VARIANTS:
    raise ValueError(f"Unknown variant {variant!r} of arithmetic_sm.py; choose from "
                     f"{VARIANTS[1:]}.")

  data = tasks.default_data_config()
  data.digits = 1  # one-digit operands in bases 2..16, as the SFT demo

  model = decoder.default_config("gpt2")
  model.vocab_size = 128
  # The char tokenizer's ids; the <bksp> row then takes id 98 and the head stays 128 wide.
  model.num_real_tokens = tokenizers.CharTokenizer.vocab_size
  model.d_model = 128
  model.num_layers = 4
  model.num_heads = 4
  model.num_kv_heads = 4
  model.head_dim = 32
  model.d_ff = 512
  model.max_len = 64  # prompt 29 + actions 2 × 4 + 1 fit with room
  model.fence_residual_grads = True  # a CPU demo: faster backward (jaxsi/models/grad_fence.py)

  config = config_lib.base_config(model=model, data=data)
  config.objective = sequencematch.default_objective_config()
  config.objective.noise_prob = 0.1
  config.objective.noise = "task"
  config.objective.bc_steps = 1000
  config.objective.anneal_steps = 200
  config.objective.beta_end = 0.2
  config.objective.sample_every = 20
  config.objective.buffer_size = 512

  steps = ml_collections.FieldReference(2000)
  config.train.steps = steps
  config.train.batch_size = 64
  config.train.log_every = 50
  config.train.eval_every = 500
  config.train.checkpoint_every = 500

  config.optim.name = "adamw"
  config.optim.lr = 1e-3
  config.optim.schedule = "cosine"
  config.optim.warmup_steps = 100
  config.optim.total_steps = steps
  config.optim.end_lr_fraction = 0.1
  config.optim.weight_decay = 0.01
  config.optim.grad_clip_norm = 1.0

  config.eval.num_examples = 200
  config.eval.batch_size = 200
  config.eval.max_new_tokens = data.max_response_len

  if variant == "small":
    model.num_layers = 2
    steps.set(1000)
    config.train.batch_size = 32
    config.objective.bc_steps = 500
    config.objective.anneal_steps = 100
  if variant == "tiny":
    model.d_model = 32
    model.num_layers = 2
    model.num_heads = 2
    model.num_kv_heads = 2
    model.head_dim = 16
    model.d_ff = 64
    steps.set(6)
    config.objective.bc_steps = 2
    config.objective.anneal_steps = 2
    config.objective.sample_every = 2
    config.objective.buffer_size = 32
    config.train.batch_size = 16
    config.train.log_every = 2
    config.train.eval_every = 0
    config.train.checkpoint_every = 2
    config.optim.warmup_steps = 1
    config.eval.num_examples = 16
    config.eval.batch_size = 16
  return config
