"""SFT of a tiny decoder on the synthetic arithmetic task: the offline demo and test bed.

  python -m jaxsi.train --config=configs/arithmetic_sft.py --workdir=runs/demo
  python -m jaxsi.train --config=configs/arithmetic_sft.py:llama --workdir=runs/llama

Variants: "" (GPT-2 style, the README demo), "llama" (RoPE/RMSNorm/SwiGLU/GQA), "tiny" (a few
steps, for tests and smoke runs).
"""

import ml_collections

from jaxsi import config as config_lib
from jaxsi.data import tasks
from jaxsi.models import decoder

VARIANTS = ("", "gpt2", "llama", "tiny")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or ""
  if variant not in VARIANTS:
    raise ValueError(f"Unknown variant {variant!r} of arithmetic_sft.py; choose from {VARIANTS[1:]}.")

  data = tasks.default_data_config()
  data.digits = 1  # the demo difficulty: one-digit operands in bases 2..16

  model = decoder.default_config("llama" if variant == "llama" else "gpt2")
  model.vocab_size = 128  # the char tokenizer has 98 ids; a round head width
  model.d_model = 128
  model.num_layers = 4
  model.num_heads = 4
  model.num_kv_heads = 2 if variant == "llama" else 4
  model.head_dim = 32
  model.d_ff = 512 if variant != "llama" else 352
  model.max_len = 64
  model.fence_residual_grads = True  # a CPU demo: faster backward (jaxsi/models/grad_fence.py)

  config = config_lib.base_config(model=model, data=data)
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

  if variant == "tiny":
    model.d_model = 32
    model.num_layers = 2
    model.num_heads = 2
    model.num_kv_heads = 2
    model.head_dim = 16
    model.d_ff = 64
    steps.set(8)
    config.train.batch_size = 16
    config.train.log_every = 2
    config.train.eval_every = 4
    config.train.checkpoint_every = 4
    config.optim.warmup_steps = 2
    config.eval.num_examples = 16
    config.eval.batch_size = 16
  return config
