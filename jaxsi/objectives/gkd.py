"""GKD: generalized knowledge distillation, its baseline presets, and GKD + RL.

Spec: shared/spec/gkd.md (Agarwal et al., ICLR 2024). Per optimizer step:

  1. The host calls `response_source(cfg, run_rng, step)`: "dataset" keeps the batch's
     responses, "student" (probability λ) or "teacher" (SeqKD) replaces them by samples
     drawn with `sampling_settings(cfg, width)` (stop-gradient, same shapes and dtypes).
  2. With a reward configured (GKD + RL), the host scores the responses with
     `jaxsi.objectives.rewards` and puts them in `batch["reward"]` [B] float32.
  3. The jitted train step calls the `loss_fn` built by `make_loss_fn`: a divergence between
     the frozen teacher and the student, teacher-forced on the batch's responses.

The loss sees only the batch, never where its responses came from, so one compiled step
serves every source.

Presets (`cfg.preset`) reproduce the paper's baselines by overriding λ, the divergence and
the response source:

  | preset        | lam | divergence   | responses               |
  |---------------|-----|--------------|-------------------------|
  | sft           | 0   | nll          | dataset                 |
  | supervised_kd | 0   | forward_kl   | dataset                 |
  | seqkd         | 0   | nll          | teacher samples (always) |
  | imitkd        | 0.5 | forward_kl   | mixed                   |
  | fdistill      | 0.5 | tvd          | mixed                   |
  | on_policy     | 1   | (unchanged)  | student samples         |
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict

from jaxsi import config as config_lib
from jaxsi.models import lm as lm_lib
from jaxsi.objectives import chunked
from jaxsi.objectives import divergences
from jaxsi.objectives import rewards as rewards_lib
from jaxsi.objectives import sft

DIVERGENCES = divergences.NAMES + ("nll",)
SOURCES = ("dataset", "student", "teacher")

# name -> the config values it forces; "response" documents the table and is not a key.
_PRESETS: dict[str, dict[str, Any]] = {
    "": {},
    "sft": {"lam": 0.0, "divergence": "nll"},
    "supervised_kd": {"lam": 0.0, "divergence": "forward_kl"},
    "seqkd": {"lam": 0.0, "divergence": "nll"},
    "imitkd": {"lam": 0.5, "divergence": "forward_kl"},
    "fdistill": {"lam": 0.5, "divergence": "tvd"},
    "on_policy": {"lam": 1.0},
}
PRESETS = tuple(_PRESETS)


def default_objective_config() -> ml_collections.ConfigDict:
  """Returns the GKD objective config with its defaults.

  Keys:
    name: "gkd".
    preset: "" (custom: the keys below as given) or one of "sft", "supervised_kd", "seqkd",
      "imitkd", "fdistill", "on_policy" (see the module docstring; a preset overrides `lam`
      and `divergence` as its table row says).
    divergence: "forward_kl", "reverse_kl", "jsd", "tvd" or "nll" (NLL of the responses,
      which ignores the teacher).
    beta: the jsd interpolation weight β, strictly inside (0, 1).
    lam: λ in [0, 1], the probability that a step trains on student samples.
    loss_temperature: τ > 0; the divergence compares softmax(logits / τ).
    sample_temperature: γ >= 0 for student (and SeqKD teacher) samples; 0 is greedy.
    top_k: >= 0, sampling top-k (0 = off).
    top_p: in (0, 1], sampling nucleus (1 = off).
    normalization: "sequence" (mean over each response's tokens, then over responses; the
      paper's) or "token" (mean over all response tokens of the batch).
    reward: "" (no RL), a name of `jaxsi.objectives.rewards` ("exact_match", "rouge2",
      "rougeL") or "module:function". A non-empty reward turns GKD + RL on.
    rl_alpha: α in [0, 1] of GKD + RL, which maximizes E[(1 − α)·r] − α·E[D]: α = 1 is pure
      distillation, α = 0 pure REINFORCE. Used only when `reward` is set.
    max_new_tokens: sample length; None = the batch's response width.
    eos_id: end-of-sequence id for the EOS-rate metric; None = taken from the trainer
      (`make_loss_fn(..., eos_id=...)`).
    vocab_chunk_size: 0 (default) computes the student's and the teacher's full [B, T, V]
      logits; c > 0 applies both output heads to c response positions at a time and
      recomputes them in the backward pass (`jaxsi.objectives.chunked`): the same loss,
      gradients and metrics, while only the features [B, T, E] of each model stay alive
      instead of their logits. One knob covers both models because the divergence needs the
      two chunks together: a teacher's full logits would otherwise stay alive until the
      student's backward pass ends. Costs one more forward pass of each head per step.
  """
  cfg = ml_collections.ConfigDict()
  cfg.name = "gkd"
  cfg.preset = ""
  cfg.divergence = "jsd"
  cfg.beta = 0.5
  cfg.lam = 1.0
  cfg.loss_temperature = 1.0
  cfg.sample_temperature = 1.0
  cfg.top_k = 0
  cfg.top_p = 1.0
  cfg.normalization = "sequence"
  cfg.reward = ""
  cfg.rl_alpha = 0.5
  cfg.max_new_tokens = config_dict.placeholder(int)
  cfg.eos_id = config_dict.placeholder(int)
  cfg.vocab_chunk_size = 0
  return cfg


def apply_preset(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Returns a copy of `cfg` with its preset's table row applied (`cfg` is not modified).

  Idempotent; the copy keeps `preset`, which `response_source` reads for SeqKD.
  """
  preset = cfg.get("preset", "")
  if preset not in _PRESETS:
    raise ValueError(f"Unknown GKD preset {preset!r}; expected one of "
                     f"{', '.join(repr(p) for p in PRESETS)} ('' = custom).")
  out = copy.deepcopy(cfg)
  with out.unlocked():
    for key, value in _PRESETS[preset].items():
      out[key] = value
  return out


def _check_range(key: str, value: Any, low: float, high: float, *, low_open: bool = False,
                 high_open: bool = False) -> None:
  ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  if ok:
    ok = (value > low if low_open else value >= low) and (value < high if high_open else
                                                            value <= high)
  if not ok:
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    raise ValueError(f"GKD {key}={value!r} is out of range; expected a number in {interval}.")


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Raises a ValueError naming the first bad value of a GKD config (after its preset)."""
  config_lib.check_keys(cfg, default_objective_config(), owner="GKD",
                        start_from="jaxsi.objectives.gkd.default_objective_config")
  if cfg.name != "gkd":
    raise ValueError(f"GKD config has name={cfg.name!r}; expected 'gkd'.")
  if cfg.preset not in _PRESETS:
    raise ValueError(f"Unknown GKD preset {cfg.preset!r}; expected one of "
                     f"{', '.join(repr(p) for p in PRESETS)} ('' = custom).")
  if cfg.divergence not in DIVERGENCES:
    raise ValueError(f"Unknown GKD divergence {cfg.divergence!r}; expected one of "
                     f"{', '.join(DIVERGENCES)}.")
  divergences.check_beta(cfg.divergence, cfg.beta)
  _check_range("lam", cfg.lam, 0.0, 1.0)
  _check_range("loss_temperature", cfg.loss_temperature, 0.0, float("inf"), low_open=True,
               high_open=True)
  _check_range("sample_temperature", cfg.sample_temperature, 0.0, float("inf"), high_open=True)
  if not isinstance(cfg.top_k, int) or isinstance(cfg.top_k, bool) or cfg.top_k < 0:
    raise ValueError(f"GKD top_k={cfg.top_k!r} must be an integer >= 0 (0 = off).")
  _check_range("top_p", cfg.top_p, 0.0, 1.0, low_open=True)
  sft.check_normalization(cfg.normalization)
  if cfg.max_new_tokens is not None and (not isinstance(cfg.max_new_tokens, int)
                                         or cfg.max_new_tokens < 1):
    raise ValueError(f"GKD max_new_tokens={cfg.max_new_tokens!r} must be a positive integer "
                     "or None (= the response width).")
  if cfg.eos_id is not None and (not isinstance(cfg.eos_id, int) or cfg.eos_id < 0):
    raise ValueError(f"GKD eos_id={cfg.eos_id!r} must be a token id >= 0 or None.")
  chunked.check_chunk_size(cfg.vocab_chunk_size, "GKD")
  if not isinstance(cfg.reward, str):
    raise ValueError(f"GKD reward={cfg.reward!r} must be a string: '' (no RL), a reward name "
                     f"({', '.join(rewards_lib.names())}) or 'module:function'.")
  if cfg.reward:
    _check_range("rl_alpha", cfg.rl_alpha, 0.0, 1.0)
    if cfg.lam == 0.0 or cfg.preset == "seqkd":
      raise ValueError(f"GKD reward={cfg.reward!r} needs student samples, but lam={cfg.lam} "
                       f"with preset={cfg.preset!r} never draws any; set lam > 0 (e.g. 1).")
    if cfg.sample_temperature == 0.0:
      raise ValueError("GKD + RL needs sample_temperature > 0 (REINFORCE differentiates the "
                       "log-probability of the sampling distribution); got 0 (greedy).")
    rewards_lib.get_reward(cfg.reward)  # fails now, not at the first student step


def resolve(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`apply_preset` then `validate`: the config every function below works from."""
  resolved = apply_preset(cfg)
  validate(resolved)
  return resolved


def uses_rewards(cfg: ml_collections.ConfigDict) -> bool:
  """Whether the trainer must put `batch["reward"]` [B] float32 in every batch (GKD + RL)."""
  return bool(resolve(cfg).reward)


def response_source(cfg: ml_collections.ConfigDict, run_rng: jax.Array, step: int) -> str:
  """Where step `step`'s responses come from: "dataset", "student" or "teacher".

  The coin is u = jax.random.uniform(jax.random.fold_in(run_rng, step), (), jnp.float32),
  u in [0, 1): a pure function of (run_rng, step), so every host draws the same u and a
  resumed run draws what an uninterrupted one would. "student" iff lam > 0 and u <= lam
  (lam = 0 never samples, lam = 1 always does); the SeqKD preset always answers "teacher".
  Give this function a key of its own (e.g. `fold_in(base_key, STREAM)`), not one the
  train step also folds the step into, so the coin is independent of dropout and sampling.

  Args:
    cfg: the GKD objective config.
    run_rng: a PRNG key (raw uint32[2] or typed), the same for the whole run.
    step: the optimizer step (the train state's step before the update).
  """
  cfg = resolve(cfg)
  if cfg.preset == "seqkd":
    return "teacher"
  if cfg.lam <= 0.0:
    return "dataset"
  u = float(jax.random.uniform(jax.random.fold_in(run_rng, int(step)), (), jnp.float32))
  return "student" if u <= cfg.lam else "dataset"


def sampling_settings(cfg: ml_collections.ConfigDict, response_width: int) -> dict[str, Any]:
  """Keyword arguments for `jaxsi.sampling.sample` (student or SeqKD teacher samples).

  Args:
    cfg: the GKD objective config.
    response_width: T of the batch's `response` [B, T]; samples replace it, so they must not
      be longer (shorter samples are right-padded to T with mask 0).

  Returns:
    {"max_new_tokens", "temperature", "top_k", "top_p"}.
  """
  cfg = resolve(cfg)
  max_new_tokens = response_width if cfg.max_new_tokens is None else cfg.max_new_tokens
  if max_new_tokens > response_width:
    raise ValueError(f"GKD max_new_tokens={max_new_tokens} exceeds the batch's response width "
                     f"{response_width}; samples replace the responses, so set max_new_tokens "
                     f"<= {response_width} (or None).")
  return {"max_new_tokens": int(max_new_tokens), "temperature": float(cfg.sample_temperature),
          "top_k": int(cfg.top_k), "top_p": float(cfg.top_p)}


def _real_vocab(*lms: lm_lib.LanguageModel) -> int | None:
  """The smallest `num_real_tokens` of the models (None when no head is padded)."""
  sizes = []
  for model in lms:
    config = getattr(model, "config", None)
    value = config.get("num_real_tokens", None) if hasattr(config, "get") else None
    if value is not None and value < model.vocab_size:
      sizes.append(int(value))
  return min(sizes) if sizes else None


def _clean_logits(logits_BxTxV: jax.Array, valid_BxT: jax.Array,
                  num_real: int | None) -> jax.Array:
  """Float32 logits with masked positions zeroed and padded head rows at -inf.

  Zeroing keeps whatever the model computes at masked positions (even inf/NaN) out of the
  value and the gradient; padded head rows are never sampled, so they take no probability.
  """
  logits_BxTxV = jnp.where(valid_BxT[..., None], logits_BxTxV.astype(jnp.float32), 0.0)
  if num_real is not None:
    logits_BxTxV = jnp.where(jnp.arange(logits_BxTxV.shape[-1]) < num_real, logits_BxTxV,
                             -jnp.inf)
  return logits_BxTxV


def _log_softmax(logits_BxTxV: jax.Array, temperature: float) -> jax.Array:
  log_p_BxTxV = jax.nn.log_softmax(logits_BxTxV / temperature, axis=-1)
  # -inf (padded rows) becomes the most negative finite value: p = 0 and 0 * log p = 0.
  return jnp.maximum(log_p_BxTxV, jnp.finfo(log_p_BxTxV.dtype).min)


def _token_log_prob(log_p_BxTxV: jax.Array, tokens_BxT: jax.Array) -> jax.Array:
  return jnp.take_along_axis(log_p_BxTxV, tokens_BxT[..., None], axis=-1)[..., 0]


def make_loss_fn(lm: lm_lib.LanguageModel, objective_cfg: ml_collections.ConfigDict, *,
                 teacher_lm: lm_lib.LanguageModel, eos_id: int | None = None
                 ) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
  """Builds the GKD `loss_fn(params, frozen, batch, rng, step) -> (loss, metrics)`.

  Called by the objective registry as `make_loss_fn(lm, cfg, teacher_lm=..., eos_id=...)`.

  The loss, with m = response_mask, y = response, T = softmax(teacher / τ) and
  S = softmax(student / τ) at each response slot (teacher-forced on y):

    d[b, t] = D(T[b, t] || S[b, t]) * m[b, t]   (for nll: −log S[b, t](y[b, t]) * m[b, t])
    D       = mean_b (Σ_t d[b, t] / Σ_t m[b, t])   ("sequence", rows without tokens skipped)
            or Σ_{b,t} d[b, t] / Σ_{b,t} m[b, t]   ("token")
    loss    = D                                     without a reward

  GKD + RL (a reward is configured; `batch["reward"]` r [B] float32): with
  log S_γ(y_b) = Σ_t m[b, t] · log softmax(student[b, t] / γ)(y[b, t]) (γ = sample temperature,
  the distribution the responses were drawn from; top-k/top-p are not applied) and the
  per-batch mean baseline A_b = r_b − mean_b' r_b' (stop-gradient),

    loss = α·D − (1 − α) · mean_b [A_b · log S_γ(y_b)].

  Minimizing it follows −α∇D + (1 − α)·E[A ∇log S] = ∇ of E[(1 − α)·r] − α·E[D] (REINFORCE),
  i.e. it ascends the spec's objective. The RL part sums log-probs over a response's tokens
  and averages over all B rows. Rewards equal across the batch give A = 0: the RL term and
  its gradient vanish, so on steps whose responses are not student samples the trainer puts
  zeros in `batch["reward"]` and the same compiled step does plain distillation (scaled by α).

  The teacher runs without dropout on `frozen["teacher"]` under `stop_gradient`; the student
  runs with dropout driven by `rng`. `step` is unused. JAX never differentiates the teacher,
  so none of its activations are kept for the backward pass: only its logits are (they enter
  the divergence's gradient), and with `vocab_chunk_size` > 0 not even those: both heads run
  on chunks of positions (`chunked.map_token_chunks`) from the features [B, T, E] of
  `lm.hidden` and `teacher_lm.hidden`, giving the same values up to float32 rounding.

  Metrics (float32 scalars, stop-gradient): "loss"; "divergence" (D); "student_entropy"
  (entropy of softmax(student), per-token mean); "teacher_nll" and "student_nll" (token-mean
  NLL of the responses at temperature 1); "response_length" (mean Σ_t m per row); "eos_rate"
  (fraction of rows whose unmasked response contains `eos_id`); "num_tokens"; with a reward
  also "reward" (mean r) and "rl_loss" (the RL term).

  Args:
    lm: the student model.
    objective_cfg: see `default_objective_config`.
    teacher_lm: the teacher model; its head must be as wide as the student's.
    eos_id: end-of-sequence id; overrides `objective_cfg.eos_id`. One of them must be set.

  Returns:
    The pure loss function.
  """
  cfg = resolve(objective_cfg)
  if teacher_lm is None:
    raise ValueError("GKD needs a teacher model; pass teacher_lm=... to make_loss_fn.")
  if lm.vocab_size != teacher_lm.vocab_size:
    raise ValueError(
        f"The teacher's vocabulary width {teacher_lm.vocab_size} differs from the student's "
        f"{lm.vocab_size}; GKD compares full next-token distributions, so both heads must have "
        f"the same width (keep both at the head width).")
  eos_id = cfg.eos_id if eos_id is None else eos_id
  if eos_id is None or not isinstance(eos_id, int) or eos_id < 0:
    raise ValueError(f"GKD needs the end-of-sequence id (got {eos_id!r}); pass eos_id=... to "
                     "make_loss_fn or set objective.eos_id to a token id >= 0.")
  chunk_size = cfg.vocab_chunk_size
  if chunk_size:
    chunked.check_exposes_head(lm, "GKD", chunk_size)
    chunked.check_exposes_head(teacher_lm, "GKD", chunk_size)
  name, beta, tau = cfg.divergence, float(cfg.beta), float(cfg.loss_temperature)
  normalization = cfg.normalization
  reward_on, alpha = bool(cfg.reward), float(cfg.rl_alpha)
  gamma = float(cfg.sample_temperature)
  num_real = _real_vocab(lm, teacher_lm)
  vocab = lm.vocab_size

  def token_terms(student_BxTxV: jax.Array, teacher_BxTxV: jax.Array, tokens_BxT: jax.Array,
                  valid_BxT: jax.Array) -> dict[str, jax.Array]:
    """Per-token values [B, T] float32 from both models' logits [B, T, V], 0 where masked.

    "value": d[b, t] above; "sample_log_prob": log S_γ(y[b, t]) (with a reward only);
    "entropy", "teacher_nll", "student_nll": the metrics' terms (stop-gradient). Positions
    are independent, so this runs on all positions or on a chunk [B, c, V] of them alike.
    """
    mask_BxT = valid_BxT.astype(jnp.float32)
    teacher_BxTxV = jax.lax.stop_gradient(_clean_logits(teacher_BxTxV, valid_BxT, num_real))
    student_BxTxV = _clean_logits(student_BxTxV, valid_BxT, num_real)
    if name == "nll":
      value_BxT = -_token_log_prob(_log_softmax(student_BxTxV, tau), tokens_BxT)
    else:
      value_BxT = divergences.divergence(name, teacher_BxTxV, student_BxTxV, beta=beta,
                                         temperature=tau)
    terms = {"value": value_BxT * mask_BxT}
    if reward_on:
      terms["sample_log_prob"] = (
          _token_log_prob(_log_softmax(student_BxTxV, gamma), tokens_BxT) * mask_BxT)
    student_log_p_BxTxV = _log_softmax(jax.lax.stop_gradient(student_BxTxV), 1.0)
    teacher_log_p_BxTxV = _log_softmax(teacher_BxTxV, 1.0)
    entropy_BxT = -jnp.sum(jnp.exp(student_log_p_BxTxV) * student_log_p_BxTxV, axis=-1)
    terms.update(
        entropy=entropy_BxT * mask_BxT,
        teacher_nll=-_token_log_prob(teacher_log_p_BxTxV, tokens_BxT) * mask_BxT,
        student_nll=-_token_log_prob(student_log_p_BxTxV, tokens_BxT) * mask_BxT)
    return terms

  def chunk_terms(params_pair: tuple[Any, Any], chunk: dict[str, jax.Array]
                  ) -> dict[str, jax.Array]:
    """`token_terms` of one chunk of positions, from both models' features [B, c, E]."""
    student_params, teacher_params = params_pair
    return token_terms(lm.head(student_params, chunk["student"]),
                       teacher_lm.head(teacher_params, chunk["teacher"]), chunk["tokens"],
                       chunk["valid"])

  def loss_fn(params: Any, frozen: Any, batch: lm_lib.Batch, rng: jax.Array,
              step: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    del step
    if not isinstance(frozen, dict) or "teacher" not in frozen:
      raise ValueError("GKD's loss needs frozen={'teacher': teacher_params}; got "
                       f"{sorted(frozen) if isinstance(frozen, dict) else type(frozen).__name__}.")
    if reward_on and "reward" not in batch:
      raise ValueError(f"GKD + RL (reward={cfg.reward!r}) needs batch['reward'] [B] float32 in "
                       f"every batch (zeros when the responses are not student samples); the "
                       f"batch has {sorted(batch)}.")
    valid_BxT = batch["response_mask"].astype(bool)
    mask_BxT = valid_BxT.astype(jnp.float32)
    # Out-of-range ids at masked positions (padding) must not index out of the head.
    tokens_BxT = jnp.where(valid_BxT, jnp.clip(batch["response"], 0, vocab - 1), 0)

    teacher_params = jax.lax.stop_gradient(frozen["teacher"])
    if chunk_size:
      per_token = chunked.map_token_chunks(
          chunk_terms, (params, teacher_params),
          {"student": lm.hidden(params, batch, dropout_rng=rng),
           "teacher": jax.lax.stop_gradient(teacher_lm.hidden(teacher_params, batch)),
           "tokens": tokens_BxT, "valid": valid_BxT},
          chunk_size)
    else:
      per_token = token_terms(lm.logits(params, batch, dropout_rng=rng),
                              teacher_lm.logits(teacher_params, batch), tokens_BxT, valid_BxT)

    divergence = sft.normalize(per_token["value"], mask_BxT, normalization)
    loss = divergence

    metrics = {"divergence": divergence}
    if reward_on:
      reward_B = batch["reward"].astype(jnp.float32)
      advantage_B = jax.lax.stop_gradient(reward_B - reward_B.mean())
      sample_log_prob_B = per_token["sample_log_prob"].sum(axis=-1)
      rl_loss = -(1.0 - alpha) * jnp.mean(advantage_B * sample_log_prob_B)
      loss = alpha * divergence + rl_loss
      metrics.update(reward=reward_B.mean(), rl_loss=rl_loss)

    num_tokens = mask_BxT.sum()

    def per_token_mean(x_BxT):
      return x_BxT.sum() / jnp.maximum(num_tokens, 1.0)

    has_eos_B = jnp.any(valid_BxT & (batch["response"] == eos_id), axis=-1)
    metrics.update(
        loss=loss,
        student_entropy=per_token_mean(per_token["entropy"]),
        teacher_nll=per_token_mean(per_token["teacher_nll"]),
        student_nll=per_token_mean(per_token["student_nll"]),
        response_length=mask_BxT.sum(axis=-1).mean(),
        eos_rate=has_eos_B.astype(jnp.float32).mean(),
        num_tokens=num_tokens,
    )
    return loss, jax.tree.map(lambda x: jax.lax.stop_gradient(x).astype(jnp.float32), metrics)

  return loss_fn
