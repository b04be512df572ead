"""Sharpening: self-improvement by amortizing best-of-N under the model's own likelihood.

Spec: shared/spec/sharpening.md (Huang et al., ICLR 2025). The self-reward of a response y to
a prompt x is its log-likelihood under the frozen base model, r(x, y) = log π_base(y|x)
(`self_reward`), optionally divided by |y| (`normalize`, the spec's `length_normalized`).

Pieces:

  self_reward(lm, params, batch)      r [B], teacher-forced, float32.
  best_of_n(lm, params, prompt, ...)  inference-time sharpening: N samples per prompt from ONE
                                      `sampling.sample` call (shared prefill), the argmax of r.
  adaptive_best_of_n(draw, ...)       host loop: sample in chunks until
                                      1 / max_j π_base(y_j|x) <= k / μ, μ = ln(2/δ), N <= n_max.
  make_loss_fn(lm, cfg, base_lm=...)  the training loss of `cfg.mode`:
      "sft"   masked NLL of the batch's responses (SFT-Sharpening: on the best-of-N dataset of
              `jaxsi.sharpen_data`, or with `online=True` on best-of-N responses drawn per
              step by `make_preparer`);
      "rlhf"  the RLHF-Sharpening squared loss on pairs y, y' ~ π_base (`pair_residual`);
      "xpo"   its online XPO variant: y ~ π (current policy), ỹ ~ π_base, plus the optimism
              term α·log π(ỹ|x) ADDED to the minimized loss (see `make_loss_fn`).
  make_preparer(lm, cfg, base_lm=...) the host-side per-step hook that draws those responses.

Pair batches carry y in `response` / `response_mask` and y' (or ỹ) in `response_prime` /
`response_prime_mask` [B, T]; both share the batch's `prompt` / `prompt_mask`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from ml_collections import config_dict

from jaxsi import config as config_lib
from jaxsi import partitioning
from jaxsi import sampling
from jaxsi.models import lm as lm_lib
from jaxsi.objectives import chunked
from jaxsi.objectives import sft

MODES = ("sft", "rlhf", "xpo")
PAIR_KEYS = ("response_prime", "response_prime_mask")
# PRNG stream folded into the run's base key for the per-step samples of `make_preparer`
# (GKD's on-policy sampler uses 2 and 3).
SAMPLE_STREAM = 4


# ----------------------------------------------------------------------------- config


def default_objective_config() -> ml_collections.ConfigDict:
  """Returns the sharpening objective config with its defaults.

  Keys:
    name: "sharpening".
    mode: "sft" (NLL of the batch's responses), "rlhf" (squared loss on base-model pairs) or
      "xpo" (online XPO variant); see the module docstring.
    online: "sft" mode only: replace each step's responses by best-of-N samples of the frozen
      base (drawn by `make_preparer`) instead of reading them from a generated dataset.
    n: N, samples per prompt for best-of-N (with adaptive_n: the chunk drawn per round).
    temperature: τ_s > 0 of the samples (1 = the spec's default).
    top_k: >= 0, sampling top-k (0 = off).
    top_p: in (0, 1], nucleus (1 = off).
    normalize: divide the self-reward by the response length (the spec's length_normalized).
    drop_truncated: rank responses that hit max_new_tokens without EOS below all others.
    max_new_tokens: sample length; None = the task's response width.
    normalization: "sequence" or "token", the NLL average of mode "sft" (see `sft.normalize`).
    vocab_chunk_size: mode "sft" only: 0 (default) or c > 0 to apply the output head to c
      positions at a time, never holding [B, T, V] logits (see `sft.default_objective_config`).
    beta: β > 0 of the RLHF-Sharpening loss; its optimum is π ∝ π_base^(1 + 1/β).
    xpo_alpha: α >= 0, weight of the XPO optimism term α·log π(ỹ|x) (mode "xpo").
    adaptive_n: generate stage only. enabled; k > 0 and delta in (0, 1): stop sampling a
      prompt once 1 / max_j π_base(y_j|x) <= k / ln(2/δ); n_max: the cap on N.
    generate: the dataset of the generate stage (`jaxsi.sharpen_data`): num_prompts, the first
      prompts of the task's train stream; chunk_size, prompts per sampler call and per shard.
  """
  cfg = ml_collections.ConfigDict()
  cfg.name = "sharpening"
  cfg.mode = "sft"
  cfg.online = False
  cfg.n = 16
  cfg.temperature = 1.0
  cfg.top_k = 0
  cfg.top_p = 1.0
  cfg.normalize = False
  cfg.drop_truncated = False
  cfg.max_new_tokens = config_dict.placeholder(int)
  cfg.normalization = "sequence"
  cfg.vocab_chunk_size = 0
  cfg.beta = 1.0
  cfg.xpo_alpha = 1e-3
  cfg.adaptive_n = ml_collections.ConfigDict(
      {"enabled": False, "k": 10.0, "delta": 0.1, "n_max": 64})
  cfg.generate = ml_collections.ConfigDict({"num_prompts": 256, "chunk_size": 16})
  return cfg


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def check_adaptive(k: Any, delta: Any, n_max: Any) -> None:
  """Raises a ValueError naming the first bad adaptive-N setting."""
  if not _is_number(k) or not k > 0:
    raise ValueError(f"Sharpening adaptive_n.k={k!r} must be a number > 0.")
  if not _is_number(delta) or not 0 < delta < 1:
    raise ValueError(f"Sharpening adaptive_n.delta={delta!r} must be a number in (0, 1).")
  if not _is_int(n_max) or n_max < 1:
    raise ValueError(f"Sharpening adaptive_n.n_max={n_max!r} must be an integer >= 1.")


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Raises a ValueError naming the first bad value of a sharpening config."""
  config_lib.check_keys(cfg, default_objective_config(), owner="Sharpening",
                        start_from="jaxsi.objectives.sharpening.default_objective_config")
  if cfg.name != "sharpening":
    raise ValueError(f"Sharpening config has name={cfg.name!r}; expected 'sharpening'.")
  if cfg.mode not in MODES:
    raise ValueError(f"Unknown sharpening mode {cfg.mode!r}; expected one of {', '.join(MODES)}.")
  if not isinstance(cfg.online, bool):
    raise ValueError(f"Sharpening online={cfg.online!r} must be a bool.")
  if cfg.online and cfg.mode != "sft":
    raise ValueError(f"Sharpening online=True applies to mode 'sft' only (mode {cfg.mode!r} "
                     "always samples per step); set online=False.")
  if not _is_int(cfg.n) or cfg.n < 1:
    raise ValueError(f"Sharpening n={cfg.n!r} must be an integer >= 1.")
  if not _is_number(cfg.temperature) or not cfg.temperature > 0:
    raise ValueError(f"Sharpening temperature={cfg.temperature!r} must be a number > 0 "
                     "(best-of-N needs distinct samples).")
  if not _is_int(cfg.top_k) or cfg.top_k < 0:
    raise ValueError(f"Sharpening top_k={cfg.top_k!r} must be an integer >= 0 (0 = off).")
  if not _is_number(cfg.top_p) or not 0 < cfg.top_p <= 1:
    raise ValueError(f"Sharpening top_p={cfg.top_p!r} must be a number in (0, 1] (1 = off).")
  for key in ("normalize", "drop_truncated"):
    if not isinstance(cfg[key], bool):
      raise ValueError(f"Sharpening {key}={cfg[key]!r} must be a bool.")
  if cfg.max_new_tokens is not None and (not _is_int(cfg.max_new_tokens)
                                         or cfg.max_new_tokens < 1):
    raise ValueError(f"Sharpening max_new_tokens={cfg.max_new_tokens!r} must be an integer "
                     ">= 1 or None (= the task's response width).")
  sft.check_normalization(cfg.normalization)
  chunked.check_chunk_size(cfg.vocab_chunk_size, "Sharpening")
  if cfg.vocab_chunk_size and cfg.mode != "sft":
    raise ValueError(f"Sharpening vocab_chunk_size={cfg.vocab_chunk_size} applies to mode 'sft' "
                     f"only (mode {cfg.mode!r} scores whole sequences); set it to 0.")
  if not _is_number(cfg.beta) or not cfg.beta > 0:
    raise ValueError(f"Sharpening beta={cfg.beta!r} must be a number > 0.")
  if not _is_number(cfg.xpo_alpha) or not cfg.xpo_alpha >= 0:
    raise ValueError(f"Sharpening xpo_alpha={cfg.xpo_alpha!r} must be a number >= 0.")
  adaptive = cfg.adaptive_n
  if sorted(adaptive.keys()) != ["delta", "enabled", "k", "n_max"]:
    raise ValueError(f"Sharpening adaptive_n has keys {sorted(adaptive.keys())}; expected "
                     "['delta', 'enabled', 'k', 'n_max'].")
  if not isinstance(adaptive.enabled, bool):
    raise ValueError(f"Sharpening adaptive_n.enabled={adaptive.enabled!r} must be a bool.")
  if adaptive.enabled:
    check_adaptive(adaptive.k, adaptive.delta, adaptive.n_max)
    if cfg.online:
      raise ValueError("Sharpening adaptive_n works in the generate stage only, not with "
                       "online=True; disable one of them.")
  generate = cfg.generate
  if sorted(generate.keys()) != ["chunk_size", "num_prompts"]:
    raise ValueError(f"Sharpening generate has keys {sorted(generate.keys())}; expected "
                     "['chunk_size', 'num_prompts'].")
  for key in ("num_prompts", "chunk_size"):
    if not _is_int(generate[key]) or generate[key] < 1:
      raise ValueError(f"Sharpening generate.{key}={generate[key]!r} must be an integer >= 1.")


def needs_preparer(cfg: ml_collections.ConfigDict) -> bool:
  """Whether the trainer must call `make_preparer`'s hook before every step."""
  validate(cfg)
  return cfg.online or cfg.mode in ("rlhf", "xpo")


def extra_batch_keys(cfg: ml_collections.ConfigDict) -> dict[str, int]:
  """Batch keys (-> ndim) the preparer adds beyond the task's; the trainer shards them too."""
  validate(cfg)
  return {key: 2 for key in PAIR_KEYS} if cfg.mode in ("rlhf", "xpo") else {}


# ----------------------------------------------------------------------------- self-reward


def response_validity(response_BxT: jax.Array, response_mask_BxT: jax.Array,
                      eos_id: int | None) -> jax.Array:
  """Which response slots count: the mask, cut after the first (masked-in) EOS.

  The sampler's masks already stop at the first EOS; batches packed from other sources may
  have a mask running past it (e.g. EOS then more tokens), and the reward of a response is
  defined through its first EOS inclusive. With `eos_id=None` the mask is trusted as is.

  Args:
    response_BxT: [B, T] int token ids.
    response_mask_BxT: [B, T] bool/int, 1 on real response tokens.
    eos_id: end-of-sequence id, or None.

  Returns:
    [B, T] bool.
  """
  valid_BxT = response_mask_BxT.astype(bool)
  if eos_id is None:
    return valid_BxT
  is_eos_BxT = valid_BxT & (response_BxT == eos_id)
  eos_before_BxT = jnp.cumsum(is_eos_BxT, axis=-1) - is_eos_BxT
  return valid_BxT & (eos_before_BxT == 0)


def sequence_log_prob(lm: lm_lib.LanguageModel, params: Any, batch: lm_lib.Batch, *,
                      eos_id: int | None = None, dropout_rng: jax.Array | None = None
                      ) -> tuple[jax.Array, jax.Array]:
  """Teacher-forced log π(y|x) summed over the valid response slots (see `response_validity`).

  Temperature 1 (raw logits) in float32, over the real vocabulary (padded head rows get
  probability 0, as in the sampler). Differentiable in `params`; slots that do not count have
  no effect on the value or the gradient, whatever their logits or ids.

  Args:
    lm: the language model.
    params: its parameters.
    batch: `prompt`, `prompt_mask`, `response`, `response_mask` (see `jaxsi.models.lm`).
    eos_id: end-of-sequence id; slots after the first EOS do not count. None trusts the mask.
    dropout_rng: dropout key, or None (no dropout).

  Returns:
    (log-likelihood [B] float32, number of counted tokens [B] float32).
  """
  valid_BxT = response_validity(batch["response"], batch["response_mask"], eos_id)
  logits_BxTxV = lm.logits(params, batch, dropout_rng=dropout_rng).astype(jnp.float32)
  # Zeroing uncounted slots keeps inf/NaN garbage there out of the value and the gradient.
  logits_BxTxV = jnp.where(valid_BxT[..., None], logits_BxTxV, 0.0)
  logits_BxTxV = sampling.mask_padded_vocab(logits_BxTxV, sampling.num_real_tokens(lm))
  vocab = logits_BxTxV.shape[-1]
  tokens_BxT = jnp.where(valid_BxT, jnp.clip(batch["response"], 0, vocab - 1), 0)
  token_log_prob_BxT = jnp.take_along_axis(jax.nn.log_softmax(logits_BxTxV, axis=-1),
                                           tokens_BxT[..., None], axis=-1)[..., 0]
  token_log_prob_BxT = jnp.where(valid_BxT, token_log_prob_BxT, 0.0)
  return token_log_prob_BxT.sum(axis=-1), valid_BxT.sum(axis=-1).astype(jnp.float32)


def _reward(log_likelihood_B: jax.Array, length_B: jax.Array, normalize: bool) -> jax.Array:
  """r = log-likelihood, or its per-token mean (0 for an empty response)."""
  if not normalize:
    return log_likelihood_B
  return log_likelihood_B / jnp.maximum(length_B, 1.0)


def self_reward(lm: lm_lib.LanguageModel, params: Any, batch: lm_lib.Batch, *,
                normalize: bool = False, eos_id: int | None = None) -> jax.Array:
  """The self-reward r(x, y) = log π(y|x) of each response under `params` (the base model).

  Sums log π(y_t | x, y_<t) at temperature 1, float32, over the response tokens through the
  first EOS inclusive: prompt and padding never count, nor slots after the first EOS when
  `eos_id` is given, even if `response_mask` runs past it.

  Args:
    lm: the (base) language model.
    params: its parameters.
    batch: `prompt` [B, S], `prompt_mask` [B, S], `response` [B, T], `response_mask` [B, T].
    normalize: return the per-token mean instead of the sum (0 for an empty response).
    eos_id: end-of-sequence id; None trusts `response_mask`.

  Returns:
    [B] float32.
  """
  log_likelihood_B, length_B = sequence_log_prob(lm, params, batch, eos_id=eos_id)
  return _reward(log_likelihood_B, length_B, normalize)


# ----------------------------------------------------------------------------- best-of-N


@flax.struct.dataclass
class ScoredSamples:
  """N samples per prompt with their self-rewards; rows [B, N, ...].

  Attributes:
    tokens: [B, N, T] int32, `pad_id` after EOS.
    mask: [B, N, T] int32, 1 through the first EOS inclusive.
    score: [B, N] float32, the self-reward r (normalized when asked).
    log_likelihood: [B, N] float32, log π(y|x) (never normalized).
    length: [B, N] int32, tokens through EOS.
    truncated: [B, N] bool, True where no EOS came within `max_new_tokens`.
  """
  tokens: jax.Array
  mask: jax.Array
  score: jax.Array
  log_likelihood: jax.Array
  length: jax.Array
  truncated: jax.Array


@flax.struct.dataclass
class BestOfN:
  """The best-of-N response of each prompt, and what it was chosen from.

  Attributes:
    tokens: [B, T] int32, the selected response.
    mask: [B, T] int32.
    score: [B] float32, its self-reward.
    truncated: [B] bool, whether it hit `max_new_tokens` without EOS.
    index: [B] int32, which of the N samples it is.
    scores: [B, N] float32, the self-rewards of all samples.
    log_likelihoods: [B, N] float32, their log π_base(y|x).
    lengths: [B, N] int32, their lengths.
    all_truncated: [B, N] bool, their truncation flags.
  """
  tokens: jax.Array
  mask: jax.Array
  score: jax.Array
  truncated: jax.Array
  index: jax.Array
  scores: jax.Array
  log_likelihoods: jax.Array
  lengths: jax.Array
  all_truncated: jax.Array


def _concrete(value: Any) -> np.ndarray | None:
  return None if isinstance(value, jax.core.Tracer) else np.asarray(value)


def sampler_scores_exact(temperature: Any, top_k: Any, top_p: Any) -> bool | jax.Array:
  """Whether samples come from π_base itself (τ = 1, no top-k, no top-p).

  Then the sampler's per-token temperature-1 log-probs are the self-reward's terms and are
  reused; otherwise the responses are rescored teacher-forced. A Python bool when the knobs
  are concrete, else a traced bool.
  """
  t, k, p = _concrete(temperature), _concrete(top_k), _concrete(top_p)
  if t is not None and k is not None and p is not None:
    return bool(t == 1.0 and k == 0 and p >= 1.0)
  return ((jnp.asarray(temperature) == 1.0) & (jnp.asarray(top_k) == 0)
          & (jnp.asarray(top_p) >= 1.0))


def score_samples(lm: lm_lib.LanguageModel, params: Any, prompt: jax.Array,
                  prompt_mask: jax.Array, rng: jax.Array, *, n: int, max_new_tokens: int,
                  temperature: Any = 1.0, top_k: Any = 0, top_p: Any = 1.0, eos_id: int,
                  pad_id: int = 0, normalize: bool = False) -> ScoredSamples:
  """Draws N responses per prompt with ONE `sampling.sample` call and scores them.

  The prompt is prefilled once and its cache shared by its N samples. Scores come from the
  sampler's own temperature-1 log-probs when `sampler_scores_exact` (no second forward pass),
  otherwise from `self_reward` on the samples (with traced knobs, `lax.cond` picks at run time).

  Args:
    lm, params: the base model.
    prompt: [B, S] int32, left-padded; prompt_mask: [B, S].
    rng: sampling key.
    n, max_new_tokens, eos_id, pad_id: static, as in `sampling.sample`.
    temperature, top_k, top_p: sampling knobs (concrete or traced).
    normalize: length-normalized reward.

  Returns:
    `ScoredSamples` with [B, N, ...] rows.
  """
  out = sampling.sample(lm, params, prompt, prompt_mask, rng, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_k=top_k, top_p=top_p, num_samples=n,
                        eos_id=eos_id, pad_id=pad_id)
  length_R = out.length.astype(jnp.float32)

  def reuse():
    return (out.logprobs * out.mask).sum(axis=-1)

  def rescore():
    batch = {"prompt": out.prompt, "prompt_mask": out.prompt_mask, "response": out.tokens,
             "response_mask": out.mask}
    return sequence_log_prob(lm, params, batch, eos_id=eos_id)[0]

  exact = sampler_scores_exact(temperature, top_k, top_p)
  if isinstance(exact, bool):
    log_likelihood_R = reuse() if exact else rescore()
  else:
    log_likelihood_R = jax.lax.cond(exact, reuse, rescore)
  score_R = _reward(log_likelihood_R, length_R, normalize)
  b = prompt.shape[0]
  per_prompt = lambda x: x.reshape((b, n) + x.shape[1:])
  return ScoredSamples(tokens=per_prompt(out.tokens), mask=per_prompt(out.mask),
                       score=per_prompt(score_R), log_likelihood=per_prompt(log_likelihood_R),
                       length=per_prompt(out.length), truncated=per_prompt(out.truncated))


def select_best(score_BxN: jax.Array, truncated_BxN: jax.Array, *, drop_truncated: bool = False,
                valid_BxN: jax.Array | None = None) -> jax.Array:
  """Index of the best sample of each prompt; ties go to the FIRST (lowest index).

  Args:
    score_BxN: [B, N] rewards.
    truncated_BxN: [B, N] bool.
    drop_truncated: rank truncated samples below every complete one (a prompt whose samples
      are all truncated still gets its best truncated one).
    valid_BxN: [B, N] bool, samples that may be chosen (adaptive N); None = all. Each row needs
      at least one valid sample.

  Returns:
    [B] int32.
  """
  score_BxN = jnp.asarray(score_BxN, jnp.float32)
  eligible_BxN = (jnp.ones(score_BxN.shape, bool) if valid_BxN is None
                  else jnp.asarray(valid_BxN, bool))

  def first_argmax(allowed_BxN):
    # argmax returns the first maximal entry; -inf marks what may not be chosen.
    return jnp.argmax(jnp.where(allowed_BxN, score_BxN, -jnp.inf), axis=-1).astype(jnp.int32)

  best_B = first_argmax(eligible_BxN)
  if drop_truncated:
    complete_BxN = eligible_BxN & ~jnp.asarray(truncated_BxN, bool)
    best_B = jnp.where(complete_BxN.any(axis=-1), first_argmax(complete_BxN), best_B)
  return best_B


def _take(x_BxN: jax.Array, index_B: jax.Array) -> jax.Array:
  """x[b, index[b], ...] for every b."""
  index = index_B.reshape((-1,) + (1,) * (x_BxN.ndim - 1))
  return jnp.take_along_axis(x_BxN, index, axis=1)[:, 0]


def best_of_n(lm: lm_lib.LanguageModel, params: Any, prompt: jax.Array, prompt_mask: jax.Array,
              rng: jax.Array, *, n: int, max_new_tokens: int, temperature: Any = 1.0,
              top_k: Any = 0, top_p: Any = 1.0, eos_id: int, pad_id: int = 0,
              normalize: bool = False, drop_truncated: bool = False) -> BestOfN:
  """Inference-time sharpening: the argmax of the self-reward among N samples per prompt.

  Jittable with `n`, `max_new_tokens`, `eos_id`, `pad_id`, `normalize`, `drop_truncated`
  static. See `score_samples` (one sampler call, shared prefill, reuse of the sampler's
  log-probs) and `select_best` (first-wins ties, truncated ranked last when asked).

  Args:
    lm, params: the base model.
    prompt: [B, S] int32, left-padded; prompt_mask: [B, S].
    rng: sampling key.
    n: N >= 1.
    max_new_tokens: T.
    temperature, top_k, top_p: sampling knobs (spec default: 1, off, off).
    eos_id, pad_id: token ids.
    normalize: length-normalized reward.
    drop_truncated: rank truncated samples last.

  Returns:
    `BestOfN` ([B, T] selected response, [B, N] per-sample scores).
  """
  scored = score_samples(lm, params, prompt, prompt_mask, rng, n=n,
                         max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                         top_p=top_p, eos_id=eos_id, pad_id=pad_id, normalize=normalize)
  index_B = select_best(scored.score, scored.truncated, drop_truncated=drop_truncated)
  return BestOfN(tokens=_take(scored.tokens, index_B), mask=_take(scored.mask, index_B),
                 score=_take(scored.score, index_B), truncated=_take(scored.truncated, index_B),
                 index=index_B, scores=scored.score, log_likelihoods=scored.log_likelihood,
                 lengths=scored.length, all_truncated=scored.truncated)


# ----------------------------------------------------------------------------- adaptive N


def adaptive_log_threshold(k: float, delta: float) -> float:
  """log(μ / k), μ = ln(2/δ): the rule 1 / max_j π(y_j) <= k/μ is max_j log π(y_j) >= this."""
  check_adaptive(k, delta, 1)
  return math.log(math.log(2.0 / delta)) - math.log(k)


def adaptive_num_samples(log_likelihood_BxN: np.ndarray, *, k: float, delta: float, n_max: int
                         ) -> tuple[np.ndarray, np.ndarray]:
  """How many of the drawn samples each prompt uses under the adaptive-N stopping rule.

  Prompt b stops at the first sample j (1-based count N_b = j) after which
  1 / max_{i<=j} π_base(y_i|x) <= k / μ, μ = ln(2/δ); otherwise it uses every drawn sample,
  at most `n_max`. Checked sample by sample, so the result does not depend on the chunking.

  Args:
    log_likelihood_BxN: [B, N] log π_base(y|x) of the samples drawn so far, in draw order.
    k, delta, n_max: the rule's constants.

  Returns:
    (N_b [B] int, stopped [B] bool: the rule was met within the first min(N, n_max) samples).
  """
  check_adaptive(k, delta, n_max)
  log_likelihood_BxN = np.asarray(log_likelihood_BxN, np.float64)[:, :n_max]
  drawn = log_likelihood_BxN.shape[1]
  hit_BxN = log_likelihood_BxN >= adaptive_log_threshold(k, delta)
  stopped_B = hit_BxN.any(axis=1)
  first_hit_B = np.argmax(hit_BxN, axis=1) + 1
  return np.where(stopped_B, first_hit_B, drawn).astype(np.int64), stopped_B


@flax.struct.dataclass
class AdaptiveBestOfN:
  """The result of `adaptive_best_of_n` (NumPy arrays; N_drawn = samples drawn in all).

  Attributes:
    tokens, mask: [B, T] the selected response.
    score: [B] its self-reward; log_likelihood: [B] its log π_base(y|x).
    truncated: [B]; index: [B] its position in draw order.
    num_samples: [B] N_b, the samples prompt b used (<= n_max).
    stopped: [B] whether the stopping rule was met (False: stopped by the cap).
    scores, log_likelihoods, lengths, all_truncated: [B, N_drawn]; entries at j >= N_b were
      drawn for other prompts and are not part of prompt b's best-of-N.
  """
  tokens: np.ndarray
  mask: np.ndarray
  score: np.ndarray
  log_likelihood: np.ndarray
  truncated: np.ndarray
  index: np.ndarray
  num_samples: np.ndarray
  stopped: np.ndarray
  scores: np.ndarray
  log_likelihoods: np.ndarray
  lengths: np.ndarray
  all_truncated: np.ndarray


def adaptive_best_of_n(draw: Callable[[int], ScoredSamples], *, k: float, delta: float,
                       n_max: int, drop_truncated: bool = False) -> AdaptiveBestOfN:
  """Best-of-N with a per-prompt N: keep drawing chunks until every prompt met the rule.

  A host-side loop: `draw(chunk_index)` returns the next chunk of C samples per prompt (e.g.
  `score_samples` with rng = fold_in(key, chunk_index)). After each chunk, `adaptive_num_samples`
  decides each prompt's N_b; drawing stops when every prompt has stopped or n_max samples were
  drawn (a last chunk is cut to the cap). Prompt b then gets the best (`select_best`) of its
  first N_b samples.

  Args:
    draw: chunk index -> `ScoredSamples` [B, C, ...] (C may vary between chunks).
    k, delta, n_max: the stopping rule (see `adaptive_num_samples`).
    drop_truncated: rank truncated samples last.

  Returns:
    `AdaptiveBestOfN`.
  """
  check_adaptive(k, delta, n_max)
  chunks: list[ScoredSamples] = []
  drawn = 0
  while drawn < n_max:
    chunk = jax.tree.map(np.asarray, draw(len(chunks)))
    keep = min(chunk.score.shape[1], n_max - drawn)
    if keep < 1:
      raise ValueError(f"draw({len(chunks)}) returned {chunk.score.shape[1]} samples per prompt; "
                       "each chunk needs at least 1.")
    chunks.append(jax.tree.map(lambda x: x[:, :keep], chunk))
    drawn += keep
    log_likelihood_BxN = np.concatenate([c.log_likelihood for c in chunks], axis=1)
    num_samples_B, stopped_B = adaptive_num_samples(log_likelihood_BxN, k=k, delta=delta,
                                                    n_max=n_max)
    if stopped_B.all():
      break
  samples = jax.tree.map(lambda *xs: np.concatenate(xs, axis=1), *chunks)
  valid_BxN = np.arange(drawn)[None, :] < num_samples_B[:, None]
  index_B = np.asarray(select_best(samples.score, samples.truncated,
                                   drop_truncated=drop_truncated, valid_BxN=valid_BxN))
  take = lambda x: np.take_along_axis(x, index_B.reshape((-1,) + (1,) * (x.ndim - 1)),
                                      axis=1)[:, 0]
  return AdaptiveBestOfN(
      tokens=take(samples.tokens), mask=take(samples.mask), score=take(samples.score),
      log_likelihood=take(samples.log_likelihood), truncated=take(samples.truncated),
      index=index_B, num_samples=num_samples_B, stopped=stopped_B, scores=samples.score,
      log_likelihoods=samples.log_likelihood, lengths=samples.length,
      all_truncated=samples.truncated)


# ----------------------------------------------------------------------------- losses


def pair_residual(policy_log_prob: jax.Array, policy_log_prob_prime: jax.Array,
                  base_log_prob: jax.Array, base_log_prob_prime: jax.Array,
                  reward: jax.Array, reward_prime: jax.Array, beta: float) -> jax.Array:
  """The RLHF-Sharpening regression residual of each pair (y, y'); the loss is its square.

    β·log[π(y)/π_base(y)] − β·log[π(y')/π_base(y')] − (r(y) − r(y'))

  Zero for every pair exactly when β·log π(y) − β·log π_base(y) − r(y) is the same for all
  y; with r = log π_base that is π ∝ π_base^(1 + 1/β).

  Args: all [P] float32 (sequence log-probs and rewards); beta: β > 0.

  Returns:
    [P] float32.
  """
  return (beta * (policy_log_prob - base_log_prob)
          - beta * (policy_log_prob_prime - base_log_prob_prime)
          - (reward - reward_prime))


def make_loss_fn(lm: lm_lib.LanguageModel, objective_cfg: ml_collections.ConfigDict, *,
                 base_lm: lm_lib.LanguageModel | None = None, eos_id: int | None = None
                 ) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
  """Builds the sharpening `loss_fn(params, frozen, batch, rng, step) -> (loss, metrics)`.

  Mode "sft": the masked NLL of `batch["response"]` (`sft.masked_nll` with
  `cfg.normalization`); `frozen` is unused. Metrics: those of `sft.masked_nll`.

  Modes "rlhf" and "xpo" read pair batches (`response` = y, `response_prime` = y'/ỹ, same
  prompt) and need `frozen = {"base": base_params}`. With log π and log π_base the sequence
  log-probs through the first EOS (`sequence_log_prob`; the policy with dropout from `rng`,
  the base without dropout under stop-gradient) and r = log π_base (per-token mean when
  `cfg.normalize`), over the B pairs of the batch:

    rlhf:  loss = mean_b residual_b²                                   (`pair_residual`)
    xpo:   loss = mean_b residual_b² + α · mean_b log π(ỹ_b|x_b)

  Sign convention of XPO: the optimism term α·log π(ỹ|x) is ADDED to the minimized loss (as
  the spec says), so gradient descent lowers the policy's likelihood of the base model's own
  samples ỹ, pushing mass toward responses the base rarely produces (exploration); α = 0 is
  the plain squared loss on (y ~ π, ỹ ~ π_base). In "xpo", y comes from the current policy and
  ỹ from the base; in "rlhf" both from the base (the loss does not check, the preparer draws
  them).

  Metrics: "loss", "squared_loss", "residual_abs" (mean |residual|), "reward" / "reward_prime"
  (mean r of y and y'), "policy_log_prob" / "policy_log_prob_prime", "response_length",
  and for xpo "optimism" (mean log π(ỹ|x)).

  Args:
    lm: the policy being trained.
    objective_cfg: see `default_objective_config`.
    base_lm: the frozen base model (modes rlhf and xpo); its head must be as wide as `lm`'s.
    eos_id: end-of-sequence id; slots after the first EOS never count. None trusts the masks.

  Returns:
    The pure loss function.
  """
  validate(objective_cfg)
  cfg = objective_cfg
  if cfg.mode == "sft":
    sft_cfg = sft.default_objective_config()
    sft_cfg.update(normalization=cfg.normalization, vocab_chunk_size=cfg.vocab_chunk_size)
    return sft.make_loss_fn(lm, sft_cfg)
  if base_lm is None:
    raise ValueError(f"Sharpening mode {cfg.mode!r} needs the frozen base model; pass "
                     "base_lm=... to make_loss_fn.")
  if base_lm.vocab_size != lm.vocab_size:
    raise ValueError(f"The base model's vocabulary width {base_lm.vocab_size} differs from the "
                     f"policy's {lm.vocab_size}; both must score the same token ids.")
  beta, alpha = float(cfg.beta), float(cfg.xpo_alpha)
  xpo, normalize = cfg.mode == "xpo", bool(cfg.normalize)

  def loss_fn(params: Any, frozen: Any, batch: lm_lib.Batch, rng: jax.Array,
              step: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    del step
    if not isinstance(frozen, dict) or "base" not in frozen:
      raise ValueError("Sharpening's pair loss needs frozen={'base': base_params}; got "
                       f"{sorted(frozen) if isinstance(frozen, dict) else type(frozen).__name__}.")
    missing = [key for key in PAIR_KEYS if key not in batch]
    if missing:
      raise ValueError(f"Sharpening mode {cfg.mode!r} reads pair batches but the batch lacks "
                       f"{missing}; prepare each step with make_preparer.")
    # One forward pass per model over both members of every pair: rows [0, B) are y, [B, 2B) y'.
    pairs = {"prompt": jnp.concatenate([batch["prompt"]] * 2),
             "prompt_mask": jnp.concatenate([batch["prompt_mask"]] * 2),
             "response": jnp.concatenate([batch["response"], batch["response_prime"]]),
             "response_mask": jnp.concatenate([batch["response_mask"],
                                               batch["response_prime_mask"]])}
    policy_2B, length_2B = sequence_log_prob(lm, params, pairs, eos_id=eos_id, dropout_rng=rng)
    base_2B, _ = sequence_log_prob(base_lm, jax.lax.stop_gradient(frozen["base"]), pairs,
                                   eos_id=eos_id)
    base_2B = jax.lax.stop_gradient(base_2B)
    reward_2B = _reward(base_2B, length_2B, normalize)
    b = batch["prompt"].shape[0]
    y, y_prime = slice(0, b), slice(b, 2 * b)
    residual_B = pair_residual(policy_2B[y], policy_2B[y_prime], base_2B[y], base_2B[y_prime],
                               reward_2B[y], reward_2B[y_prime], beta)
    squared_loss = jnp.mean(residual_B**2)
    loss = squared_loss
    metrics = {"squared_loss": squared_loss, "residual_abs": jnp.abs(residual_B).mean(),
               "reward": reward_2B[y].mean(), "reward_prime": reward_2B[y_prime].mean(),
               "policy_log_prob": policy_2B[y].mean(),
               "policy_log_prob_prime": policy_2B[y_prime].mean(),
               "response_length": length_2B.mean()}
    if xpo:
      optimism = policy_2B[y_prime].mean()
      loss = loss + alpha * optimism
      metrics["optimism"] = optimism
    metrics["loss"] = loss
    return loss, jax.tree.map(lambda x: jax.lax.stop_gradient(x).astype(jnp.float32), metrics)

  return loss_fn


# ----------------------------------------------------------------------------- per-step samples


def _pad_to(x_BxL: jax.Array, width: int, value: int) -> jax.Array:
  return jnp.pad(x_BxL, ((0, 0), (0, width - x_BxL.shape[1])), constant_values=value)


def prepare_batch(lm: lm_lib.LanguageModel, base_lm: lm_lib.LanguageModel,
                  cfg: ml_collections.ConfigDict, params: Any, base_params: Any,
                  batch: lm_lib.Batch, rng: jax.Array, *, eos_id: int, pad_id: int,
                  response_width: int) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """The batch one train step sees, with freshly drawn responses (pure; jit it).

    sft (online): `response` <- the best-of-N of the frozen base under the self-reward.
    rlhf:         `response`, `response_prime` <- two samples of the base per prompt.
    xpo:          `response` <- a sample of the current policy, `response_prime` <- of the base.

  Samples are right-padded to `response_width` (mask 0).

  Args:
    lm, base_lm: the policy and the frozen base model.
    cfg: the sharpening objective config.
    params, base_params: their parameters.
    batch: the task's batch (`prompt`, `prompt_mask`, `response`, `response_mask`).
    rng: this step's sampling key.
    eos_id, pad_id: token ids; response_width: T of the batch.

  Returns:
    (batch, metrics): metrics "sample_reward" (mean self-reward of the base's samples),
    "sample_length", "truncation_rate", and for sft "bon_reward" (of the selected ones).
  """
  max_new_tokens = response_width if cfg.max_new_tokens is None else int(cfg.max_new_tokens)
  if max_new_tokens > response_width:
    raise ValueError(f"Sharpening max_new_tokens={max_new_tokens} exceeds the batch's response "
                     f"width {response_width}; set it <= {response_width} (or None).")
  knobs = {"max_new_tokens": max_new_tokens, "temperature": float(cfg.temperature),
           "top_k": int(cfg.top_k), "top_p": float(cfg.top_p), "eos_id": eos_id,
           "pad_id": pad_id}
  prompt, prompt_mask = batch["prompt"], batch["prompt_mask"]
  out = dict(batch)
  mask_dtype = batch["response_mask"].dtype
  put = lambda key, tokens, mask: out.update({
      key: _pad_to(tokens, response_width, pad_id).astype(jnp.int32),
      key + "_mask": _pad_to(mask, response_width, 0).astype(mask_dtype)})
  if cfg.mode == "sft":
    best = best_of_n(base_lm, base_params, prompt, prompt_mask, rng, n=int(cfg.n),
                     normalize=bool(cfg.normalize), drop_truncated=bool(cfg.drop_truncated),
                     **knobs)
    put("response", best.tokens, best.mask)
    return out, {"bon_reward": best.score.mean(), "sample_reward": best.scores.mean(),
                 "sample_length": best.lengths.mean().astype(jnp.float32),
                 "truncation_rate": best.all_truncated.mean().astype(jnp.float32)}
  base_rng, policy_rng = jax.random.split(rng)
  num_base = 2 if cfg.mode == "rlhf" else 1
  base = score_samples(base_lm, base_params, prompt, prompt_mask, base_rng, n=num_base,
                       normalize=bool(cfg.normalize), **knobs)
  if cfg.mode == "rlhf":
    put("response", base.tokens[:, 0], base.mask[:, 0])
  else:
    policy = sampling.sample(lm, params, prompt, prompt_mask, policy_rng, num_samples=1,
                             **knobs)
    put("response", policy.tokens, policy.mask)
  put("response_prime", base.tokens[:, -1], base.mask[:, -1])
  return out, {"sample_reward": base.score.mean(),
               "sample_length": base.length.mean().astype(jnp.float32),
               "truncation_rate": base.truncated.mean().astype(jnp.float32)}


def make_preparer(lm: lm_lib.LanguageModel, objective_cfg: ml_collections.ConfigDict, *,
                  base_lm: lm_lib.LanguageModel, eos_id: int, pad_id: int, response_width: int,
                  seed: int, mesh: Any = None
                  ) -> Callable[[int, dict, Any, dict], tuple[dict, dict]]:
  """The trainer's per-step hook `prepare(step, batch, params, frozen) -> (batch, metrics)`.

  Compiles `prepare_batch` once. Step `step` samples with
  fold_in(fold_in(PRNGKey(seed), SAMPLE_STREAM), step): the same on every host and after a
  resume. `frozen["base"]` holds the base parameters. With a `mesh`, the returned batch is
  sharded over the batch axes like the task's batches (pair keys included) and the models'
  activation constraints are active.
  """
  validate(objective_cfg)
  cfg = objective_cfg
  sample_rng = jax.random.fold_in(jax.random.PRNGKey(seed), SAMPLE_STREAM)

  def run(params, base_params, batch, rng):
    return prepare_batch(lm, base_lm, cfg, params, base_params, batch, rng, eos_id=eos_id,
                         pad_id=pad_id, response_width=response_width)

  jitted_cache: dict[tuple[str, ...], Any] = {}

  def jitted_for(batch):
    keys = tuple(sorted(batch))
    if keys not in jitted_cache:
      if mesh is None:
        jitted_cache[keys] = jax.jit(run)
      else:
        out_keys = set(keys) | (set(PAIR_KEYS) if cfg.mode in ("rlhf", "xpo") else set())
        rows = {key: partitioning.batch_sharding(mesh, batch[key].ndim if key in batch else 2)
                for key in out_keys}
        jitted_cache[keys] = jax.jit(run, out_shardings=(rows, partitioning.replicated(mesh)))
    return jitted_cache[keys]

  def prepare(step: int, batch: dict, params: Any, frozen: dict) -> tuple[dict, dict]:
    rng = jax.random.fold_in(sample_rng, int(step))
    jitted = jitted_for(batch)
    if mesh is None:
      return jitted(params, frozen["base"], batch, rng)
    with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.flax_rules()):
      return jitted(params, frozen["base"], batch, rng)

  return prepare
