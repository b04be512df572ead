"""The best-of-N eval: selection, coverage and likelihoods against NumPy and teacher forcing."""

import dataclasses

import jax
import ml_collections
import numpy as np
import pytest

from jaxsi import mesh as mesh_lib
from jaxsi.data import tasks
from jaxsi.evals import best_of_n
from jaxsi.models import decoder
from jaxsi.objectives import sharpening


def _numpy_best_of_n(correct, log_likelihood, length, n, normalized):
  """Reference: per row, the FIRST maximum of the score among the first n samples."""
  picked_correct, picked_score, picked_length = [], [], []
  for e in range(correct.shape[0]):
    scores = [log_likelihood[e, j] / max(length[e, j], 1) if normalized else log_likelihood[e, j]
              for j in range(n)]
    best = 0
    for j in range(1, n):
      if scores[j] > scores[best]:
        best = j
    picked_correct.append(correct[e, best])
    picked_score.append(scores[best])
    picked_length.append(length[e, best])
  return np.mean(picked_correct), np.mean(picked_score), np.mean(picked_length)


def test_selection_by_sum_and_by_mean_matches_numpy():
  rng = np.random.default_rng(0)
  e, n = 40, 8
  correct = rng.integers(0, 2, (e, n)).astype(float)
  length = rng.integers(1, 6, (e, n))
  # Few distinct values, so ties (first wins) and sum/mean disagreements both happen.
  log_likelihood = -rng.integers(1, 5, (e, n)).astype(float)
  truncated = rng.random((e, n)) < 0.2
  metrics = best_of_n.best_of_n_metrics(correct, log_likelihood, length, truncated, (1, 3, 8))
  for k in (1, 3, 8):
    for suffix, normalized in (("", False), ("_norm", True)):
      accuracy, score, mean_length = _numpy_best_of_n(correct, log_likelihood, length, k,
                                                      normalized)
      assert metrics[f"accuracy_bon{k}{suffix}"] == pytest.approx(accuracy)
      assert metrics[f"reward_bon{k}{suffix}"] == pytest.approx(score)
      assert metrics[f"length_bon{k}{suffix}"] == pytest.approx(mean_length)
  assert metrics["accuracy_sampled"] == pytest.approx(correct.mean())
  assert metrics["reward_sampled"] == pytest.approx(log_likelihood.mean())
  assert metrics["reward_sampled_norm"] == pytest.approx((log_likelihood / length).mean())
  assert metrics["truncation_sampled"] == pytest.approx(truncated.mean())
  # the two rules disagree somewhere on this draw (else the test would not tell them apart)
  assert metrics["accuracy_bon8"] != metrics["accuracy_bon8_norm"]


def test_coverage_is_pass_at_n_by_hand():
  correct = np.array([[0, 0, 1, 0],
                      [1, 0, 0, 0],
                      [0, 0, 0, 0]], float)
  zeros = np.zeros_like(correct)
  metrics = best_of_n.best_of_n_metrics(correct, zeros, zeros + 1, zeros.astype(bool),
                                        (1, 2, 3, 4))
  assert [metrics[f"coverage{n}"] for n in (1, 2, 3, 4)] == pytest.approx(
      [1 / 3, 1 / 3, 2 / 3, 2 / 3])
  # all scores tie: best-of-n takes the first sample, whatever n
  assert metrics["accuracy_bon4"] == metrics["accuracy_bon1"] == pytest.approx(1 / 3)


def test_best_of_one_is_plain_sampling():
  rng = np.random.default_rng(1)
  correct = rng.integers(0, 2, (25, 1)).astype(float)
  log_likelihood, length = -rng.random((25, 1)) * 5, rng.integers(1, 4, (25, 1))
  metrics = best_of_n.best_of_n_metrics(correct, log_likelihood, length,
                                        np.zeros((25, 1), bool), (1,))
  for key in ("accuracy_bon1", "accuracy_bon1_norm", "coverage1"):
    assert metrics[key] == metrics["accuracy_sampled"] == pytest.approx(correct.mean())
  assert metrics["reward_bon1"] == metrics["reward_sampled"]
  assert metrics["length_bon1"] == metrics["length_bon1_norm"] == metrics["length_sampled"]


