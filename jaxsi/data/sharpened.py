"""The "sharpened" task: SFT on a best-of-N dataset made by `jaxsi.sharpen_data`.

SFT on this task is the amortization stage of SFT-Sharpening (spec/sharpening.md): the train
stream serves the stored (prompt, selected response) pairs; evaluation, scoring and the
tokenizer are the base task's (the task the prompts came from), so evals compare directly
with the base model's.

Train order: global row g = step · batch_size + r is dataset row perm_e[g mod M] of epoch
e = g // M (M rows; perm_e = a permutation seeded by (seed, e), or the identity when
`shuffle` is off): a pure function of the step, and every row appears once per epoch.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from jaxsi import sharpen_data
from jaxsi.data import tasks

NAME = "sharpened"


def default_data_config(name: str = NAME) -> ml_collections.ConfigDict:
  """The data config of the sharpened task, every key it reads with its default.

  Keys:
    name: "sharpened".
    path: the dataset directory (WORKDIR/sharpen_data of the generate stage).
    base: the data config of the task the prompts came from (its tokenizer, widths, eval
      examples and scoring are reused); replace it with that task's full config.
    shuffle: shuffle the rows within each epoch (else dataset order).
    seed: the shuffle seed.
    drop_truncated: leave out rows whose selected response has no EOS.
  """
  if name != NAME:
    raise ValueError(f"Unknown task {name!r} for jaxsi.data.sharpened; it defines {NAME!r}.")
  config = ml_collections.ConfigDict()
  config.name = NAME
  config.path = ""
  config.base = tasks.default_data_config("arithmetic")
  config.shuffle = True
  config.seed = 0
  config.drop_truncated = False
  return config


@tasks.register_task(NAME)
class SharpenedTask(tasks.Task):
  """Serves a sharpen dataset for training; the base task for everything else.

  The response width is the larger of the base task's and the dataset's `max_new_tokens`.
  The dataset's meta.json is read at construction (widths, provenance); its rows on the
  first `train_batch`.
  """

  def __init__(self, data_config: ml_collections.ConfigDict):
    self.name = NAME
    path = data_config.path
    if not isinstance(path, str) or not path:
      raise ValueError(f"data.path={path!r} is invalid; set it to the generate stage's "
                       "directory (WORKDIR/sharpen_data).")
    base_config = data_config.base
    if base_config.get("name") == NAME:
      raise ValueError("data.base.name='sharpened' is invalid; the base must be the task the "
                       "prompts came from (e.g. 'arithmetic' or 'gsm8k').")
    self.base = tasks.get_task(base_config)
    self.tokenizer = self.base.tokenizer
    self.headline_metric = self.base.headline_metric
    self.path = path
    self.meta = sharpen_data.read_meta(path)
    if self.meta["task"] != self.base.name:
      raise ValueError(f"The sharpen dataset in {path} was made from task "
                       f"{self.meta['task']!r} but data.base.name={self.base.name!r}; set "
                       "data.base to the task it was generated from.")
    if self.meta["prompt_width"] != self.base.max_prompt_len:
      raise ValueError(f"The sharpen dataset in {path} has prompts of width "
                       f"{self.meta['prompt_width']} but data.base.max_prompt_len="
                       f"{self.base.max_prompt_len}; use the base config it was generated with.")
    self.max_prompt_len = self.base.max_prompt_len
    self.max_response_len = max(self.base.max_response_len,
                                int(self.meta["settings"]["max_new_tokens"]))
    self.shuffle = bool(data_config.shuffle)
    self.seed = int(data_config.seed)
    self.drop_truncated = bool(data_config.drop_truncated)
    self._rows: dict[str, np.ndarray] | None = None
    self._permutations: dict[int, np.ndarray] = {}

  def rows(self) -> dict[str, np.ndarray]:
    """The dataset rows served for training (after `drop_truncated`), read once."""
    if self._rows is None:
      data = sharpen_data.read_dataset(self.path)
      if self.drop_truncated:
        data = {key: value[~data["truncated"]] for key, value in data.items()}
      if not len(data["index"]):
        raise ValueError(f"The sharpen dataset in {self.path} has no row left to train on "
                         f"(drop_truncated={self.drop_truncated}); generate more prompts or "
                         "set data.drop_truncated=False.")
      pad = self.max_response_len - data["response"].shape[1]
      data["response"] = np.pad(data["response"], ((0, 0), (0, pad)),
                                constant_values=self.tokenizer.pad_id)
      data["response_mask"] = np.pad(data["response_mask"], ((0, 0), (0, pad)))
      self._rows = data
    return self._rows

  def _permutation(self, epoch: int, size: int) -> np.ndarray:
    if not self.shuffle:
      return np.arange(size)
    if epoch not in self._permutations:
      if len(self._permutations) >= 2:  # a batch spans at most two epochs in a row
        del self._permutations[min(self._permutations)]
      self._permutations[epoch] = np.random.default_rng([self.seed, epoch]).permutation(size)
    return self._permutations[epoch]

  def train_batch(self, step: int, batch_size: int, *, process_index: int = 0,
                  process_count: int = 1) -> tasks.Batch:
    start, stop = tasks.check_host_slice(step, batch_size, process_index, process_count)
    data = self.rows()
    size = len(data["index"])
    global_rows = int(step) * batch_size + np.arange(start, stop)
    picked = np.asarray([self._permutation(int(g // size), size)[g % size] for g in global_rows])
    return {key: data[key][picked].astype(np.int32)
            for key in ("prompt", "prompt_mask", "response", "response_mask")}

  def eval_examples(self, n: int | None = None) -> list[tasks.Example]:
    return self.base.eval_examples(n)

  def score(self, predictions, examples) -> dict[str, float]:
    return self.base.score(predictions, examples)
