"""Text metrics for eval: ROUGE, BLEU, exact match, GSM8K accuracy, n-gram diversity.

Every reference-based metric takes parallel lists of predictions and references (one
reference per prediction) and returns a dict of floats, so a task's `score` can merge several.
ROUGE and BLEU come from rouge-score and sacrebleu and are on their usual 0-100 scale; exact
match and GSM8K accuracy are shares in [0, 1], like the arithmetic task's accuracy.

The diversity metrics of free generations need no reference; they count whitespace-separated
word n-grams (1-4) and are shares in [0, 1]:
  distinct-n (Li et al., 2016): distinct n-grams / all n-grams, pooled over the generations
    (1 = no n-gram occurs twice anywhere);
  repetition rate rep-n (seq-rep-n of Welleck et al., 2020): per generation, the share of its
    n-grams that repeat an earlier one, 1 − distinct / all, averaged over the generations that
    have at least one n-gram (0 = no generation repeats itself).
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import sacrebleu
from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")

# A number as GSM8K writes it: optional sign, digits with optional thousands commas, optional
# decimals. A trailing "." (end of sentence) is not part of the number.
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_ANSWER_MARKER = "####"
DIVERSITY_NS = (1, 2, 3, 4)


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
  """Raises a ValueError unless the two are equally long, non-empty lists of strings."""
  if len(predictions) != len(references):
    raise ValueError(f"Got {len(predictions)} predictions for {len(references)} references; "
                     "pass one prediction per reference.")
  if not references:
    raise ValueError("Got no references; pass at least one prediction-reference pair.")
  for what, texts in (("prediction", predictions), ("reference", references)):
    for index, text in enumerate(texts):
      if not isinstance(text, str):
        raise ValueError(f"The {what} at index {index} is a {type(text).__name__}, not a str; "
                         "decode token ids to text before scoring.")


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
  """ROUGE-1, ROUGE-2 and ROUGE-L F-measures (rouge-score, Porter stemming), mean x 100.

  Args:
    predictions: N generated texts.
    references: N reference texts.

  Returns:
    {"rouge1", "rouge2", "rougeL"}: the mean over the N pairs of each F-measure, times 100.
    The plain mean (not rouge-score's bootstrap aggregate, which resamples) keeps the value
    deterministic.
  """
  _check_pairs(predictions, references)
  scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
  # rouge-score's argument order is (target, prediction).
  scores = [scorer.score(reference, prediction)
            for prediction, reference in zip(predictions, references)]
  return {rouge_type: 100.0 * float(np.mean([score[rouge_type].fmeasure for score in scores]))
          for rouge_type in ROUGE_TYPES}


def bleu(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
  """Corpus BLEU from sacrebleu with its defaults (13a tokenization, 0-100).

  Args:
    predictions: N detokenized translations.
    references: N detokenized reference translations.

  Returns:
    {"bleu"}: `sacrebleu.corpus_bleu(predictions, [references]).score`.
  """
  _check_pairs(predictions, references)
  return {"bleu": float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)}


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
  """{"exact_match"}: the share of predictions equal to their reference after stripping."""
  _check_pairs(predictions, references)
  matches = [prediction.strip() == reference.strip()
             for prediction, reference in zip(predictions, references)]
  return {"exact_match": float(np.mean(matches))}


def _canonical_number(text: str) -> str:
  """"1,234.50" -> "1234.5", "72.0" -> "72", "-3" -> "-3": equal values, equal strings."""
  number = text.replace(",", "")
  if "." in number:
    number = number.rstrip("0").rstrip(".")
  return "0" if number in ("-0", "") else number


def gsm8k_answer(text: str) -> str | None:
  """The final numeric answer of a GSM8K solution, or None when the text holds no number.

  The number right after the last "####" (GSM8K's answer marker) when one follows it, else
  the last number anywhere in the text (a model that skipped the marker). Thousands commas
  are dropped and trailing decimal zeros removed, so "1,000.00" and "1000" agree.
  """
  if not isinstance(text, str):
    raise ValueError(f"gsm8k_answer got a {type(text).__name__}, not a str; pass the decoded "
                     "text.")
  marker_at = text.rfind(_ANSWER_MARKER)
  if marker_at >= 0:
    after_marker = _NUMBER.search(text, marker_at + len(_ANSWER_MARKER))
    if after_marker:
      return _canonical_number(after_marker.group())
  numbers = _NUMBER.findall(text)
  return _canonical_number(numbers[-1]) if numbers else None


def gsm8k_accuracy(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
  """{"accuracy"}: the share of predictions whose final answer equals the reference's.

  Both sides go through `gsm8k_answer`; a prediction without a number is wrong, and so is
  every prediction for a reference without one.
  """
  _check_pairs(predictions, references)
  correct = []
  for prediction, reference in zip(predictions, references):
    expected = gsm8k_answer(reference)
    correct.append(expected is not None and gsm8k_answer(prediction) == expected)
  return {"accuracy": float(np.mean(correct))}


def _ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
  return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def _check_texts(predictions: Sequence[str]) -> list[list[str]]:
  """The predictions split into words; a ValueError unless a non-empty list of strings."""
  if not predictions:
    raise ValueError("Got no generations; pass at least one text.")
  for index, text in enumerate(predictions):
    if not isinstance(text, str):
      raise ValueError(f"The generation at index {index} is a {type(text).__name__}, not a "
                       "str; decode token ids to text before scoring.")
  return [text.split() for text in predictions]


def distinct_n(predictions: Sequence[str], ns: Sequence[int] = DIVERSITY_NS
               ) -> dict[str, float]:
  """Distinct-n of N generations: distinct word n-grams / all word n-grams, pooled.

  Args:
    predictions: N generated texts (words are whitespace-separated).
    ns: the n-gram orders.

  Returns:
    {"distinct_{n}"} for each n: |set of n-grams of all N texts| / (number of n-grams of all
    N texts), in [0, 1]; 0 when no text has n words.
  """
  texts = _check_texts(predictions)
  out = {}
  for n in ns:
    grams = [gram for words in texts for gram in _ngrams(words, n)]
    out[f"distinct_{n}"] = len(set(grams)) / len(grams) if grams else 0.0
  return out


def repetition(predictions: Sequence[str], ns: Sequence[int] = DIVERSITY_NS
               ) -> dict[str, float]:
  """Repetition rate rep-n of N generations: the share of each text's n-grams seen before in it.

  Args:
    predictions: N generated texts (words are whitespace-separated).
    ns: the n-gram orders.

  Returns:
    {"rep_{n}"} for each n: the mean over the texts with at least n words of
    1 − |set of the text's n-grams| / (number of its n-grams), in [0, 1); 0 when no text has
    n words.
  """
  texts = _check_texts(predictions)
  out = {}
  for n in ns:
    rates = [1.0 - len(set(grams)) / len(grams)
             for grams in (_ngrams(words, n) for words in texts) if grams]
    out[f"rep_{n}"] = float(np.mean(rates)) if rates else 0.0
  return out
