"""Tests for jaxsi.evals.metrics: wrappers against the libraries, GSM8K answer extraction."""

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from jaxsi.evals import metrics

PREDICTIONS = ["the cat sat on the mat today",
               "a quick brown fox jumped over lazy dogs",
               "stocks rallied as markets opened higher"]
REFERENCES = ["a cat was sitting on the mat",
              "the quick brown fox jumps over the lazy dog",
              "shares fell sharply when markets opened"]


def test_rouge_is_the_mean_rouge_score_f_measure_times_100():
  scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
  expected = {key: 100 * np.mean([scorer.score(ref, pred)[key].fmeasure
                                  for pred, ref in zip(PREDICTIONS, REFERENCES)])
              for key in ("rouge1", "rouge2", "rougeL")}
  result = metrics.rouge(PREDICTIONS, REFERENCES)
  assert result.keys() == expected.keys()
  for key, value in expected.items():
    assert result[key] == pytest.approx(value, abs=1e-9)
  assert 0 < result["rouge2"] < result["rouge1"] < 100


def test_rouge_hand_checked_values_and_stemming():
  # Identical text scores 100; "jumps" and "jumped" share the stem "jump".
  assert metrics.rouge(["the fox jumps"], ["the fox jumped"]) == pytest.approx(
      {"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0})
  # Two of four unigrams shared, one of three bigrams: F = 1/2 and 1/3.
  result = metrics.rouge(["alpha beta gamma delta"], ["alpha beta epsilon zeta"])
  assert result["rouge1"] == pytest.approx(50.0)
  assert result["rouge2"] == pytest.approx(100 / 3)
  assert result["rougeL"] == pytest.approx(50.0)


def test_bleu_is_sacrebleu_corpus_bleu():
  expected = sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score
  assert metrics.bleu(PREDICTIONS, REFERENCES) == {"bleu": pytest.approx(expected)}
  assert 0 < expected < 100
  assert metrics.bleu(REFERENCES, REFERENCES)["bleu"] == pytest.approx(100.0)
  # Corpus BLEU is not the mean of sentence BLEUs: the n-gram counts are pooled.
  sentence_mean = np.mean([sacrebleu.sentence_bleu(p, [r]).score
                           for p, r in zip(PREDICTIONS, REFERENCES)])
  assert metrics.bleu(PREDICTIONS, REFERENCES)["bleu"] != pytest.approx(sentence_mean)


def test_exact_match_strips_whitespace_only():
  result = metrics.exact_match([" 42 ", "Paris", "paris"], ["42", "Paris", "Paris"])
  assert result == {"exact_match": pytest.approx(2 / 3)}


@pytest.mark.parametrize("text, answer", [
    ("She has 3 + 4 = 7 apples.\n#### 7", "7"),
    ("Total: 1,234 dollars\n#### 1,234", "1234"),
    ("#### -15", "-15"),
    ("It costs $2.50 each, so 4 cost 10.00 dollars.", "10"),   # last number, zeros dropped
    ("First 12, then 30 more: the answer is 42.", "42"),          # sentence-final period
    ("#### 18 because 3 * 6 = 18, not 20", "18"),                # marker wins over last number
    ("The answer is 5 ####", "5"),                               # nothing after the marker
    ("0.5 of 40 is 20.0", "20"),
    ("no digits here", None),
    ("", None),
])
def test_gsm8k_answer_extraction(text, answer):
  assert metrics.gsm8k_answer(text) == answer


def test_gsm8k_accuracy_compares_final_answers():
  references = ["Natalia sold 48/2 = 24 clips in May.\n48+24 = 72\n#### 72",
                "Weng earns 12/60 = 0.2 per minute.\n#### 10",
                "He pays 1,000 in total.\n#### 1,000"]
  predictions = ["48 + 24 = 72 clips. #### 72",   # right
                 "She earns 0.2 * 50 = 11",       # wrong: 11, not 10
                 "So he pays 1000.00"]            # right: the same number written differently
  assert metrics.gsm8k_accuracy(predictions, references) == {"accuracy": pytest.approx(2 / 3)}
  # A reference without a number cannot be matched.
  assert metrics.gsm8k_accuracy(["7"], ["seven"]) == {"accuracy": 0.0}


@pytest.mark.parametrize("metric", [metrics.rouge, metrics.bleu, metrics.exact_match,
                                    metrics.gsm8k_accuracy])
def test_metrics_reject_mismatched_empty_or_non_text_inputs(metric):
  with pytest.raises(ValueError, match="Got 2 predictions for 1 references"):
    metric(["a", "b"], ["a"])
  with pytest.raises(ValueError, match="Got no references"):
    metric([], [])
  with pytest.raises(ValueError, match="The prediction at index 0 is a list, not a str"):
    metric([[1, 2]], ["a"])


# ------------------------------------------------------------------ n-gram diversity metrics

GENERATIONS = ["the cat sat on the cat sat", "a b a b a b", "one", "the cat ran"]


def _ngram_ids(text, n):
  """[number of n-grams] ids of a text's word n-grams (a NumPy reference, via np.unique)."""
  words = np.array(text.split(), dtype=object)
  if len(words) < n:
    return np.zeros((0, n), dtype=object)
  return np.stack([words[i:len(words) - n + 1 + i] for i in range(n)], axis=1)


def test_distinct_n_matches_a_numpy_reference_and_hand_values():
  result = metrics.distinct_n(GENERATIONS)
  for n in (1, 2, 3, 4):
    grams = np.concatenate([_ngram_ids(t, n) for t in GENERATIONS]).astype(str)
    expected = len(np.unique(grams, axis=0)) / len(grams)
    assert result[f"distinct_{n}"] == pytest.approx(expected)
  # By hand: 7 + 6 + 1 + 3 = 17 words, 8 distinct (the, cat, sat, on, a, b, one, ran);
  # 6 + 5 + 0 + 2 = 13 bigrams, 7 distinct (the-cat, cat-sat, sat-on, on-the, a-b, b-a, cat-ran).
  assert result["distinct_1"] == pytest.approx(8 / 17)
  assert result["distinct_2"] == pytest.approx(7 / 13)
  assert metrics.distinct_n(["x"], ns=(2,)) == {"distinct_2": 0.0}


def test_repetition_matches_a_numpy_reference_and_hand_values():
  result = metrics.repetition(GENERATIONS)
  for n in (1, 2, 3, 4):
    rates = [1 - len(np.unique(g.astype(str), axis=0)) / len(g)
             for g in (_ngram_ids(t, n) for t in GENERATIONS) if len(g)]
    assert result[f"rep_{n}"] == pytest.approx(np.mean(rates))
  # By hand, bigrams: "the cat sat on the cat sat" repeats 2 of 6 (the-cat, cat-sat again),
  # "a b a b a b" 3 of 5, "one" has none (skipped), "the cat ran" 0 of 2.
  assert result["rep_2"] == pytest.approx((2 / 6 + 3 / 5 + 0) / 3)
  assert metrics.repetition(["a a a a"], ns=(1, 4)) == {"rep_1": 0.75, "rep_4": 0.0}
  assert metrics.repetition(["x y"], ns=(3,)) == {"rep_3": 0.0}
  with pytest.raises(ValueError, match="not a str"):
    metrics.repetition([3])
  with pytest.raises(ValueError, match="no generations"):
    metrics.distinct_n([])
