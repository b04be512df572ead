"""Text continuation: continue a document's opening (OpenWebText-style open-ended generation).

Task `data.name = "text_continuation"`. Each document is tokenized; the prompt is its first
tokens (BOS first when the tokenizer has one; at most `max_prompt_len`, and at least one token
is left for the response), the response the tokens that follow, at most `max_response_len`. A
document that ends inside the window gets EOS after its last token; one that goes on does not,
so its response is a cut, not an ending (the SequenceMatch loss treats a row without EOS as
truncated and bootstraps its last value).

Documents come from (`data.source`):
  "files":     local text files (`data.files`, glob patterns), one document per non-empty line
               or per file (`data.document_per`). The last `eval_size` documents are held out
               for eval. OpenWebText is not in the TFDS catalogue: export it to text files.
  "tfds":      a TFDS dataset with a text feature (`tfds_name`, `text_field`; e.g. "c4/en"),
               train and eval splits as in `jaxsi.data.tfds_tasks`.
  "generated": `num_generated` short synthetic sentences from a seed (tests, smoke runs).
  "grammar":   `num_generated` documents of a small probabilistic English-like grammar
               (`jaxsi.data.grammar_corpus`): offline text with structure, for CPU
               reproductions of the diversity metrics.

Reading order: row r of the global batch of step s is train document
`permutation(seed, epoch)[g % N]` with g = s * batch_size + r, epoch = g // N, so batches are
a pure function of (config, step).

Score (no reference text is needed): "diversity" (the headline), the product over n = 2, 3, 4 of
distinct/total word n-grams per prediction, averaged over predictions (1 = no repetition);
"entropy4", the entropy in nats of the 4-gram distribution pooled over all predictions;
"mean_words"; and distinct-n and the repetition rate rep-n for n = 1..4
(`jaxsi.evals.metrics.distinct_n`, `repetition`).
"""

from __future__ import annotations

import collections
import glob
import math
import os
from typing import Any, Sequence

import ml_collections
import numpy as np

from jaxsi.data import grammar_corpus
from jaxsi.data import tasks
from jaxsi.data import tokenizers
from jaxsi.evals import metrics

NAME = "text_continuation"
SOURCES = ("files", "tfds", "generated", "grammar")
DOCUMENT_PER = ("line", "file")

_WORDS = ("the", "a", "river", "city", "light", "old", "new", "quietly", "runs", "sees",
          "under", "over", "bright", "stone", "wind", "carries", "north", "south", "song",
          "small", "green", "tower", "slowly", "and", "then", "again", "market", "of")


def default_data_config(name: str = NAME) -> ml_collections.ConfigDict:
  """The data config of the text continuation task, every key with its default.

  Keys:
    name: "text_continuation".
    source: "files", "tfds" or "generated" (see the module docstring).
    files: glob patterns of local text files (source="files").
    document_per: "line" or "file" (source="files").
    tfds_name, text_field, train_split, eval_split, data_dir, download: source="tfds".
    num_generated: number of synthetic documents (source="generated" or "grammar").
    tokenizer: "char" or a Hugging Face tokenizer ("gpt2", a Llama tokenizer, a path).
    max_prompt_len, max_response_len: the batch widths S and T (paper: 256 and 256).
    seed: the train order's seed (and the generated documents').
    eval_size: how many held-out documents `eval_examples()` returns by default.
  """
  if name != NAME:
    raise ValueError(f"Unknown task {name!r} for text_files.default_data_config; expected "
                     f"{NAME!r}.")
  config = ml_collections.ConfigDict()
  config.name = NAME
  config.source = "files"
  config.files = ()
  config.document_per = "line"
  config.tfds_name = "c4/en"
  config.text_field = "text"
  config.train_split = "train"
  config.eval_split = "validation"
  config.data_dir = ml_collections.config_dict.placeholder(str)
  config.download = False
  config.num_generated = 256
  config.tokenizer = "gpt2"
  config.max_prompt_len = 256
  config.max_response_len = 256
  config.seed = 0
  config.eval_size = 500
  return config


def generated_documents(n: int, seed: int) -> list[str]:
  """n synthetic sentences of 6 to 14 words, a pure function of (n, seed)."""
  rng = np.random.default_rng([seed, 7])
  return [" ".join(rng.choice(_WORDS, size=int(rng.integers(6, 15)))) + "."
          for _ in range(n)]


def _read_files(patterns: Sequence[str], document_per: str) -> list[str]:
  paths = sorted({path for pattern in patterns for path in glob.glob(os.path.expanduser(pattern))})
  if not paths:
    raise ValueError(f"data.files={tuple(patterns)!r} matches no file; give glob patterns of "
                     "local text files.")
  documents = []
  for path in paths:
    with open(path, encoding="utf-8") as f:
      text = f.read()
    parts = text.splitlines() if document_per == "line" else [text]
    documents.extend(part.strip() for part in parts if part.strip())
  return documents


def diversity(predictions: Sequence[str]) -> dict[str, float]:
  """Repetition statistics of generated text (see the module docstring)."""
  per_text, pooled4 = [], collections.Counter()
  for text in predictions:
    words = text.split()
    product = 1.0
    for n in (2, 3, 4):
      grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
      if grams:
        product *= len(set(grams)) / len(grams)
      if n == 4:
        pooled4.update(grams)
    per_text.append(product)
  total = sum(pooled4.values())
  entropy = -sum(c / total * math.log(c / total) for c in pooled4.values()) if total else 0.0
  return {"diversity": float(np.mean(per_text)), "entropy4": float(entropy),
          "mean_words": float(np.mean([len(text.split()) for text in predictions]))}


