"""Tests for the TFDS tasks (XSum, WMT14 en->de, GSM8K) on `tfds.testing.mock_data`."""

import numpy as np
import pytest
import tensorflow_datasets as tfds
import tokenizers as hf_tokenizers
import transformers

from jaxsi.data import tasks
from jaxsi.data import tfds_tasks
from jaxsi.data import tokenizers
from jaxsi.evals import metrics

NUM_RECORDS = 12
TFDS_TASKS = ("xsum", "wmt14_translate/de-en", "gsm8k")
# (prompt field, response field) of each dataset.
FIELDS = {"xsum": ("document", "summary"), "wmt14_translate/de-en": ("en", "de"),
          "gsm8k": ("question", "answer")}


def mock_config(name, **overrides):
  config = tasks.default_data_config(name)
  config.update(dict(mock=True, mock_num_examples=NUM_RECORDS, tokenizer="char",
                     prompt_template="{" + FIELDS[name][0] + "}", max_prompt_len=32,
                     max_response_len=32))
  config.update(overrides)
  return config


def mock_records(name, split="train"):
  """The mock split read straight from TFDS, independently of the task code."""
  with tfds.testing.mock_data(num_examples=NUM_RECORDS):
    source = tfds.builder(name).as_data_source(split=split)
    return [source[index] for index in range(len(source))]


def decode_rows(tokenizer, ids_BxL, mask_BxL):
  return [tokenizer.decode(row[mask == 1], stop_at_eos=False)
          for row, mask in zip(ids_BxL, mask_BxL)]


@pytest.fixture(name="xsum", scope="module")
def fixture_xsum():
  return tasks.get_task(mock_config("xsum"))


def test_default_configs_carry_the_paper_lengths_and_keep_arithmetic_the_default():
  assert tasks.default_data_config().name == "arithmetic"
  xsum = tasks.default_data_config("xsum")
  assert (xsum.tfds_name, xsum.train_split, xsum.eval_split) == ("xsum", "train", "validation")
  assert (xsum.max_prompt_len, xsum.max_response_len, xsum.truncation) == (1024, 64, "right")
  wmt = tasks.default_data_config("wmt14_translate/de-en")
  assert (wmt.max_prompt_len, wmt.max_response_len) == (80, 80)
  gsm8k = tasks.default_data_config("gsm8k")
  assert (gsm8k.eval_split, gsm8k.max_prompt_len, gsm8k.max_response_len) == ("test", 512, 320)
  assert gsm8k.num_shots == 0 and gsm8k.strip_calculator_annotations
  assert "num_shots" not in xsum
  assert set(TFDS_TASKS) <= set(tasks.task_names())
  with pytest.raises(ValueError, match=r"Unknown task 'cnn' for default_data_config; known "
                     r"tasks are: arithmetic, gsm8k, sharpened, text_continuation, "
                     r"wmt14_translate/de-en, xsum\."):
    tasks.default_data_config("cnn")


@pytest.mark.parametrize("name", TFDS_TASKS)
def test_batch_rows_are_the_permuted_train_records_with_fixed_shapes(name):
  task = tasks.get_task(mock_config(name))
  assert task.headline_metric == {"xsum": "rouge2", "gsm8k": "accuracy"}.get(name, "bleu")
  batch = task.train_batch(1, 4)
  assert {key: value.shape for key, value in batch.items()} == {
      "prompt": (4, 32), "prompt_mask": (4, 32), "response": (4, 32), "response_mask": (4, 32)}
  assert all(value.dtype == np.int32 for value in batch.values())
  prompt_field, response_field = FIELDS[name]
  records = mock_records(name)
  char = tokenizers.CharTokenizer()
  for row in range(4):
    record = records[task.train_record_index(4 + row)]
    prompt_len = int(batch["prompt_mask"][row].sum())
    response_len = int(batch["response_mask"][row].sum())
    # Prompts left-padded behind BOS, responses right-padded and ended by EOS.
    np.testing.assert_array_equal(batch["prompt_mask"][row], np.arange(32) >= 32 - prompt_len)
    np.testing.assert_array_equal(batch["response_mask"][row], np.arange(32) < response_len)
    assert batch["prompt"][row, 32 - prompt_len] == char.bos_id
    assert batch["response"][row, response_len - 1] == char.eos_id
    assert (batch["prompt"][row][batch["prompt_mask"][row] == 0] == char.pad_id).all()
    assert char.decode(batch["prompt"][row]) == record[prompt_field]
    assert char.decode(batch["response"][row]) == record[response_field]


