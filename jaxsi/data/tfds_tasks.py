"""Tasks on TensorFlow Datasets: XSum summaries, WMT14 English->German, GSM8K math.

| task (`data.name`)      | prompt               | response | score (headline first)     |
|-------------------------|----------------------|----------|----------------------------|
| "xsum"                  | document             | summary  | rouge2, rouge1, rougeL     |
| "wmt14_translate/de-en" | English sentence     | German   | bleu                       |
| "gsm8k"                 | question (+ shots)   | solution | accuracy of final answers  |

Reading order. Row r of the global batch of step s is global example g = s * batch_size + r;
it is train record `permutation(seed, epoch)[g % N]` with epoch = g // N and N the number
of train records. Batches are thus a pure function of (config, step): a resumed run, or one
that skipped steps, reads exactly what an uninterrupted run reads, and the hosts' slices
concatenate to the single-host batch. That needs random access to the split:
`builder.as_data_source` gives it for datasets prepared as array_record (prepare with
`tfds build NAME --file_format=array_record`); a split prepared as tfrecord is read once
into memory instead, which is fine for XSum and GSM8K but costs gigabytes for WMT.

Lengths. Prompt and response are tokenized without specials, cut to fit, then framed: BOS
(when the tokenizer has one) + prompt (+ EOS with `prompt_eos`, as T5 was pretrained), and
response + EOS. Prompts longer than `max_prompt_len` follow `truncation`: "right" keeps the
beginning (the lead of a news article carries its gist, the default for XSum and WMT),
"left" keeps the end (the question after GSM8K's few-shot examples), "error" raises.
Responses are always cut on the right and keep their EOS in the last slot, so a model
learns to stop within `max_response_len`.

`data.mock=True` is a testing aid: it reads `tfds.testing.mock_data` (random strings of
letters and spaces, the same records in every split) instead of the prepared dataset, so
tests and the `tiny` configs run offline.
"""

from __future__ import annotations

import dataclasses
import re
import string
from typing import Any, Sequence

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from jaxsi.data import tasks
from jaxsi.data import tokenizers
from jaxsi.evals import metrics

TRUNCATION_MODES = ("error", "left", "right")


@dataclasses.dataclass(frozen=True)
class _Defaults:
  """The per-task defaults of `default_data_config`."""
  eval_split: str
  tokenizer: str
  prompt_template: str
  max_prompt_len: int
  max_response_len: int
  truncation: str


_DEFAULTS = {
    # Lengths from the GKD paper (spec/gkd.md): XSum 1024/64, WMT 80/80, GSM8K 512/320.
    "xsum": _Defaults(eval_split="validation", tokenizer="google/t5-v1_1-small",
                      prompt_template="summarize: {document}", max_prompt_len=1024,
                      max_response_len=64, truncation="right"),
    "wmt14_translate/de-en": _Defaults(
        eval_split="validation", tokenizer="google/t5-v1_1-small",
        prompt_template="translate English to German: {en}", max_prompt_len=80,
        max_response_len=80, truncation="right"),
    # GSM8K has no validation split in TFDS: eval reads the test split.
    "gsm8k": _Defaults(eval_split="test", tokenizer="google/flan-t5-small",
                       prompt_template="Q: {question}\nA:", max_prompt_len=512,
                       max_response_len=320, truncation="left"),
}


def default_data_config(name: str) -> ml_collections.ConfigDict:
  """The data config of TFDS task `name`, every key it reads with its default.

  Keys:
    name: the task ("xsum", "wmt14_translate/de-en" or "gsm8k").
    tfds_name: the TFDS dataset, optionally with config and version ("xsum:1.1.0").
    train_split, eval_split: TFDS split names (slices such as "train[:90%]" work too).
    data_dir: where the prepared dataset lives (None: TFDS's default, ~/tensorflow_datasets).
    download: prepare the dataset when missing (off by default: on a pod every host would
      download; prepare once beforehand instead).
    tokenizer: a Hugging Face tokenizer name or path, or "char".
    prompt_template: `str.format` text filled with the record's fields.
    prompt_eos: end prompts with EOS (T5's pretraining format).
    max_prompt_len, max_response_len: the batch widths S and T.
    truncation: how over-long prompts are cut: "right", "left" or "error".
    seed: the train order's seed.
    eval_size: how many eval-split records `eval_examples()` returns by default.
    mock, mock_num_examples: read `tfds.testing.mock_data` with this many records per split
      (a testing aid; see the module docstring).
    num_shots (gsm8k): solved train problems put before each question; they are then left
      out of the train order.
    strip_calculator_annotations (gsm8k): drop GSM8K's "<<6*4=24>>" calculator notes from
      solutions (T5's vocabulary cannot spell "<").
  """
  if name not in _DEFAULTS:
    raise ValueError(f"Unknown TFDS task {name!r}; known TFDS tasks are: "
                     f"{', '.join(sorted(_DEFAULTS))}.")
  defaults = _DEFAULTS[name]
  config = ml_collections.ConfigDict()
  config.name = name
  config.tfds_name = name
  config.train_split = "train"
  config.eval_split = defaults.eval_split
  config.data_dir = ml_collections.config_dict.placeholder(str)
  config.download = False
  config.tokenizer = defaults.tokenizer
  config.prompt_template = defaults.prompt_template
  config.prompt_eos = False
  config.max_prompt_len = defaults.max_prompt_len
  config.max_response_len = defaults.max_response_len
  config.truncation = defaults.truncation
  config.seed = 0
  config.eval_size = 1000
  config.mock = False
  config.mock_num_examples = 64
  if name == "gsm8k":
    config.num_shots = 0
    config.strip_calculator_annotations = True
  return config


