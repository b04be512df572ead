"""Tests for the character tokenizer and the Hugging Face tokenizer wrapper."""

import re
import string

import numpy as np
import pytest

from jaxsi.data import tokenizers


def test_char_tokenizer_ids_and_vocab():
  tokenizer = tokenizers.CharTokenizer()
  assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
  assert tokenizer.vocab_size == 3 + 95
  assert tokenizer.encode(" ") == [3]
  assert tokenizer.encode("~") == [97]
  assert tokenizer.encode("A1") == [3 + ord("A") - 32, 3 + ord("1") - 32]


def test_char_tokenizer_round_trip_with_specials():
  tokenizer = tokenizers.CharTokenizer()
  text = "In base 7, what is -13 + 22?"
  ids = tokenizer.encode(text, add_bos=True, add_eos=True)
  assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
  assert len(ids) == len(text) + 2
  assert tokenizer.decode(ids) == text
  every_printable = "".join(chr(code) for code in range(32, 127))
  assert tokenizer.decode(tokenizer.encode(every_printable)) == every_printable
  assert set(string.printable) - set(every_printable) == set("\t\n\r\x0b\x0c")


def test_char_tokenizer_decode_skips_padding_and_stops_at_eos():
  tokenizer = tokenizers.CharTokenizer()
  ids = [0, 0, 1] + tokenizer.encode("12") + [2] + tokenizer.encode("junk") + [0]
  assert tokenizer.decode(ids) == "12"
  assert tokenizer.decode(ids, stop_at_eos=False) == "12junk"
  assert tokenizer.decode(np.asarray(ids, dtype=np.int32)) == "12"
  assert tokenizer.decode([]) == ""


def test_char_tokenizer_marks_ids_outside_its_vocabulary():
  tokenizer = tokenizers.CharTokenizer()
  ids = tokenizer.encode("a") + [tokenizer.vocab_size, 127] + tokenizer.encode("b")
  assert tokenizer.decode(ids) == "a" + tokenizers.UNKNOWN_ID_TEXT * 2 + "b"


@pytest.mark.parametrize("text,char,position", [("abc\u00e9", "\u00e9", 3),
                                                 ("line\nbreak", "\n", 4)])
def test_char_tokenizer_names_the_unsupported_character(text, char, position):
  expected = re.escape(f"Character {char!r} (U+{ord(char):04X}) at position {position} is "
                       "not supported")
  with pytest.raises(ValueError, match=expected):
    tokenizers.CharTokenizer().encode(text)


def test_decode_rejects_a_batch():
  with pytest.raises(ValueError, match=r"shape \(2, 2\)"):
    tokenizers.CharTokenizer().decode(np.zeros((2, 2), np.int32))


def _save_word_level_tokenizer(directory, *, with_bos, with_pad):
  """Builds a tiny word-level tokenizer offline and saves it like a Hub checkpoint."""
  import tokenizers as hf_tokenizers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, "<unk>": 3, "what": 4, "is": 5, "12": 6, "?": 7}
  model = hf_tokenizers.Tokenizer(hf_tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  model.pre_tokenizer = hf_tokenizers.pre_tokenizers.WhitespaceSplit()
  model.decoder = hf_tokenizers.decoders.WordPiece(prefix="##")
  specials = dict(eos_token="</s>", unk_token="<unk>")
  if with_bos:
    specials["bos_token"] = "<s>"
  if with_pad:
    specials["pad_token"] = "<pad>"
  transformers.PreTrainedTokenizerFast(tokenizer_object=model, **specials).save_pretrained(
      directory)
  return str(directory)


def test_hf_tokenizer_wraps_a_saved_tokenizer(tmp_path):
  path = _save_word_level_tokenizer(tmp_path / "tok", with_bos=True, with_pad=True)
  tokenizer = tokenizers.get_tokenizer(path)
  assert isinstance(tokenizer, tokenizers.HFTokenizer)
  assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 2, 1)
  assert tokenizer.vocab_size == 8
  assert tokenizer.encode("what is 12 ?") == [4, 5, 6, 7]
  assert tokenizer.encode("what is", add_bos=True, add_eos=True) == [2, 4, 5, 1]
  assert tokenizer.encode("nope") == [3]
  assert tokenizer.decode([0, 2, 4, 5, 1, 6]) == "what is"
  assert tokenizer.decode(np.array([4, 5, 1, 6]), stop_at_eos=False) == "what is 12"


def test_hf_tokenizer_without_bos_or_pad(tmp_path):
  path = _save_word_level_tokenizer(tmp_path / "tok", with_bos=False, with_pad=False)
  tokenizer = tokenizers.HFTokenizer(path)
  assert tokenizer.bos_id is None  # like T5
  assert tokenizer.pad_id == tokenizer.eos_id == 1  # like GPT-2
  assert tokenizer.encode("12", add_bos=True, add_eos=True) == [6, 1]


def test_get_tokenizer_char_and_errors(tmp_path):
  assert isinstance(tokenizers.get_tokenizer("char"), tokenizers.CharTokenizer)
  with pytest.raises(ValueError, match="Tokenizer '' is invalid"):
    tokenizers.get_tokenizer("")
  with pytest.raises(ValueError, match="could not be loaded"):
    tokenizers.get_tokenizer(str(tmp_path / "missing"))