@pytest.mark.parametrize("ns, message", [
    ((0, 2), r"Best-of-N value 0 is invalid"),
    ((2.5,), r"Best-of-N value 2.5 is invalid"),
])
def test_bad_n_is_one_sentence(ns, message):
  with pytest.raises(ValueError, match=message):
    best_of_n.check_ns(ns)


def test_more_n_than_drawn_is_an_error():
  with pytest.raises(ValueError, match=r"Best-of-4 needs 4 samples per prompt but only 2"):
    best_of_n.best_of_n_metrics(np.zeros((3, 2)), np.zeros((3, 2)), np.ones((3, 2)),
                                np.zeros((3, 2), bool), (1, 4))


# ----------------------------------------------------------------------------- a tiny model


@pytest.fixture(scope="module")
def model():
  data = tasks.default_data_config("arithmetic")
  data.digits = 1
  task = tasks.get_task(data)
  cfg = decoder.default_config("gpt2")
  cfg.update(vocab_size=104, num_real_tokens=task.tokenizer.vocab_size, d_model=16,
             num_layers=1, num_heads=2, num_kv_heads=2, head_dim=8, d_ff=32, max_len=40)
  lm = decoder.DecoderLM(cfg)
  flat, treedef = jax.tree.flatten(lm.init(jax.random.key(0)))
  models = []
  for seed in (0, 1):
    rng = np.random.default_rng(seed)
    # Large random weights: peaked, varied distributions (some EOS, some correct answers).
    leaves = [x + 0.7 * rng.normal(size=x.shape).astype(np.float32) for x in flat]
    models.append((lm, jax.tree.unflatten(treedef, leaves)))
  mesh = mesh_lib.build_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1}))
  return task, models[0], models[1], mesh


def _teacher_forced(lm, params, task, prompts, tokens, mask):
  batch = {"prompt": prompts["prompt"], "prompt_mask": prompts["prompt_mask"],
           "response": tokens, "response_mask": mask}
  return np.asarray(sharpening.self_reward(lm, params, batch, eos_id=task.tokenizer.eos_id))


def test_draw_reuses_the_samplers_log_probs_as_the_self_reward(model):
  task, (lm, params), _, mesh = model
  examples = task.eval_examples(10)
  drawn = best_of_n.draw(lm, params, task, examples, num_samples=3, temperature=1.0,
                         max_new_tokens=task.max_response_len, batch_size=8,
                         rng=jax.random.key(3), mesh=mesh)
  assert drawn.log_likelihood.shape == (10, 3) and len(drawn.texts) == 10
  prompts = task.pack([ex for ex in examples for _ in range(3)], with_response=False)
  expected = _teacher_forced(lm, params, task, prompts, drawn.tokens.reshape(30, -1),
                             drawn.mask.reshape(30, -1))
  np.testing.assert_allclose(drawn.log_likelihood.reshape(30), expected, atol=1e-4)
  np.testing.assert_array_equal(drawn.length, drawn.mask.sum(-1))
  assert [row[0] for row in drawn.texts][:2] == [
      task.tokenizer.decode(list(drawn.tokens[i, 0])) for i in range(2)]


