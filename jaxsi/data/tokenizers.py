"""Tokenizers behind one small interface: a character tokenizer and Hugging Face tokenizers.

Every tokenizer exposes `encode`, `decode`, `vocab_size`, `pad_id`, `bos_id` and `eos_id`, so
tasks and the trainer never know which kind they hold.
"""

from __future__ import annotations

from typing import Iterable, Protocol

import numpy as np

# Decoding an id the tokenizer does not know (a model whose vocabulary is padded past the
# tokenizer's can sample one) yields this visible character instead of crashing an eval.
UNKNOWN_ID_TEXT = "\N{REPLACEMENT CHARACTER}"


class Tokenizer(Protocol):
  """The interface tasks and the trainer rely on."""

  vocab_size: int
  pad_id: int
  bos_id: int | None
  eos_id: int

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    ...

  def decode(self, ids: Iterable[int], *, stop_at_eos: bool = True) -> str:
    ...


def _as_id_list(ids: Iterable[int]) -> list[int]:
  """Accepts a list, a tuple or a 1-D NumPy/JAX array of ids."""
  ids_array = np.asarray(ids)
  if ids_array.ndim != 1:
    raise ValueError(f"decode takes one sequence of ids, got an array of shape "
                     f"{ids_array.shape}; decode each row separately.")
  return [int(token_id) for token_id in ids_array.tolist()]


class CharTokenizer:
  """One token per printable ASCII character, after three special tokens.

  Ids: 0 = PAD, 1 = BOS, 2 = EOS, then characters 32 (space) to 126 ("~") as ids 3 to 97.
  """

  pad_id = 0
  bos_id = 1
  eos_id = 2
  _FIRST_CHAR_CODE = 32
  _LAST_CHAR_CODE = 126
  _NUM_SPECIALS = 3
  vocab_size = _NUM_SPECIALS + _LAST_CHAR_CODE - _FIRST_CHAR_CODE + 1

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Maps `text` to ids, optionally framed by BOS and EOS.

    Raises:
      ValueError: naming the first character outside printable ASCII.
    """
    ids = []
    for position, char in enumerate(text):
      code = ord(char)
      if not self._FIRST_CHAR_CODE <= code <= self._LAST_CHAR_CODE:
        raise ValueError(
            f"Character {char!r} (U+{code:04X}) at position {position} is not supported by "
            "CharTokenizer; it accepts printable ASCII only (codes 32 to 126).")
      ids.append(code - self._FIRST_CHAR_CODE + self._NUM_SPECIALS)
    return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

  def decode(self, ids: Iterable[int], *, stop_at_eos: bool = True) -> str:
    """Maps ids back to text, skipping PAD, BOS and EOS.

    Args:
      ids: one sequence of ids (list or 1-D array).
      stop_at_eos: drop everything from the first EOS on (what a sampler emits after EOS
        is padding or noise).
    """
    chars = []
    for token_id in _as_id_list(ids):
      if token_id == self.eos_id and stop_at_eos:
        break
      if token_id in (self.pad_id, self.bos_id, self.eos_id):
        continue
      if self._NUM_SPECIALS <= token_id < self.vocab_size:
        chars.append(chr(token_id - self._NUM_SPECIALS + self._FIRST_CHAR_CODE))
      else:
        chars.append(UNKNOWN_ID_TEXT)
    return "".join(chars)


class HFTokenizer:
  """A Hugging Face tokenizer (`AutoTokenizer.from_pretrained`) behind the same interface.

  `pad_id` falls back to `eos_id` for tokenizers without a padding token (GPT-2): padding is
  never read because the batch masks mark real tokens. `bos_id` is None for tokenizers
  without one (T5), and then `add_bos` adds nothing. `vocab_size` counts the tokenizer's
  tokens; a model's embedding table may be larger.
  """

  def __init__(self, name_or_path: str):
    # Imported here: transformers takes seconds to import and the char tokenizer never needs it.
    import transformers  # pylint: disable=g-import-not-at-top

    try:
      self._tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
      raise ValueError(
          f"Tokenizer {name_or_path!r} could not be loaded ({error}); use 'char', a local "
          "directory saved with save_pretrained, or a Hugging Face Hub name.") from error
    self.name_or_path = name_or_path
    self.eos_id = self._tokenizer.eos_token_id
    if self.eos_id is None:
      raise ValueError(f"Tokenizer {name_or_path!r} has no EOS token; jaxsi needs one to end "
                       "responses, so use a tokenizer that defines eos_token.")
    self.bos_id = self._tokenizer.bos_token_id
    pad_id = self._tokenizer.pad_token_id
    self.pad_id = self.eos_id if pad_id is None else pad_id
    self.vocab_size = len(self._tokenizer)

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Maps `text` to ids without the tokenizer's own specials, then adds the asked ones."""
    ids = self._tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = [self.bos_id] if add_bos and self.bos_id is not None else []
    return bos + list(ids) + [self.eos_id] * add_eos

  def decode(self, ids: Iterable[int], *, stop_at_eos: bool = True) -> str:
    """Maps ids back to text, skipping special tokens.

    Args:
      ids: one sequence of ids (list or 1-D array).
      stop_at_eos: drop everything from the first EOS on.
    """
    id_list = _as_id_list(ids)
    if stop_at_eos and self.eos_id in id_list:
      id_list = id_list[:id_list.index(self.eos_id)]
    return self._tokenizer.decode(id_list, skip_special_tokens=True)


def get_tokenizer(name_or_path: str) -> CharTokenizer | HFTokenizer:
  """Builds a tokenizer: "char" for `CharTokenizer`, else a Hugging Face name or local path."""
  if not isinstance(name_or_path, str) or not name_or_path:
    raise ValueError(f"Tokenizer {name_or_path!r} is invalid; use 'char' or a Hugging Face "
                     "tokenizer name or path.")
  if name_or_path == "char":
    return CharTokenizer()
  return HFTokenizer(name_or_path)
