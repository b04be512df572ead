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
    raise ValueError(f"Unknown variant {variant!r} of wmt_sft.py; choose from "
                     f"{', '.join(VARIANTS)}.")
  tiny = variant == "tiny"

  data = tasks.default_data_config("wmt14_translate/de-en")
  data.tokenizer = "char" if tiny else _TOKENIZERS[variant]
  data.prompt_eos = True   # T5 saw its inputs end with EOS in pretraining
  data.max_prompt_len = 80
  data.max_response_len = 80

  model = t5.preset("t5_tiny" if tiny else variant)
  model.dropout_rate = 0.0
  if not tiny:
    model.num_real_tokens = _TOKENIZER_SIZE  # the 32128-row head is padded past the tokenizer

  config = config_lib.base_config(model=model, data=data)
  steps = ml_collections.FieldReference(100_000)
  config.train.steps = steps
  config.train.batch_size = 32
  config.train.log_every = 100
  config.train.eval_every = 10_000
  config.train.checkpoint_every = 5_000

  config.optim.name = "adafactor"
  config.optim.lr = 3e-4
  config.optim.schedule = "constant"
  config.optim.warmup_steps = 5_000
  config.optim.total_steps = steps

  config.eval.num_examples = 3_000
  config.eval.batch_size = 128
  config.eval.max_new_tokens = data.get_ref("max_response_len")
  config.checkpoint.best_metric = "eval/bleu"
  config.checkpoint.best_mode = "max"

  if tiny:
    data.mock = True
    data.mock_num_examples = 64
    data.max_prompt_len = 64
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
