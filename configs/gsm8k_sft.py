"""Supervised fine-tuning of FLAN-T5 on GSM8K (question -> worked solution "... #### 72").

The GKD paper distills GSM8K with FLAN-T5 models; these runs give the fine-tuned teacher and
students (spec/gkd.md).

  python -m jaxsi.train --config=configs/gsm8k_sft.py:t5_small --workdir=gs://bucket/gsm8k_s
  python -m jaxsi.train --config=configs/gsm8k_sft.py:tiny --workdir=runs/gsm8k_tiny   # CPU

Variants: t5_small, t5_base, t5_large, t5_xl (FLAN-T5 shapes and tokenizer; t5_small without a
variant), and tiny.

Settings: batch 32, Adafactor at LR 3e-4, input 512 tokens (cut on the left, keeping the
question), output 320, dropout 0, as the spec lists for GSM8K (marked uncertain there). SFT
trains on the question alone (`data.num_shots = 0`); the paper's 4-shot chain-of-thought
prompts are `--config.data.num_shots=4`. Steps: 5K with 500 warmup steps, our choice: the
spec's 40K are for distillation, and 5K x 32 is already about 21 epochs of the 7,473 train
problems. Calculator notes ("<<6*4=24>>") are stripped from solutions, since the T5 vocabulary
cannot spell "<". Eval: final-answer accuracy on the 1319 problems of the test split (TFDS has
no GSM8K validation split), greedy. The `tiny` variant trains the `t5_tiny` preset with the
char tokenizer on `tfds.testing.mock_data` (`data.mock=True`, a testing aid) for a few steps.
"""

import ml_collections

from jaxsi import config as config_lib
from jaxsi.data import tasks
from jaxsi.models import t5

VARIANTS = ("t5_small", "t5_base", "t5_large", "t5_xl", "tiny")
# FLAN-T5 shares the T5 v1.1 shapes (the presets) and its 32100-token vocabulary.
_TOKENIZERS = {"t5_small": "google/flan-t5-small", "t5_base": "google/flan-t5-base",
               "t5_large": "google/flan-t5-large", "t5_xl": "google/flan-t5-xl"}
_TOKENIZER_SIZE = 32100


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "t5_small"
  if variant not in VARIANTS:
    raise ValueError(f"Unknown variant {variant!r} of gsm8k_sft.py; choose from "
                     f"{', '.join(VARIANTS)}.")
  tiny = variant == "tiny"

  data = tasks.default_data_config("gsm8k")
  data.tokenizer = "char" if tiny else _TOKENIZERS[variant]
  data.prompt_eos = True   # T5 saw its inputs end with EOS in pretraining
  data.max_prompt_len = 512
  data.max_response_len = 320
  data.truncation = "left"
  data.num_shots = 0

  model = t5.preset("t5_tiny" if tiny else variant)
  model.dropout_rate = 0.0
  if not tiny:
    model.num_real_tokens = _TOKENIZER_SIZE  # the 32128-row head is padded past the tokenizer

  config = config_lib.base_config(model=model, data=data)
  steps = ml_collections.FieldReference(5_000)
  config.train.steps = steps
  config.train.batch_size = 32
  config.train.log_every = 50
  config.train.eval_every = 1_000
  config.train.checkpoint_every = 1_000

  config.optim.name = "adafactor"
  config.optim.lr = 3e-4
  config.optim.schedule = "constant"
  config.optim.warmup_steps = 500
  config.optim.total_steps = steps

  config.eval.num_examples = 1_319
  config.eval.batch_size = 64
  config.eval.max_new_tokens = data.get_ref("max_response_len")
  config.checkpoint.best_metric = "eval/accuracy"
  config.checkpoint.best_mode = "max"

  if tiny:
    data.mock = True
    data.mock_num_examples = 64
    data.prompt_template = "Q: {question} A:"   # the char tokenizer has no newline
    data.max_prompt_len = 40
    data.max_response_len = 24
    steps.set(8)
    config.train.batch_size = 8
    config.train.log_every = 2
    config.train.eval_every = 4
    config.train.checkpoint_every = 4
    config.optim.warmup_steps = 2
    config.eval.num_examples = 16
    config.eval.batch_size = 16
  return config
