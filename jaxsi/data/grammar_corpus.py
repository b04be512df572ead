"""A small English-like corpus from a fixed probabilistic grammar: offline text with structure.

The text continuation task (`jaxsi.data.text_files`, `data.source = "grammar"`) reads it when no
real corpus is at hand (CPU reproductions, tests): unlike the i.i.d. words of the "generated"
source, its sentences have a grammar a small model can learn within minutes, and its words
follow a Zipf-like law, as real text does, so a model that under-fits falls into the repetition
loops the diversity metrics measure.

A document is 2 to 4 sentences on one line; a sentence is

  S  -> NP VP "."  |  NP VP "and then" VP "."
  NP -> DET [ADJ] NOUN [PREP DET NOUN]
  VP -> VERB_T NP  |  VERB_I [ADV]

with each word drawn from its class with probability ∝ 1 / rank. Everything is a pure function
of (number of documents, seed).
"""

from __future__ import annotations

import numpy as np

_CLASSES = {
    "DET": ("the", "a", "every", "one", "that"),
    "ADJ": ("old", "small", "green", "bright", "quiet", "tall", "cold", "red"),
    "NOUN": ("river", "city", "tower", "fox", "child", "market", "stone", "bird", "garden",
             "boat", "lamp", "road"),
    "PREP": ("near", "under", "behind", "over", "beside"),
    "VERB_T": ("sees", "carries", "finds", "follows", "watches", "builds", "hides"),
    "VERB_I": ("sleeps", "waits", "sings", "falls", "turns", "rests"),
    "ADV": ("slowly", "again", "quietly", "today", "alone"),
}


def _draw(rng: np.random.Generator, word_class: str) -> str:
  words = _CLASSES[word_class]
  weights = 1.0 / np.arange(1, len(words) + 1)
  return str(words[rng.choice(len(words), p=weights / weights.sum())])


def _noun_phrase(rng: np.random.Generator) -> list[str]:
  words = [_draw(rng, "DET")]
  if rng.random() < 0.5:
    words.append(_draw(rng, "ADJ"))
  words.append(_draw(rng, "NOUN"))
  if rng.random() < 0.25:
    words += [_draw(rng, "PREP"), _draw(rng, "DET"), _draw(rng, "NOUN")]
  return words


def _verb_phrase(rng: np.random.Generator) -> list[str]:
  if rng.random() < 0.6:
    return [_draw(rng, "VERB_T")] + _noun_phrase(rng)
  return [_draw(rng, "VERB_I")] + ([_draw(rng, "ADV")] if rng.random() < 0.5 else [])


def _sentence(rng: np.random.Generator) -> str:
  words = _noun_phrase(rng) + _verb_phrase(rng)
  if rng.random() < 0.3:
    words += ["and", "then"] + _verb_phrase(rng)
  text = " ".join(words) + "."
  return text[0].upper() + text[1:]


def documents(n: int, seed: int) -> list[str]:
  """n documents of 2 to 4 sentences each (one line, no newline), a pure function of (n, seed)."""
  if isinstance(n, bool) or not isinstance(n, int) or n < 0:
    raise ValueError(f"grammar_corpus.documents n={n!r} must be an integer >= 0.")
  rng = np.random.default_rng([seed, 11])
  return [" ".join(_sentence(rng) for _ in range(int(rng.integers(2, 5)))) for _ in range(n)]
