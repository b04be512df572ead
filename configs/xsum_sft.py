"""Supervised fine-tuning of T5 v1.1 on XSum (BBC article -> one-sentence summary).

These runs make the GKD paper's starting points: the T5-XL teacher and the T5-small/base/large
students each begin distillation from their XSum SFT checkpoint (spec/gkd.md).

  python -m jaxsi.train --config=configs/xsum_sft.py:t5_small --workdir=gs://bucket/xsum_sft_s
  python -m jaxsi.train --config=configs/xsum_sft.py:tiny --workdir=runs/xsum_tiny   # CPU, offline

Variants: t5_small, t5_base, t5_large, t5_xl (model size; t5_small without a variant), and tiny.

Paper settings: batch 32, Adafactor at LR 3e-4 after 2K linear warmup (then constant), input
1024 tokens (the article's beginning is kept), output 64, dropout 0. Steps: 40K, the length of
the paper's distillation runs; the paper gives no SFT length, and 40K x 32 is about six epochs
of XSum's 204K train articles. Eval: greedy ROUGE on the first 1000 validation articles;
checkpoints are ranked by ROUGE-2. The `tiny` variant trains the `t5_tiny` preset with the char
tokenizer on `tfds.testing.mock_data` (`data.mock=True`, a testing aid) for a few steps.
"""

import ml_collections

from jaxsi import config as config_lib
from jaxsi.data import tasks
from jaxsi.models import t5

VARIANTS = ("t5_small", "t5_base", "t5_large", "t5_xl", "tiny")
# The checkpoints' own tokenizers: all T5 v1.1 sizes share one 32100-token vocabulary.
_TOKENIZERS = {"t5_small": "google/t5-v1_1-small", "t5_base": "google/t5-v1_1-base",
               "t5_large": "google/t5-v1_1-large", "t5_xl": "google/t5-v1_1-xl"}
_TOKENIZER_SIZE = 32100


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "t5_small"
  if variant not in VARIANTS:
    raise ValueError(f"Unknown variant {variant!r} of xsum_sft.py; choose from "
                     f"{', '.join(VARIANTS)}.")
  tiny = variant == "tiny"

  data = tasks.default_data_config("xsum")
  data.tokenizer = "char" if tiny else _TOKENIZERS[variant]
  data.prompt_eos = True   # T5 saw its inputs end with EOS in pretraining
  data.max_prompt_len = 1024
  data.max_response_len = 64

  model = t5.preset("t5_tiny" if tiny else variant)
  model.dropout_rate = 0.0
  if not tiny:
    model.num_real_tokens = _TOKENIZER_SIZE  # the 32128-row head is padded past the tokenizer

  config = config_lib.base_config(model=model, data=data)
  steps = ml_collections.FieldReference(40_000)
  config.train.steps = steps
  config.train.batch_size = 32
  config.train.log_every = 100
  config.train.eval_every = 5_000
  config.train.checkpoint_every = 2_000

  config.optim.name = "adafactor"
  config.optim.lr = 3e-4
  config.optim.schedule = "constant"
  config.optim.warmup_steps = 2_000
  config.optim.total_steps = steps

  config.eval.num_examples = 1_000
  config.eval.batch_size = 64
  config.eval.max_new_tokens = data.get_ref("max_response_len")
  config.checkpoint.best_metric = "eval/rouge2"
  config.checkpoint.best_mode = "max"

  if tiny:
    data.mock = True
    data.mock_num_examples = 64
    data.max_prompt_len = 48
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