def _text(value: Any) -> str:
  """A text feature as str: data sources give bytes for prepared data, str under mock."""
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode("utf-8")
  return str(value)


def load_split(tfds_name: str, split: str, *, data_dir: str | None = None,
               download: bool = False, mock_num_examples: int | None = None
               ) -> Sequence[dict[str, Any]]:
  """One split of a TFDS dataset as a random-access sequence of records.

  Args:
    tfds_name: the dataset name, e.g. "xsum" or "wmt14_translate/de-en".
    split: the split, e.g. "train" or "validation[:100]".
    data_dir: the TFDS data directory (None: the default one).
    download: prepare the dataset (as array_record) when it is missing.
    mock_num_examples: read `tfds.testing.mock_data` with this many records instead.

  Returns:
    A sequence supporting len() and [index], each record a dict of feature values: an
    array_record data source (random access from disk), or a list when the dataset was
    prepared as tfrecord (read whole into memory, in file order) or mocked.

  Raises:
    ValueError: the dataset is unknown or not prepared, or the split does not exist.
  """
  if mock_num_examples is not None:
    with tfds.testing.mock_data(num_examples=mock_num_examples):
      records = tfds.builder(tfds_name, data_dir=data_dir).as_data_source(split=split)
    # A list: the mock data source's batched read (__getitems__) is broken in TFDS 4.9.
    return [records[index] for index in range(len(records))]

  try:
    builder = tfds.builder(tfds_name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(f"data.tfds_name={tfds_name!r} is not a TFDS dataset; use a name from "
                     "tfds.list_builders(), e.g. 'xsum'.") from None
  if not builder.is_prepared():
    if not download:
      raise ValueError(
          f"TFDS dataset {tfds_name!r} is not prepared in data_dir={data_dir!r}; run `tfds "
          f"build {tfds_name} --file_format=array_record` once or set data.download=True.")
    builder.download_and_prepare(file_format="array_record")
  split_name = split.split("[")[0]
  if split_name not in builder.info.splits:
    raise ValueError(f"Split {split!r} does not exist in TFDS dataset {tfds_name!r}; its "
                     f"splits are: {', '.join(sorted(builder.info.splits))}.")
  try:
    return builder.as_data_source(split=split)
  except NotImplementedError:
    pass  # Prepared as tfrecord: no random access, read the split into memory below.
  return list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))


def read_records(source: Sequence[dict[str, Any]], indices: Sequence[int]
                 ) -> list[dict[str, Any]]:
  """The records at `indices`, in that order, read in one batched call when the source can.

  An array_record data source reads a batch with one parallel request per file instead of
  one round trip per record, which matters when the data lives on GCS.
  """
  if hasattr(source, "__getitems__"):
    return list(source.__getitems__(list(indices)))
  return [source[index] for index in indices]


