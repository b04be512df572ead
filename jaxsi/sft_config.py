"""Building a T5 SFT experiment config for a TFDS task.

The XSum, WMT and GSM8K SFT configs differ only in the task, the hub tokenizers, the lengths
and the schedule; the shared shape (T5 preset, padded head, Adafactor at 3e-4 with linear
warmup, the tiny CPU variant on TFDS mock data) is built here once.
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections

from jaxsi import config as config_lib
from jaxsi.data import tasks
from jaxsi.models import t5

T5_VARIANTS = ("t5_small", "t5_base", "t5_large", "t5_xl", "tiny")
# Every T5 v1.1 / FLAN-T5 size uses one 32100-token vocabulary; the head has 32128 rows.
T5_TOKENIZER_SIZE = 32100


def t5_sft(file_name: str, variant: str | None, *, task: str, tokenizers: Mapping[str, str],
           data: Mapping[str, Any], tiny_data: Mapping[str, Any], steps: int, warmup_steps: int,
           log_every: int, eval_every: int, checkpoint_every: int, eval_examples: int,
           eval_batch_size: int, best_metric: str) -> ml_collections.ConfigDict:
  """An SFT config of the `variant` T5 on TFDS task `task`.

  Args:
    file_name: the config file's name, for the unknown-variant message.
    variant: one of T5_VARIANTS (None = "t5_small").
    task: the `data.name` of the task.
    tokenizers: hub tokenizer id per size.
    data, tiny_data: `data.*` values for the full-size and the tiny variants.
    steps, warmup_steps: training length and linear warmup (then a constant 3e-4).
    log_every, eval_every, checkpoint_every: `train.*` intervals.
    eval_examples, eval_batch_size: the eval set.
    best_metric: the eval metric that ranks checkpoints.
  """
  variant = variant or "t5_small"
  if variant not in T5_VARIANTS:
    raise ValueError(f"Unknown variant {variant!r} of {file_name}; choose from "
                     f"{', '.join(T5_VARIANTS)}.")
  tiny = variant == "tiny"

  data_config = tasks.default_data_config(task)
  data_config.tokenizer = "char" if tiny else tokenizers[variant]
  data_config.prompt_eos = True   # T5 saw its inputs end with EOS in pretraining
  data_config.update(dict(data))

  model = t5.preset("t5_tiny" if tiny else variant)
  model.dropout_rate = 0.0
  if not tiny:
    model.num_real_tokens = T5_TOKENIZER_SIZE  # the 32128-row head is padded past the tokenizer

  config = config_lib.base_config(model=model, data=data_config)
  steps_ref = ml_collections.FieldReference(steps)
  config.train.steps = steps_ref
  config.train.batch_size = 32
  config.train.log_every = log_every
  config.train.eval_every = eval_every
  config.train.checkpoint_every = checkpoint_every

  config.optim.name = "adafactor"
  config.optim.lr = 3e-4
  config.optim.schedule = "constant"
  config.optim.warmup_steps = warmup_steps
  config.optim.total_steps = steps_ref

  config.eval.num_examples = eval_examples
  config.eval.batch_size = eval_batch_size
  config.eval.max_new_tokens = data_config.get_ref("max_response_len")
  config.checkpoint.best_metric = best_metric
  config.checkpoint.best_mode = "max"

  if tiny:
    data_config.mock = True
    data_config.mock_num_examples = 64
    data_config.update(dict(tiny_data))
    steps_ref.set(8)
    config.train.batch_size = 8
    config.train.log_every = 2
    config.train.eval_every = 4
    config.train.checkpoint_every = 4
    config.optim.warmup_steps = 2
    config.eval.num_examples = 16
    config.eval.batch_size = 16
  return config
