"""SequenceMatch on open-ended text continuation (OpenWebText-style), GPT-2 or Llama.

  python -m jaxsi.train --config=configs/owt_sm.py --workdir=gs://bucket/owt_sm \
      --config.data.files='("/data/openwebtext/*.txt",)'
  python -m jaxsi.train --config=configs/owt_sm.py:tiny --workdir=/tmp/owt_sm     # CPU, offline
  python -m jaxsi.tools.sm_sweep --config=configs/owt_sm.py:small --workdir=runs/sm_text \
      --seeds=0,1,2 --noise=0.05      # MLE vs BC vs SM diversity, offline, minutes on a CPU

Spec: spec/sequencematch.md, text experiments: prompts of 256 tokens, 256 generated, sampled at
temperature 1 with top-p 1 (training samples and evals alike); k = 1,000 BC steps, β annealed
from 1 to 0.2 over 2,000 steps, LR warmup 2,000 steps then cosine. The paper reports MAUVE,
n-gram entropy, diversity and perplexity; jaxsi scores diversity and 4-gram entropy of the
generated text (`jaxsi.data.text_files`; MAUVE needs a feature model outside jaxsi).

Data: the `text_continuation` task. OpenWebText is not in the TFDS catalogue, so the default
reads local text files, one document per file (`data.files`, glob patterns); any TFDS text
dataset works too (`--config.data.source=tfds --config.data.tfds_name=c4/en`).

Variants:
  "" / "gpt2"   GPT-2 small from the Hugging Face checkpoint "gpt2" (init_from).
  "gpt2_medium" GPT-2 medium ("gpt2-medium").
  "llama"       Llama-2-7B ("meta-llama/Llama-2-7b-hf"; full fine-tuning in bfloat16 on a pod:
                the paper's QLoRA adapters are not part of jaxsi).
  "tiny"        a random 2-layer decoder on generated lines with the char tokenizer (seconds).
  "small"       a random 2-layer decoder (width 64) on the offline grammar corpus
                (`jaxsi.data.grammar_corpus`, 4,000 documents) with the char tokenizer:
                prompts of 31 characters, continuations of 64, 1,000 steps of batch 24 with
                the first half BC; the README's CPU reproduction of the diversity metrics.
                Evals score 100 held-out continuations.
Settings marked "our choice" are not in the paper: 10,000 steps, batch 32, AdamW at 5e-5
(GPT-2) / 1e-5 (Llama), noise_prob 0.05 of random tokens, a buffer of 1,024 sequences refreshed
every 100 steps.
"""

import ml_collections

from jaxsi import config as config_lib
from jaxsi.data import text_files
from jaxsi.models import decoder
from jaxsi.objectives import sequencematch

VARIANTS = ("", "gpt2", "gpt2_medium", "llama", "tiny", "small")
_CHECKPOINTS = {"gpt2": "gpt2", "gpt2_medium": "gpt2-medium",
                "llama": "meta-llama/Llama-2-7b-hf"}


def _model(variant: str) -> ml_collections.ConfigDict:
  """The model config matching the variant's Hugging Face checkpoint (shapes must agree)."""
  if variant == "llama":
    model = decoder.default_config("llama")
    model.update(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                 head_dim=128, d_ff=11008, max_len=4096, norm_eps=1e-5, dtype="bfloat16")
    return model
  model = decoder.default_config("gpt2")  # GPT-2 small's shape
  if variant == "gpt2_medium":
    model.update(d_model=1024, num_layers=24, num_heads=16, num_kv_heads=16, d_ff=4096)
  return model


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "gpt2"
  if variant not in VARIANTS:
    raise ValueError(f"Unknown variant {variant!r} of owt_sm.py; choose from {VARIANTS[1:]}.")
  tiny = variant == "tiny"
  small = variant == "small"

  data = text_files.default_data_config()
  data.source = "files"
  data.files = ("data/openwebtext/*.txt",)
  data.document_per = "file"
  data.tokenizer = "char" if small else _CHECKPOINTS.get(variant, "gpt2")
  data.max_prompt_len = 256
  data.max_response_len = 256

  model = _model(variant)
  config = config_lib.base_config(model=model, data=data)
  config.init_from = "" if small else _CHECKPOINTS.get(variant, "")

  config.objective = sequencematch.default_objective_config()
  config.objective.noise = "random"
  config.objective.noise_prob = 0.05
  config.objective.bc_steps = 1_000
  config.objective.anneal_steps = 2_000
  config.objective.beta_end = 0.2
  config.objective.sample_every = 100
  config.objective.buffer_size = 1_024
  config.objective.sample_temperature = 1.0
  config.objective.top_p = 1.0

  steps = ml_collections.FieldReference(10_000)
  config.train.steps = steps
  config.train.batch_size = 32
  config.train.log_every = 50
  config.train.eval_every = 2_000
  config.train.checkpoint_every = 1_000

  config.optim.name = "adamw"
  config.optim.lr = 1e-5 if variant == "llama" else 5e-5
  config.optim.schedule = "cosine"
  config.optim.warmup_steps = 2_000
  config.optim.total_steps = steps
  config.optim.end_lr_fraction = 0.1
  config.optim.grad_clip_norm = 1.0

  config.eval.num_examples = 500
  config.eval.batch_size = 32
  config.eval.max_new_tokens = data.get_ref("max_response_len")
  config.eval.temperatures = (1.0,)   # the paper samples at temperature 1
  config.checkpoint.best_metric = ""  # no single "better" direction for open-ended text

  if tiny:
    data.source = "generated"
    data.num_generated = 64
    data.tokenizer = "char"
    data.max_prompt_len = 24
    data.max_response_len = 12
    data.eval_size = 8
    model.update(vocab_size=128, num_real_tokens=98, d_model=32, num_layers=2, num_heads=2,
                 num_kv_heads=2, head_dim=16, d_ff=64, max_len=64)
    config.init_from = ""
    config.objective.bc_steps = 2
    config.objective.anneal_steps = 2
    config.objective.sample_every = 2
    config.objective.buffer_size = 32
    steps.set(4)
    config.train.batch_size = 8
    config.train.log_every = 2
    config.train.eval_every = 0
    config.train.checkpoint_every = 2
    config.optim.lr = 1e-3
    config.optim.warmup_steps = 1
    config.eval.num_examples = 8
    config.eval.batch_size = 8
  if small:
    data.source = "grammar"
    data.num_generated = 4_000
    data.max_prompt_len = 32  # BOS + 31 characters
    data.max_response_len = 64
    data.eval_size = 100
    # The first 98 ids are the char tokenizer's; <bksp> takes 98, the head stays 128 wide.
    model.update(vocab_size=128, num_real_tokens=98, d_model=64, num_layers=2, num_heads=2,
                 num_kv_heads=2, head_dim=32, d_ff=256, max_len=192)
    config.objective.bc_steps = 500
    config.objective.anneal_steps = 100
    config.objective.sample_every = 20
    config.objective.buffer_size = 256
    steps.set(1_000)
    config.train.batch_size = 24
    config.train.eval_every = 0
    config.train.checkpoint_every = 500
    config.optim.lr = 3e-3
    config.optim.warmup_steps = 50
    config.eval.num_examples = 100
    config.eval.batch_size = 100
  return config
