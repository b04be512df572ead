"""SFT-Sharpening on the synthetic arithmetic task: the offline Sharpening job.

  python -m jaxsi.train --config=configs/arithmetic_sharpen.py --workdir=runs/sharpen
  python -m jaxsi.train --config=configs/arithmetic_sharpen.py:tiny --workdir=runs/sh_tiny

With no base model given (`base.source` and `init_from` empty) the run first trains an
UNDER-TRAINED base by SFT into WORKDIR/base (`pipeline.base_steps`, few on purpose: a model
that is often wrong but whose likelihood still knows something, the regime where sharpening
can help), then samples best-of-N of the base on the first training prompts into
WORKDIR/sharpen_data (the generate stage), then fine-tunes the base on those selected answers
in WORKDIR (the sharpen stage), and last evaluates the sharpened model and the base with
greedy decoding, temperature-1 sampling and best-of-N by likelihood (`eval.best_of_n`, rows
`eval/bon/...` and `eval/bon_base/...` in WORKDIR/metrics.jsonl). Rerunning reuses finished
stages. Give a trained base with --config.base.source=RUN_OR_HF_DIR.

Settings (spec/sharpening.md): N = 32 samples at temperature 1 (no top-k / top-p), the
self-reward log π_base(y|x) summed over the response (`objective.normalize=True`: per token);
SFT with AdamW at LR 3e-4, linear decay to 0, gradient clipping at 0.1 as the paper's SFT,
but batch 64 and full fine-tuning of a model trained from scratch (the paper: LoRA, batch 4);
the base: 300 steps at LR 1e-3 with the same schedule (about 25 % greedy accuracy).

Variants: "" (a GPT-2-style decoder, CPU minutes) and "tiny" (seconds; tests).
"""

import ml_collections

from jaxsi import config as config_lib
from jaxsi.data import tasks
from jaxsi.evals import best_of_n
from jaxsi.models import decoder
from jaxsi.objectives import sharpening

VARIANTS = ("", "tiny")


def _decoder(width: int, layers: int, heads: int) -> ml_collections.ConfigDict:
  model = decoder.default_config("gpt2")
  model.update(vocab_size=128, d_model=width, num_layers=layers, num_heads=heads,
               num_kv_heads=heads, head_dim=width // heads, d_ff=4 * width, max_len=64)
  model.fence_residual_grads = True  # a CPU demo: faster backward (jaxsi/models/grad_fence.py)
  return model


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or ""
  if variant not in VARIANTS:
    raise ValueError(f"Unknown variant {variant!r} of arithmetic_sharpen.py; choose from "
                     f"{VARIANTS[1:]}.")
  data = tasks.default_data_config()
  data.digits = 1
  config = config_lib.base_config(model=_decoder(128, 4, 4), data=data)

  config.base = ml_collections.ConfigDict()
  config.base.source = ""      # a jaxsi workdir or HF checkpoint; empty: train one
  config.pipeline = ml_collections.ConfigDict({
      "base_steps": 300,
      "base_lr": 1e-3,
      "base_init_from": "",    # start the base's SFT from a checkpoint instead of scratch
  })

  config.objective = sharpening.default_objective_config()
  config.objective.mode = "sft"
  config.objective.n = 32
  config.objective.temperature = 1.0
  config.objective.generate.num_prompts = 4096
  config.objective.generate.chunk_size = 256

  steps = ml_collections.FieldReference(200)
  config.train.steps = steps
  config.train.batch_size = 64
  config.train.log_every = 50
  config.train.eval_every = 0
  config.train.checkpoint_every = 100
  config.optim.name = "adamw"
  config.optim.lr = 3e-4
  config.optim.schedule = "linear"
  config.optim.warmup_steps = 0
  config.optim.total_steps = steps
  config.optim.end_lr_fraction = 0.0
  config.optim.grad_clip_norm = 0.1

  config.eval.num_examples = 200
  config.eval.batch_size = 200
  config.eval.max_new_tokens = data.max_response_len
  config.eval.temperatures = (0.0, 1.0)
  config.eval.best_of_n = best_of_n.default_config()
  config.eval.best_of_n.ns = (1, 2, 4, 8, 16, 32)
  config.eval.best_of_n.batch_size = 200
  config.eval.best_of_n.num_examples = 200
  config.eval.best_of_n.train_prompts = 200

  if variant == "tiny":
    config.model = _decoder(32, 1, 2)
    config.pipeline.base_steps = 3
    config.objective.n = 4
    config.objective.generate.num_prompts = 24
    config.objective.generate.chunk_size = 16
    steps.set(4)
    config.train.batch_size = 16
    config.train.log_every = 2
    config.train.checkpoint_every = 2
    config.eval.num_examples = 16
    config.eval.batch_size = 16
    config.eval.best_of_n.ns = (1, 2, 4)
    config.eval.best_of_n.batch_size = 16
    config.eval.best_of_n.num_examples = 16
    config.eval.best_of_n.train_prompts = 8
  return config
