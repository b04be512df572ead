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

from jaxsi import sft_config

VARIANTS = sft_config.T5_VARIANTS
# The checkpoints' own tokenizers: all T5 v1.1 sizes share one 32100-token vocabulary.
_TOKENIZERS = {"t5_small": "google/t5-v1_1-small", "t5_base": "google/t5-v1_1-base",
               "t5_large": "google/t5-v1_1-large", "t5_xl": "google/t5-v1_1-xl"}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return sft_config.t5_sft(
      "xsum_sft.py", arg, task="xsum", tokenizers=_TOKENIZERS,
      data={"max_prompt_len": 1024, "max_response_len": 64},
      tiny_data={"max_prompt_len": 48, "max_response_len": 24},
      steps=40_000, warmup_steps=2_000, log_every=100, eval_every=5_000, checkpoint_every=2_000,
      eval_examples=1_000, eval_batch_size=64, best_metric="eval/rouge2")
