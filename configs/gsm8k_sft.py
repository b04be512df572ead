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

from jaxsi import sft_config

VARIANTS = sft_config.T5_VARIANTS
# FLAN-T5 shares the T5 v1.1 shapes (the presets) and its 32100-token vocabulary.
_TOKENIZERS = {"t5_small": "google/flan-t5-small", "t5_base": "google/flan-t5-base",
               "t5_large": "google/flan-t5-large", "t5_xl": "google/flan-t5-xl"}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return sft_config.t5_sft(
      "gsm8k_sft.py", arg, task="gsm8k", tokenizers=_TOKENIZERS,
      data={"max_prompt_len": 512, "max_response_len": 320, "truncation": "left",
            "num_shots": 0},
      # the char tokenizer has no newline
      tiny_data={"prompt_template": "Q: {question} A:", "max_prompt_len": 40,
                 "max_response_len": 24},
      steps=5_000, warmup_steps=500, log_every=50, eval_every=1_000, checkpoint_every=1_000,
      eval_examples=1_319, eval_batch_size=64, best_metric="eval/accuracy")