class TfdsTask(tasks.Task):
  """A prompt -> response task over one TFDS dataset (see the module docstring).

  Subclasses name the response field and the metric; the prompt is `prompt_template` filled
  with the record's fields.
  """

  response_field: str

  def __init__(self, data_config: ml_collections.ConfigDict):
    self.name = data_config.name
    self.config = data_config
    self._check_config(data_config)
    self.tokenizer = tokenizers.get_tokenizer(data_config.tokenizer)
    self.max_prompt_len = data_config.max_prompt_len
    self.max_response_len = data_config.max_response_len
    self.truncation = data_config.truncation
    self.eval_size = data_config.eval_size
    self.seed = data_config.seed
    self._prompt_specials = (
        ([self.tokenizer.bos_id] if self.tokenizer.bos_id is not None else []),
        ([self.tokenizer.eos_id] if data_config.prompt_eos else []))
    if self.max_prompt_len <= sum(map(len, self._prompt_specials)):
      raise ValueError(f"data.max_prompt_len={self.max_prompt_len} leaves no room for text "
                       "next to the prompt's BOS/EOS; raise it.")
    self._train = self._load(data_config.train_split)
    self._eval = None  # Loaded on first use: training alone never needs it.
    self._num_shots = data_config.get("num_shots", 0)
    self._num_train = len(self._train) - self._num_shots
    if self._num_train < 1:
      raise ValueError(f"data.num_shots={self._num_shots} uses all {len(self._train)} train "
                       "records as examples; lower it so some are left to train on.")
    self._permutations: dict[int, np.ndarray] = {}

  @staticmethod
  def _check_config(config: ml_collections.ConfigDict) -> None:
    for key in ("max_prompt_len", "max_response_len", "eval_size"):
      value = config[key]
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"data.{key}={value!r} is invalid; use a positive integer.")
    if not isinstance(config.mock_num_examples, int) or config.mock_num_examples < 0:
      raise ValueError(f"data.mock_num_examples={config.mock_num_examples!r} is invalid; use a "
                       "non-negative integer.")
    if config.max_response_len < 2:
      raise ValueError(f"data.max_response_len={config.max_response_len} leaves no room for "
                       "a token before EOS; use at least 2.")
    if config.truncation not in TRUNCATION_MODES:
      raise ValueError(f"data.truncation={config.truncation!r} is invalid; use one of "
                       f"{TRUNCATION_MODES}.")
    if not isinstance(config.seed, int) or config.seed < 0:
      raise ValueError(f"data.seed={config.seed!r} is invalid; use a non-negative integer.")
    num_shots = config.get("num_shots", 0)
    if not isinstance(num_shots, int) or num_shots < 0:
      raise ValueError(f"data.num_shots={num_shots!r} is invalid; use a non-negative integer.")
    try:
      fields = [field for _, field, _, _ in string.Formatter().parse(config.prompt_template)
                if field is not None]
    except ValueError as error:
      raise ValueError(f"data.prompt_template={config.prompt_template!r} is not a valid format "
                       f"string ({error}); write fields as {{name}} and braces as {{{{ }}}}."
                       ) from None
    if not fields:
      raise ValueError(f"data.prompt_template={config.prompt_template!r} has no {{field}}; "
                       "name a feature of the dataset, e.g. '{document}'.")

  def _load(self, split: str) -> Sequence[dict[str, Any]]:
    records = load_split(
        self.config.tfds_name, split, data_dir=self.config.data_dir,
        download=self.config.download,
        mock_num_examples=self.config.mock_num_examples if self.config.mock else None)
    if len(records) == 0:
      raise ValueError(f"Split {split!r} of TFDS dataset {self.config.tfds_name!r} is empty; "
                       "choose a split with records.")
    self._check_template_fields(records[0])
    return records

  def _check_template_fields(self, record: dict[str, Any]) -> None:
    try:
      self.config.prompt_template.format(**record)
    except (KeyError, IndexError) as error:
      raise ValueError(
          f"data.prompt_template={self.config.prompt_template!r} names {error}, which "
          f"{self.config.tfds_name!r} records lack; their fields are: "
          f"{', '.join(sorted(record))}.") from None
    if self.response_field not in record:
      raise ValueError(f"TFDS dataset {self.config.tfds_name!r} has no {self.response_field!r} "
                       f"feature; its fields are: {', '.join(sorted(record))}.")

  # Text of one record.

  def prompt_text(self, record: dict[str, Any]) -> str:
    """The prompt: `prompt_template` filled with the record's text fields."""
    return self.config.prompt_template.format(
        **{key: _text(value) for key, value in record.items()})

  def response_text(self, record: dict[str, Any]) -> str:
    """The reference response."""
    return _text(record[self.response_field])

  # Tokens.

  def _prompt_ids(self, text: str, where: str) -> list[int]:
    bos, eos = self._prompt_specials
    budget = self.max_prompt_len - len(bos) - len(eos)
    ids = self.tokenizer.encode(text)
    if len(ids) > budget:
      if self.truncation == "error":
        raise ValueError(
            f"The prompt of {where} has {len(ids) + len(bos) + len(eos)} tokens, more than "
            f"data.max_prompt_len={self.max_prompt_len}; raise it or set data.truncation to "
            "'left' or 'right'.")
      ids = ids[:budget] if self.truncation == "right" else ids[len(ids) - budget:]
    return bos + ids + eos

  def _response_ids(self, text: str) -> list[int]:
    return self.tokenizer.encode(text)[:self.max_response_len - 1] + [self.tokenizer.eos_id]

  def _example(self, record: dict[str, Any], where: str) -> tasks.Example:
    prompt_text, target_text = self.prompt_text(record), self.response_text(record)
    return tasks.Example(prompt_ids=self._prompt_ids(prompt_text, where),
                         prompt_text=prompt_text, target_text=target_text,
                         target_ids=self._response_ids(target_text))

  # The Task interface.

  def _permutation(self, epoch: int) -> np.ndarray:
    # A batch can straddle two epochs; keep the last two orders instead of recomputing them
    # (a WMT permutation holds 4.5M indices). The cache never changes what is returned.
    if epoch not in self._permutations:
      if len(self._permutations) >= 2:
        del self._permutations[min(self._permutations)]
      rng = np.random.default_rng([self.seed, epoch])
      self._permutations[epoch] = rng.permutation(self._num_train)
    return self._permutations[epoch]

  def train_record_index(self, global_row: int) -> int:
    """The train-split index of global example `global_row` (step * batch_size + row)."""
    epoch, position = divmod(global_row, self._num_train)
    return self._num_shots + int(self._permutation(epoch)[position])

  def train_batch(self, step: int, batch_size: int, *, process_index: int = 0,
                  process_count: int = 1) -> tasks.Batch:
    start, stop = tasks.check_host_slice(step, batch_size, process_index, process_count)
    first_row = int(step) * batch_size
    indices = [self.train_record_index(first_row + row) for row in range(start, stop)]
    examples = [self._example(record, f"train record {index} of {self.config.train_split!r}")
                for index, record in zip(indices, read_records(self._train, indices))]
    return self.pack(examples)

  def eval_examples(self, n: int | None = None) -> list[tasks.Example]:
    """The first `n` records of the eval split (all of it when it is shorter)."""
    n = self.eval_size if n is None else n
    if not isinstance(n, int) or n < 1:
      raise ValueError(f"eval_examples got n={n!r}; use a positive integer or None.")
    if self._eval is None:
      self._eval = self._load(self.config.eval_split)
    indices = range(min(n, len(self._eval)))
    return [self._example(record, f"eval record {index} of {self.config.eval_split!r}")
            for index, record in zip(indices, read_records(self._eval, indices))]