def test_train_order_is_a_seeded_permutation_per_epoch(xsum):
  first_epoch = [xsum.train_record_index(row) for row in range(NUM_RECORDS)]
  second_epoch = [xsum.train_record_index(NUM_RECORDS + row) for row in range(NUM_RECORDS)]
  assert sorted(first_epoch) == sorted(second_epoch) == list(range(NUM_RECORDS))
  assert first_epoch != second_epoch and first_epoch != list(range(NUM_RECORDS))
  reseeded = tasks.get_task(mock_config("xsum", seed=1))
  assert [reseeded.train_record_index(row) for row in range(NUM_RECORDS)] != first_epoch


def test_batches_are_a_pure_function_of_the_step(xsum):
  fresh = tasks.get_task(mock_config("xsum"))
  # `xsum` reads steps 0..6 in order first; `fresh` jumps to step 7 (a resumed run).
  in_order = [xsum.train_batch(step, 4) for step in range(8)]
  resumed = fresh.train_batch(7, 4)
  for key in resumed:
    np.testing.assert_array_equal(in_order[7][key], resumed[key])
  np.testing.assert_array_equal(xsum.train_batch(7, 4)["prompt"], resumed["prompt"])
  assert not np.array_equal(in_order[0]["prompt"], in_order[1]["prompt"])


def test_host_slices_concatenate_to_the_global_batch(xsum):
  # Step 2 with batch 8 straddles the first and second epoch of the 12 records.
  global_batch = xsum.train_batch(2, 8)
  slices = [xsum.train_batch(2, 8, process_index=index, process_count=4) for index in range(4)]
  assert slices[0]["prompt"].shape == (2, 32)
  for key, value in global_batch.items():
    np.testing.assert_array_equal(np.concatenate([piece[key] for piece in slices]), value)
  with pytest.raises(ValueError, match="batch_size=6 is invalid"):
    xsum.train_batch(0, 6, process_index=0, process_count=4)


def test_eval_examples_come_from_the_eval_split_in_order(xsum):
  records = mock_records("xsum", "validation")
  examples = xsum.eval_examples(3)
  assert [example.prompt_text for example in examples] == [r["document"] for r in records[:3]]
  assert [example.target_text for example in examples] == [r["summary"] for r in records[:3]]
  assert examples[0].target_ids == tokenizers.CharTokenizer().encode(
      records[0]["summary"], add_eos=True)
  assert len(xsum.eval_examples()) == NUM_RECORDS  # eval_size 1000 > the split's 12
  with pytest.raises(ValueError, match="eval_examples got n=0; use a positive integer"):
    xsum.eval_examples(0)


def test_truncation_modes_cut_the_prompt_on_their_side_and_keep_eos():
  document = mock_records("xsum")[0]["document"]  # "gebc   ahgjefjhfef"
  summary = mock_records("xsum")[0]["summary"]
  char = tokenizers.CharTokenizer()
  keep_start = tasks.get_task(mock_config("xsum", max_prompt_len=7, max_response_len=5))
  example = keep_start.eval_examples(1)[0]
  assert example.prompt_ids == char.encode(document[:6], add_bos=True)
  assert example.target_ids == char.encode(summary[:4], add_eos=True)
  keep_end = tasks.get_task(mock_config("xsum", max_prompt_len=7, truncation="left",
                                        prompt_eos=True))
  assert keep_end.eval_examples(1)[0].prompt_ids == char.encode(document[-5:], add_bos=True,
                                                                 add_eos=True)
  strict = tasks.get_task(mock_config("xsum", max_prompt_len=7, truncation="error"))
  with pytest.raises(ValueError, match=r"The prompt of eval record 0 of 'validation' has 19 "
                     r"tokens, more than data\.max_prompt_len=7; raise it"):
    strict.eval_examples(1)


def _save_byte_level_tokenizer(directory, *, with_bos):
  """A small byte-level BPE tokenizer trained on mock-like text, saved like a Hub one."""
  model = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE())
  model.pre_tokenizer = hf_tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  model.decoder = hf_tokenizers.decoders.ByteLevel()
  trainer = hf_tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<pad>", "</s>", "<s>"], show_progress=False,
      initial_alphabet=hf_tokenizers.pre_tokenizers.ByteLevel.alphabet())
  model.train_from_iterator(["gebc ahgjefjhfef chg dif hhia", "summarize: a b c d e f g h i j"],
                            trainer=trainer)
  specials = dict(eos_token="</s>", pad_token="<pad>")
  if with_bos:
    specials["bos_token"] = "<s>"
  transformers.PreTrainedTokenizerFast(tokenizer_object=model, **specials).save_pretrained(
      directory)
  return str(directory)


