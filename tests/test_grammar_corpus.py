"""The grammar corpus and the text continuation task reading it (data.source="grammar")."""

import re

import pytest

from jaxsi.data import grammar_corpus
from jaxsi.data import text_files


def test_documents_are_deterministic_sentences_of_the_grammar():
  documents = grammar_corpus.documents(50, seed=3)
  assert documents == grammar_corpus.documents(50, seed=3)
  assert documents != grammar_corpus.documents(50, seed=4)
  vocabulary = {w for words in grammar_corpus._CLASSES.values() for w in words} | {"and", "then"}
  for document in documents:
    sentences = re.findall(r"[^.]+\.", document)
    assert 2 <= len(sentences) <= 4 and " ".join(s.strip() for s in sentences) == document
    for sentence in sentences:
      words = sentence.strip().rstrip(".").lower().split()
      assert set(words) <= vocabulary, sentence
      assert words[0] in grammar_corpus._CLASSES["DET"]
  with pytest.raises(ValueError, match="integer >= 0"):
    grammar_corpus.documents(-1, seed=0)


def test_text_continuation_task_reads_the_grammar_and_scores_diversity():
  config = text_files.default_data_config()
  config.update(source="grammar", num_generated=20, tokenizer="char", max_prompt_len=16,
                max_response_len=32, eval_size=4)
  task = text_files.TextContinuationTask(config)
  documents = grammar_corpus.documents(20, seed=0)
  assert (list(task._train), list(task._eval)) == (documents[:16], documents[16:])
  examples = task.eval_examples()
  assert len(examples) == 4 and examples[0].prompt_text == documents[16][:15]
  scores = task.score(["a b a b", "c d e"] + ["f"] * 2, examples)
  assert scores["distinct_1"] == pytest.approx(6 / 9)
  assert scores["rep_2"] == pytest.approx((1 / 3 + 0) / 2)
  assert {f"{m}_{n}" for m in ("distinct", "rep") for n in (1, 2, 3, 4)} <= set(scores)