def test_evaluate_matches_a_numpy_recomputation(model):
  task, (lm, params), (base_lm, base_params), mesh = model
  examples = task.eval_examples(12)
  ns, seed = (1, 2, 4), 7
  rng = jax.random.fold_in(jax.random.PRNGKey(seed), best_of_n.BON_STREAM)
  knobs = dict(max_new_tokens=task.max_response_len, batch_size=8, mesh=mesh)
  greedy = best_of_n.draw(lm, params, task, examples, num_samples=1, temperature=0.0, rng=rng,
                          **knobs)
  sampled = best_of_n.draw(lm, params, task, examples, num_samples=4, temperature=1.0,
                           rng=jax.random.fold_in(rng, 1), **knobs)
  # Make answers known: example e's reference becomes sample (e % 5) of its draw (none for
  # e % 5 == 4), and the greedy answer for even e.
  examples = [dataclasses.replace(ex, target_text=(
      sampled.texts[e][e % 5] if e % 5 < 4 else "no such answer")) for e, ex in enumerate(examples)]
  for e in range(0, 12, 2):
    examples[e] = dataclasses.replace(examples[e], target_text=greedy.texts[e][0])
  metrics = best_of_n.evaluate(lm, params, task, examples, ns=ns, temperature=1.0, seed=seed,
                               base=(base_lm, base_params), **knobs)

  correct = np.array([[float(text.strip() == ex.target_text.strip()) for text in row]
                      for row, ex in zip(sampled.texts, examples)])
  assert correct.sum() >= 6  # the construction planted right answers
  assert metrics["accuracy_greedy"] == pytest.approx(np.mean(
      [greedy.texts[e][0].strip() == ex.target_text.strip() for e, ex in enumerate(examples)]))
  assert metrics["accuracy_greedy"] >= 0.5
  length = sampled.mask.sum(-1)
  for n in ns:
    assert metrics[f"coverage{n}"] == pytest.approx(correct[:, :n].max(1).mean())
    for suffix, normalized in (("", False), ("_norm", True)):
      accuracy, score, _ = _numpy_best_of_n(correct, sampled.log_likelihood, length, n,
                                            normalized)
      assert metrics[f"accuracy_bon{n}{suffix}"] == pytest.approx(accuracy)
      assert metrics[f"reward_bon{n}{suffix}"] == pytest.approx(score, abs=1e-5)
  assert metrics["accuracy_sampled"] == pytest.approx(correct.mean())
  assert metrics["accuracy_bon1"] == pytest.approx(correct[:, 0].mean())

  prompts = task.pack(examples, with_response=False)
  own = _teacher_forced(lm, params, task, prompts, greedy.tokens[:, 0], greedy.mask[:, 0])
  base = _teacher_forced(base_lm, base_params, task, prompts, greedy.tokens[:, 0],
                         greedy.mask[:, 0])
  assert metrics["log_likelihood_greedy"] == pytest.approx(own.mean(), abs=1e-4)
  assert metrics["base_log_likelihood_greedy"] == pytest.approx(base.mean(), abs=1e-4)
  assert abs(own.mean() - base.mean()) > 1e-2  # two different models
  references = task.pack(examples)
  reference = _teacher_forced(lm, params, task, references, references["response"],
                              references["response_mask"])
  assert metrics["reference_log_likelihood"] == pytest.approx(reference.mean(), abs=1e-4)


def test_train_examples_follow_the_generate_stage_order():
  data = tasks.default_data_config("arithmetic")
  data.digits = 1
  task = tasks.get_task(data)
  examples = best_of_n.train_examples(task, 7, chunk_size=3)
  assert len(examples) == 7
  for i, example in enumerate(examples):
    problem = task.generator.train_problem(i)
    assert example.target_text == problem.answer
    assert example.prompt_text == problem.question
    assert example.prompt_ids == task.tokenizer.encode(problem.question, add_bos=True)
    assert example.target_ids == task.tokenizer.encode(problem.answer, add_eos=True)


def test_settings_are_checked():
  config = ml_collections.ConfigDict({"eval": {"best_of_n": best_of_n.default_config()}})
  assert not best_of_n.enabled(config)
  config.eval.best_of_n.ns = (4, 1)
  assert best_of_n.enabled(config)
  config.eval.best_of_n.train_prompts = -1
  with pytest.raises(ValueError, match=r"eval.best_of_n.train_prompts=-1 must be an integer"):
    best_of_n.enabled(config)
