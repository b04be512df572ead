"""Supervised fine-tuning of T5 v1.1 on WMT14 English -> German translation.

The GKD paper's WMT teacher and students start distillation from these checkpoints
(spec/gkd.md).

  python -m jaxsi.train --config=configs/wmt_sft.py:t5_small --workdir=gs://bucket/wmt_sft_s
  python -m jaxsi.train --config=configs/wmt_sft.py:tiny --workdir=runs/wmt_tiny   # CPU, offline

Variants: t5_small, t5_base, t5_large, t5_xl (model size; t5_small without a variant), and tiny.

Paper settings (marked uncertain in the spec): batch 32, Adafactor at LR 3e-4 after 5K linear
warmup (then constant), 100K steps, input and output 80 tokens, dropout 0. Eval: BLEU
(sacrebleu) on the 3000 sentences of the validation split (newstest2013), decoded greedily
where the paper used beam search; checkpoints are ranked by BLEU. Prepare the dataset as
array_record (`tfds build wmt14_translate/de-en --file_format=array_record`): a tfrecord copy
of its 4.5M train pairs is read into the memory of every host. The `tiny` variant trains the
`t5_tiny` preset with the char tokenizer on `tfds.testing.mock_data` (`data.mock=True`, a
testing aid) for a few steps.
"""

import ml_collections

from jaxsi import sft_config

VARIANTS = sft_config.T5_VARIANTS
# The checkpoints' own tokenizers: all T5 v1.1 sizes share one 32100-token vocabulary.
_TOKENIZERS = {"t5_small": "google/t5-v1_1-small", "t5_base": "google/t5-v1_1-base",
               "t5_large": "google/t5-v1_1-large", "t5_xl": "google/t5-v1_1-xl"}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return sft_config.t5_sft(
      "wmt_sft.py", arg, task="wmt14_translate/de-en", tokenizers=_TOKENIZERS,
      data={"max_prompt_len": 80, "max_response_len": 80},
      tiny_data={"max_prompt_len": 64, "max_response_len": 24},
      steps=100_000, warmup_steps=5_000, log_every=100, eval_every=10_000,
      checkpoint_every=5_000, eval_examples=3_000, eval_batch_size=128, best_metric="eval/bleu")
