"""SFT-Sharpening on GSM8K with the paper's settings (spec/sharpening.md).

  python -m jaxsi.train --config=configs/gsm8k_sharpen.py:mistral --workdir=gs://bucket/sh_m
  python -m jaxsi.train --config=configs/gsm8k_sharpen.py:gpt2 --workdir=runs/sh_gpt2 \
      --config.base.source=runs/gsm8k_sft_gpt2        # a base fine-tuned on GSM8K
  python -m jaxsi.train --config=configs/gsm8k_sharpen.py:tiny --workdir=runs/sh_tiny  # CPU

The base model (`base.source`) is a jaxsi workdir or a Hugging Face checkpoint (directory or
hub id); the variant picks its architecture, whose shapes `model` must match:

  gpt2     GPT-2 small, "gpt2" (the default variant)
  llama    Llama-2-7B, "meta-llama/Llama-2-7b-hf" (bfloat16)
  mistral  Mistral-7B, "mistralai/Mistral-7B-v0.1", a model of the paper (bfloat16)
  t5       FLAN-T5-large, "google/flan-t5-large" (shapes and tokenizer of gsm8k_sft.py)
  tiny     a T5-tiny base trained here for a few steps on `tfds.testing.mock_data` with the
           char tokenizer (seconds, offline; `pipeline.base_steps`)

The pipeline then samples N = 50 responses per training prompt at temperature 1 (no top-k /
top-p) from the base, keeps the most likely one under the base (the self-reward, summed over
the response), writes them to WORKDIR/sharpen_data, fine-tunes the base on them in WORKDIR and
evaluates greedy, temperature-1 and best-of-N accuracy (N up to 50) of the sharpened model
and the base on the first 256 test problems (`eval/bon/...`, `eval/bon_base/...`).

Paper settings: N = 50 at temperature 1, 1-shot prompts (`data.num_shots = 1`), responses up
to 512 new tokens, the first 256 eval examples; SFT with LR 3e-4, linear decay, gradient
clipping 0.1, batch 4. The paper trains LoRA adapters; jaxsi fine-tunes all weights, which
may want a lower LR (--config.optim.lr). Our choices: AdamW, 2,048 training prompts (the
first of the train order), 1,000 SFT steps (about 2 epochs), the whole batch on one data
shard (mesh 1 x 1 x devices, tensor parallel) so that batch 4 fits any device count.
The hub checkpoints are not fine-tuned on GSM8K: an SFT'd base (e.g. a gsm8k_sft.py run)
is what the paper's instruct models correspond to.
"""

import os

import ml_collections

from jaxsi import config as config_lib
from jaxsi.data import tasks
from jaxsi.evals import best_of_n
from jaxsi.models import decoder
from jaxsi.objectives import sharpening

VARIANTS = ("gpt2", "llama", "mistral", "t5", "tiny")
_CHECKPOINTS = {"gpt2": "gpt2", "llama": "meta-llama/Llama-2-7b-hf",
                "mistral": "mistralai/Mistral-7B-v0.1", "t5": "google/flan-t5-large"}


def _model(variant: str) -> ml_collections.ConfigDict:
  """The model config matching the variant's checkpoint (shapes must agree)."""
  if variant == "gpt2":
    return decoder.default_config("gpt2")  # GPT-2 small's shape
  model = decoder.default_config("llama")
  if variant == "llama":
    model.update(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                 head_dim=128, d_ff=11008, max_len=4096, norm_eps=1e-5, dtype="bfloat16")
  else:  # mistral; its 4096-token sliding window equals full attention up to max_len
    model.update(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                 head_dim=128, d_ff=14336, max_len=4096, norm_eps=1e-5, dtype="bfloat16")
  return model


def _t5_sft_config(variant: str) -> ml_collections.ConfigDict:
  """gsm8k_sft.py's config of `variant` (FLAN-T5 model, tokenizer and GSM8K data)."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gsm8k_sft.py")
  return config_lib.load_config_file(f"{path}:{variant}")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "gpt2"
  if variant not in VARIANTS:
    raise ValueError(f"Unknown variant {variant!r} of gsm8k_sharpen.py; choose from "
                     f"{', '.join(VARIANTS)}.")
  tiny = variant == "tiny"

  if variant in ("t5", "tiny"):
    sft_config = _t5_sft_config("tiny" if tiny else "t5_large")
    data, model = sft_config.data, sft_config.model
  else:
    data = tasks.default_data_config("gsm8k")
    data.tokenizer = _CHECKPOINTS[variant]
    model = _model(variant)
  data.num_shots = 1
  data.max_prompt_len = 512
  data.max_response_len = 512
  data.truncation = "left"
  data.eval_size = 256

  config = config_lib.base_config(model=model, data=data)
  config.mesh.update(data=1, fsdp=1, tensor=-1)
  config.base = ml_collections.ConfigDict()
  config.base.source = "" if tiny else _CHECKPOINTS[variant]
  config.pipeline = ml_collections.ConfigDict({
      "base_steps": 0,         # used only when base.source and init_from are empty
      "base_lr": 3e-4,
      "base_init_from": "",
  })

  config.objective = sharpening.default_objective_config()
  config.objective.mode = "sft"
  config.objective.n = 50
  config.objective.temperature = 1.0
  config.objective.top_k = 0
  config.objective.top_p = 1.0
  config.objective.generate.num_prompts = 2048
  config.objective.generate.chunk_size = 16

  steps = ml_collections.FieldReference(1_000)
  config.train.steps = steps
  config.train.batch_size = 4
  config.train.log_every = 20
  config.train.eval_every = 0
  config.train.checkpoint_every = 250
  config.optim.name = "adamw"
  config.optim.lr = 3e-4
  config.optim.schedule = "linear"
  config.optim.warmup_steps = 0
  config.optim.total_steps = steps
  config.optim.end_lr_fraction = 0.0
  config.optim.grad_clip_norm = 0.1

  config.eval.num_examples = 256
  config.eval.batch_size = 16
  config.eval.max_new_tokens = data.max_response_len
  config.eval.temperatures = (0.0, 1.0)
  config.eval.best_of_n = best_of_n.default_config()
  config.eval.best_of_n.ns = (1, 2, 4, 8, 16, 32, 50)
  config.eval.best_of_n.batch_size = 4
  config.eval.best_of_n.num_examples = 256
  config.eval.best_of_n.train_prompts = 256
  config.checkpoint.best_metric = "eval/accuracy"
  config.checkpoint.best_mode = "max"

  if tiny:
    config.mesh.update(data=-1, fsdp=1, tensor=1)
    data.num_shots = 0
    data.max_prompt_len = 40
    data.max_response_len = 24
    data.eval_size = 16
    config.pipeline.base_steps = 4
    config.pipeline.base_lr = 1e-3
    config.objective.n = 4
    config.objective.generate.num_prompts = 16
    config.objective.generate.chunk_size = 8
    steps.set(4)
    config.train.batch_size = 8
    config.train.log_every = 2
    config.train.checkpoint_every = 2
    config.eval.num_examples = 8
    config.eval.batch_size = 8
    config.eval.max_new_tokens = data.max_response_len
    config.eval.best_of_n.ns = (1, 2, 4)
    config.eval.best_of_n.batch_size = 8
    config.eval.best_of_n.num_examples = 8
    config.eval.best_of_n.train_prompts = 8
  return config