@tasks.register_task("xsum")
class XsumTask(TfdsTask):
  """XSum: one-sentence summaries of BBC articles; scored by ROUGE (headline ROUGE-2)."""

  response_field = "summary"
  headline_metric = "rouge2"

  def score(self, predictions: Sequence[str],
            examples: Sequence[tasks.Example]) -> dict[str, float]:
    """{"rouge1", "rouge2", "rougeL"}: F-measures x 100 (see `metrics.rouge`)."""
    tasks.check_predictions(predictions, examples)
    return metrics.rouge(predictions, [example.target_text for example in examples])


@tasks.register_task("wmt14_translate/de-en")
class Wmt14EnDeTask(TfdsTask):
  """WMT14 English -> German translation; scored by sacrebleu corpus BLEU."""

  response_field = "de"
  headline_metric = "bleu"

  def score(self, predictions: Sequence[str],
            examples: Sequence[tasks.Example]) -> dict[str, float]:
    """{"bleu"}: corpus BLEU, 0-100 (see `metrics.bleu`)."""
    tasks.check_predictions(predictions, examples)
    return metrics.bleu(predictions, [example.target_text for example in examples])


_CALCULATOR_ANNOTATION = re.compile(r"<<[^>]*>>")


@tasks.register_task("gsm8k")
class Gsm8kTask(TfdsTask):
  """GSM8K grade-school math: question -> worked solution ending in "#### answer".

  With `num_shots` = k, the first k train records, solved, precede every prompt (template +
  " " + solution, blank line between), and train batches draw from the other records.
  Scored by final-answer accuracy (see `metrics.gsm8k_answer`).
  """

  response_field = "answer"
  headline_metric = "accuracy"

  def __init__(self, data_config: ml_collections.ConfigDict):
    super().__init__(data_config)
    shots = read_records(self._train, range(self._num_shots))
    # The shots' own prompts are the bare template, without the prefix being built.
    self._shots_prefix = "".join(
        f"{TfdsTask.prompt_text(self, shot)} {self.response_text(shot)}\n\n" for shot in shots)

  def prompt_text(self, record: dict[str, Any]) -> str:
    return self._shots_prefix + super().prompt_text(record)

  def response_text(self, record: dict[str, Any]) -> str:
    text = super().response_text(record)
    if self.config.strip_calculator_annotations:
      text = _CALCULATOR_ANNOTATION.sub("", text)
    return text

  def score(self, predictions: Sequence[str],
            examples: Sequence[tasks.Example]) -> dict[str, float]:
    """{"accuracy"}: the share of predictions with the reference's final answer."""
    tasks.check_predictions(predictions, examples)
    return metrics.gsm8k_accuracy(predictions, [example.target_text for example in examples])