def test_hugging_face_tokenizer_frames_prompts_like_t5_or_with_bos(tmp_path):
  t5_like = _save_byte_level_tokenizer(tmp_path / "t5_like", with_bos=False)
  task = tasks.get_task(mock_config("xsum", tokenizer=t5_like, prompt_eos=True,
                                    prompt_template="summarize: {document}",
                                    max_prompt_len=64))
  assert isinstance(task.tokenizer, tokenizers.HFTokenizer)
  hf = transformers.AutoTokenizer.from_pretrained(t5_like)
  record = mock_records("xsum")[task.train_record_index(0)]
  batch = task.train_batch(0, 2)
  prompt_len = int(batch["prompt_mask"][0].sum())
  prompt_ids = hf("summarize: " + record["document"], add_special_tokens=False)["input_ids"]
  # No BOS in this tokenizer: text + EOS, as T5 saw its inputs in pretraining.
  assert batch["prompt"][0, -prompt_len:].tolist() == prompt_ids + [hf.eos_token_id]
  assert task.tokenizer.decode(batch["response"][0]) == record["summary"]

  with_bos = _save_byte_level_tokenizer(tmp_path / "with_bos", with_bos=True)
  task = tasks.get_task(mock_config("xsum", tokenizer=with_bos, max_prompt_len=64))
  batch = task.train_batch(0, 2)
  prompt_len = int(batch["prompt_mask"][0].sum())
  assert batch["prompt"][0, -prompt_len] == task.tokenizer.bos_id == 2
  assert task.tokenizer.decode(batch["prompt"][0]) == record["document"]


def test_gsm8k_few_shot_prefix_annotations_and_score(tmp_path):
  # The shots are separated by blank lines, which the char tokenizer cannot encode.
  tokenizer = _save_byte_level_tokenizer(tmp_path, with_bos=False)
  task = tasks.get_task(mock_config("gsm8k", num_shots=2, max_prompt_len=128,
                                    prompt_template="Q: {question} A:", tokenizer=tokenizer))
  records = mock_records("gsm8k")
  shots = "".join(f"Q: {r['question']} A: {r['answer']}\n\n" for r in records[:2])
  assert task.eval_examples(1)[0].prompt_text == shots + f"Q: {records[0]['question']} A:"
  # The shots are left out of training.
  indices = {task.train_record_index(row) for row in range(NUM_RECORDS - 2)}
  assert indices == set(range(2, NUM_RECORDS))
  solution = "She sold 48/2 = <<48/2=24>>24 clips.\n#### 72"
  assert task.response_text({"answer": solution}) == "She sold 48/2 = 24 clips.\n#### 72"
  examples = [tasks.Example([1], "q", solution, [2]), tasks.Example([1], "q", "#### 5", [2])]
  assert task.score(["So 72 clips.", "#### 6"], examples) == {"accuracy": 0.5}


def test_xsum_and_wmt_score_with_rouge_and_bleu(xsum):
  examples = [tasks.Example([1], "p", "the quick brown fox jumps over the lazy dog", [2]),
              tasks.Example([1], "p", "a cat sat on the mat today", [2])]
  predictions = ["the quick brown fox jumped over a lazy dog", "the cat sat on a mat"]
  references = [example.target_text for example in examples]
  assert xsum.score(predictions, examples) == metrics.rouge(predictions, references)
  wmt = tasks.get_task(mock_config("wmt14_translate/de-en"))
  assert wmt.score(predictions, examples) == metrics.bleu(predictions, references)
  with pytest.raises(ValueError, match="score got 1 predictions for 2 examples"):
    wmt.score(predictions[:1], examples)