@tasks.register_task(NAME)
class TextContinuationTask(tasks.Task):
  """Continue the opening of a document (see the module docstring)."""

  headline_metric = "diversity"

  def __init__(self, data_config: ml_collections.ConfigDict):
    self.name = NAME
    self.config = data_config
    for key in ("max_prompt_len", "max_response_len", "eval_size", "num_generated"):
      value = data_config[key]
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"data.{key}={value!r} is invalid; use a positive integer.")
    if data_config.source not in SOURCES:
      raise ValueError(f"data.source={data_config.source!r} is invalid; use one of {SOURCES}.")
    if data_config.document_per not in DOCUMENT_PER:
      raise ValueError(f"data.document_per={data_config.document_per!r} is invalid; use one "
                       f"of {DOCUMENT_PER}.")
    self.tokenizer = tokenizers.get_tokenizer(data_config.tokenizer)
    self.max_prompt_len = data_config.max_prompt_len
    self.max_response_len = data_config.max_response_len
    self.eval_size = data_config.eval_size
    self.seed = data_config.seed
    self._bos = [self.tokenizer.bos_id] if self.tokenizer.bos_id is not None else []
    if self.max_prompt_len <= len(self._bos):
      raise ValueError(f"data.max_prompt_len={self.max_prompt_len} leaves no room for text "
                       "after BOS; raise it.")
    self._train, self._eval = self._load(data_config)
    if len(self._train) == 0:
      raise ValueError(f"The text continuation task has no train documents (source="
                       f"{data_config.source!r}); give more text or a smaller data.eval_size.")
    self._permutations: dict[int, np.ndarray] = {}

  def _load(self, config) -> tuple[Sequence[Any], Sequence[Any]]:
    """(train documents, eval documents): strings, or TFDS records."""
    if config.source == "tfds":
      from jaxsi.data import tfds_tasks  # pylint: disable=g-import-not-at-top (heavy import)
      load = lambda split: tfds_tasks.load_split(config.tfds_name, split,
                                                 data_dir=config.data_dir,
                                                 download=config.download)
      return load(config.train_split), load(config.eval_split)
    if config.source == "files":
      documents = _read_files(config.files, config.document_per)
    elif config.source == "grammar":
      documents = grammar_corpus.documents(config.num_generated, config.seed)
    else:
      documents = generated_documents(config.num_generated, config.seed)
    held_out = min(self.eval_size, len(documents) // 2)
    return documents[:len(documents) - held_out], documents[len(documents) - held_out:]

  def _text(self, document: Any) -> str:
    if isinstance(document, str):
      return document
    if self.config.text_field not in document:
      raise ValueError(f"TFDS dataset {self.config.tfds_name!r} has no "
                       f"{self.config.text_field!r} feature; its fields are: "
                       f"{', '.join(sorted(document))}.")
    value = document[self.config.text_field]
    return bytes(value).decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)

  def _example(self, document: Any, where: str) -> tasks.Example:
    ids = self.tokenizer.encode(self._text(document))
    if len(ids) < 2:
      raise ValueError(f"{where} has {len(ids)} token(s); a continuation needs at least 2 (one "
                       "to condition on, one to continue with); drop such documents.")
    split = min(self.max_prompt_len - len(self._bos), len(ids) - 1)
    rest = ids[split:]
    ends = len(rest) < self.max_response_len
    response = rest + [self.tokenizer.eos_id] if ends else rest[:self.max_response_len]
    decode = lambda x: self.tokenizer.decode(x, stop_at_eos=False)
    return tasks.Example(prompt_ids=self._bos + ids[:split], prompt_text=decode(ids[:split]),
                         target_text=decode(rest[:self.max_response_len]),
                         target_ids=response)

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch not in self._permutations:
      if len(self._permutations) >= 2:  # a batch straddles at most two epochs
        del self._permutations[min(self._permutations)]
      self._permutations[epoch] = np.random.default_rng([self.seed, epoch]).permutation(
          len(self._train))
    return self._permutations[epoch]

  def train_batch(self, step: int, batch_size: int, *, process_index: int = 0,
                  process_count: int = 1) -> tasks.Batch:
    start, stop = tasks.check_host_slice(step, batch_size, process_index, process_count)
    examples = []
    for row in range(start, stop):
      epoch, position = divmod(int(step) * batch_size + row, len(self._train))
      index = int(self._permutation(epoch)[position])
      examples.append(self._example(self._train[index], f"Train document {index}"))
    return self.pack(examples)

  def eval_examples(self, n: int | None = None) -> list[tasks.Example]:
    n = self.eval_size if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
      raise ValueError(f"eval_examples got n={n!r}; use a positive integer or None.")
    return [self._example(self._eval[i], f"Eval document {i}")
            for i in range(min(n, len(self._eval)))]

  def score(self, predictions: Sequence[str],
            examples: Sequence[tasks.Example]) -> dict[str, float]:
    """{"diversity", "entropy4", "mean_words", "distinct_{n}", "rep_{n}"} of the predictions.

    See `diversity` and `jaxsi.evals.metrics.distinct_n` / `repetition` (n = 1..4).
    """
    tasks.check_predictions(predictions, examples)
    return {**diversity(predictions), **metrics.distinct_n(predictions),
            **metrics.repetition(predictions)}