class JaxsiTestPairs(tfds.core.GeneratorBasedBuilder):
  """A small real TFDS dataset (registered as "jaxsi_test_pairs") to prepare in tmp dirs."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    text = tfds.features.Text()
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({"document": text, "summary": text}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(10), "validation": self._generate_examples(3)}

  def _generate_examples(self, num_records):
    for index in range(num_records):
      yield index, {"document": f"document number {index}", "summary": f"summary {index}"}


@pytest.fixture(name="prepared_dirs", scope="module")
def fixture_prepared_dirs(tmp_path_factory):
  """data_dirs holding jaxsi_test_pairs prepared as array_record and as tfrecord."""
  data_dirs = {}
  for file_format in ("array_record", "tfrecord"):
    data_dirs[file_format] = str(tmp_path_factory.mktemp(file_format))
    tfds.builder("jaxsi_test_pairs", data_dir=data_dirs[file_format]).download_and_prepare(
        file_format=file_format)
  return data_dirs


def test_prepared_splits_read_the_same_with_or_without_random_access(prepared_dirs):
  random_access = tfds_tasks.load_split("jaxsi_test_pairs", "train",
                                        data_dir=prepared_dirs["array_record"])
  # A tfrecord dataset has no data source: the split is read into memory, in the same order.
  in_memory = tfds_tasks.load_split("jaxsi_test_pairs", "train",
                                    data_dir=prepared_dirs["tfrecord"])
  assert isinstance(in_memory, list) and len(in_memory) == len(random_access) == 10
  as_text = lambda record: {key: tfds_tasks._text(value) for key, value in record.items()}
  assert [as_text(record) for record in in_memory] == [as_text(random_access[index])
                                                       for index in range(10)]
  assert sorted(as_text(record)["summary"] for record in in_memory) == sorted(
      f"summary {index}" for index in range(10))
  with pytest.raises(ValueError, match=r"Split 'dev\[:5\]' does not exist in TFDS dataset "
                     r"'jaxsi_test_pairs'; its splits are: train, validation\."):
    tfds_tasks.load_split("jaxsi_test_pairs", "dev[:5]", data_dir=prepared_dirs["tfrecord"])


@pytest.mark.parametrize("file_format", ["array_record", "tfrecord"])
def test_task_on_a_prepared_dataset(prepared_dirs, file_format):
  config = mock_config("xsum", mock=False, tfds_name="jaxsi_test_pairs",
                       data_dir=prepared_dirs[file_format], train_split="train[:8]")
  task = tasks.get_task(config)
  char = tokenizers.CharTokenizer()
  epoch = [task.train_batch(step, 4) for step in range(2)]
  prompts = sorted(char.decode(row) for batch in epoch for row in batch["prompt"])
  assert len(set(prompts)) == 8 and all(text.startswith("document number ") for text in prompts)
  examples = task.eval_examples()
  assert len(examples) == 3
  assert {example.prompt_text[-1] for example in examples} == {
      example.target_text[-1] for example in examples}  # document i goes with summary i


def test_download_prepares_a_missing_dataset_as_array_record(tmp_path):
  config = mock_config("xsum", mock=False, tfds_name="jaxsi_test_pairs", data_dir=str(tmp_path),
                       download=True)
  task = tasks.get_task(config)
  assert task.train_batch(0, 2)["prompt"].shape == (2, 32)
  assert list(tmp_path.glob("jaxsi_test_pairs/1.0.0/*.array_record*"))


@pytest.mark.parametrize("overrides, message", [
    (dict(mock_num_examples=0), r"Split 'train' of TFDS dataset 'xsum' is empty; choose a "
                                r"split with records\."),
    (dict(prompt_template="{article}"), r"data\.prompt_template='\{article\}' names 'article', "
                                         r"which 'xsum' records lack; their fields are: "
                                         r"document, summary\."),
    (dict(prompt_template="summarize"), r"data\.prompt_template='summarize' has no \{field\}"),
    (dict(prompt_template="{document"), r"data\.prompt_template='\{document' is not a valid "
                                        r"format string"),
    (dict(seed=-1), r"data\.seed=-1 is invalid; use a non-negative integer\."),
    (dict(truncation="middle"), r"data\.truncation='middle' is invalid; use one of"),
    (dict(max_response_len=1), r"data\.max_response_len=1 leaves no room for a token before "
                               r"EOS; use at least 2\."),
    (dict(max_prompt_len=1), r"data\.max_prompt_len=1 leaves no room for text"),
    (dict(eval_size=0), r"data\.eval_size=0 is invalid; use a positive integer\."),
])
def test_bad_configs_fail_with_one_sentence(overrides, message):
  with pytest.raises(ValueError, match=message):
    tasks.get_task(mock_config("xsum", **overrides))


def test_unprepared_or_unknown_datasets_fail_with_one_sentence(tmp_path):
  config = tasks.default_data_config("xsum")
  config.tokenizer = "char"
  config.data_dir = str(tmp_path)
  with pytest.raises(ValueError, match=r"TFDS dataset 'xsum' is not prepared in data_dir='.*'; "
                     r"run `tfds build xsum --file_format=array_record` once or set "
                     r"data\.download=True\."):
    tasks.get_task(config)
  config.tfds_name = "no_such_dataset"
  with pytest.raises(ValueError, match=r"data\.tfds_name='no_such_dataset' is not a TFDS "
                     r"dataset"):
    tasks.get_task(config)
  with pytest.raises(ValueError, match="num_shots=12 uses all 12 train records"):
    tasks.get_task(mock_config("gsm8k", num_shots=12))
