"""SequenceMatch: occupancy-measure imitation learning with a backspace action.

Spec: shared/spec/sequencematch.md (Cundy & Ermon, ICLR 2024). The model's logits are a Q
function over actions = tokens ∪ {<bksp>} (one extra vocabulary row, see
`jaxsi.models.vocab.grow_vocab`); V(s) = logsumexp_a Q(s, a) and the implicit reward of a
transition is r = Q(s, a) − γ·V(s').

One forward pass per batch. `preprocess_actions` turns a row of L raw actions a_0 .. a_{n-1}
(n <= L real ones, then padding) into T = L + 1 response slots for `LanguageModel.logits`:

  slot j < n    input id, position and visibility of action j (a stack walk, see below);
                targets[j] = a_j (the raw action, possibly <bksp>).
  slot n .. L   padding; slot n is the extra trailing slot whose logits give V(s_n).

With the `jaxsi.models.lm` contract (logits[:, t] comes from the slots visible at t − 1), and
s_j the state after actions a_0 .. a_{j-1} (s_0 = the prompt alone):

  logits[:, j] = Q(s_j, ·)      for j = 0 .. n (j = n: the state after the last action)
  Q(s_j, a_j)  = logits[:, j, a_j]
  V(s_j)       = logsumexp(logits[:, j])
  V(s_{j+1})   = logsumexp(logits[:, j + 1])   (j = n − 1 reads the trailing slot n)

so every term of the loss comes from one `lm.logits` call on width L + 1.

Stack walk (the prompt is always visible; `stack` holds the visible response slots):

  token a at slot j:  input[j] = a, position[j] = len(stack), push j.
  <bksp> at slot j:   pop the last slot (if any); if the stack is still non-empty with top t:
                      input[j] = input[t], position[j] = position[t] (= len(stack) − 1) and j
                      replaces t on the stack (a fresh copy of t that sees what t saw, not t).
                      If the stack is empty (the state is the prompt alone; also a backspace at
                      the prompt boundary, which pops nothing): input[j] = the boundary token,
                      position[j] = −1 and the stack stays empty, so slot j attends to the prompt
                      only, not even to itself.
  visibility[j] = the stack after the update (padding slots see only themselves).

The boundary token stands for the token just before the response: the last prompt token for
decoders (position −1 lands on its absolute position prompt_length − 1 and slot j sees exactly
the prompt it saw), the decoder start token for T5 (decoder position −1 + 1 = 0, seeing only the
start token). In both cases slot j's output equals the output at the end of the prompt, i.e. the
logits of the state "prompt alone". `boundary_tokens(lm, prompt)` gives it; the loss function
writes it into every position −1 slot itself, so batches may carry any id there.

Loss (minimized), with transitions weighted per row (∝ γ^t or uniform, normalized per row),
E_data / E_model the means over data / model-sample rows and E_mix = ½·E_data + ½·E_model
(= E_data when the batch has no model rows, and vice versa):

  L_SM = − E_data[r] + E_mix[V(s) − γ·V(s')] + c·E_mix[r²]

Terminal (the last action of a row that is not `truncated`, normally EOS):

  "zero":      V(s_n) = 0.
  "absorbing": s_n is absorbing, and the EOS slot repeats forever: every later state has the
               logits of slot n, the expert's action there is EOS again (a_{n-1}). With
               ℓ = logits[n, a_{n-1}], V_abs = logsumexp(logits[n]), each absorbing transition
               has r = ℓ − γ·V_abs and V(s) − γ·V(s') = (1 − γ)·V_abs; they have weights γ^k for
               k = n, n + 1, ..., so together they enter every expectation as one extra term of
               weight γ^n / (1 − γ) (the row's weights then sum to exactly 1 / (1 − γ)). The last
               real transition bootstraps V(s_n) = V_abs. Needs weighting="discounted" and γ < 1
               (a uniform weight on infinitely many transitions diverges).

Truncation (`truncated` rows hit the length cap without terminating): V(s_n) = logsumexp of
the trailing slot n (bootstrapped from the logits), in both terminal modes.

BC is the same-weighted NLL E_data[V(s) − Q(s, a)] of the (augmented) data actions; with c = 0,
no model rows and terminal="zero", L_SM equals it exactly. Training minimizes
β·L_BC + (1 − β)·L_SM with β = `sm_weight(step)`.

Noise augmentation (`augment_with_noise`) inserts (noise token, <bksp>) pairs into data rows;
the slot predicting the noise token gets loss_mask 0 (an environment perturbation, not an expert
action: it is left out of E_data, of the data half of E_mix and of BC), the <bksp> after it is an
ordinary data transition.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict

from jaxsi import config as config_lib
from jaxsi.models import lm as lm_lib
from jaxsi.models import vocab as vocab_lib

WEIGHTINGS = ("discounted", "uniform")
TERMINALS = ("zero", "absorbing")
NOISES = ("random", "task")

# ----------------------------------------------------------------------------------------------
# Config.


def default_objective_config() -> ml_collections.ConfigDict:
  """Returns the SequenceMatch objective config with its defaults.

  Keys:
    name: "sequencematch".
    gamma: discount γ in (0, 1] (paper: 0.998 (?)); < 1 with terminal="absorbing".
    chi2_coef: χ² coefficient c >= 0 of c·E_mix[r²] (paper α = 0.01 (?)).
    weighting: "discounted" (weights ∝ γ^t within a row) or "uniform".
    terminal: "zero" (V = 0 after EOS) or "absorbing" (closed form of repeating the EOS slot).
    noise_prob: probability in [0, 1) of inserting a (noise, <bksp>) pair before each data
      action (0 = no augmentation; set it > 0 to teach <bksp> from the data).
    noise: "random" (noise uniform over the vocabulary) or "task" (a task's wrong token; the
      trainer must pass `task_noise_fn` to `augment_with_noise`).
    bc_steps: k, the number of pure BC steps before annealing starts (paper: 1,000 text,
      10,000 arithmetic).
    anneal_steps: steps over which β goes linearly from 1 to `beta_end` (paper: 2,000).
    beta_end: final β of L = β·L_BC + (1 − β)·L_SM (paper: 0.2).
    backspace_id: the <bksp> id; None = the last real token id of the grown model
      (`vocab.real_vocab_size(lm) - 1`, which is vocab_size − 1 when the head is not padded).
    backspace_init: "mean" or "zeros", the initialization of the new <bksp> row (`grow_vocab`).
    eos_id: end-of-sequence id (never drawn as noise); None = taken from the trainer.
    sample_every: refresh the replay buffer with model samples every this many steps.
    buffer_size: FIFO replay buffer capacity, in action sequences.
    max_new_tokens: token budget of a sample; None = the data's response width.
    max_actions: action-sequence width L of every training row (data rows after augmentation
      are truncated to it; samples are capped at it); None = 2 × max_new_tokens.
    sample_temperature: temperature of model samples (paper: 1).
    top_k: sampling top-k (0 = off).
    top_p: sampling nucleus in (0, 1] (paper: 1 = off).
  """
  cfg = ml_collections.ConfigDict()
  cfg.name = "sequencematch"
  cfg.gamma = 0.998
  cfg.chi2_coef = 0.01
  cfg.weighting = "discounted"
  cfg.terminal = "zero"
  cfg.noise_prob = 0.0
  cfg.noise = "random"
  cfg.bc_steps = 1000
  cfg.anneal_steps = 2000
  cfg.beta_end = 0.2
  cfg.backspace_id = config_dict.placeholder(int)
  cfg.backspace_init = "mean"
  cfg.eos_id = config_dict.placeholder(int)
  cfg.sample_every = 100
  cfg.buffer_size = 1024
  cfg.max_new_tokens = config_dict.placeholder(int)
  cfg.max_actions = config_dict.placeholder(int)
  cfg.sample_temperature = 1.0
  cfg.top_k = 0
  cfg.top_p = 1.0
  return cfg


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _check_range(key: str, value: Any, low: float, high: float, *, low_open: bool = False,
                 high_open: bool = False) -> None:
  ok = _is_number(value) and (value > low if low_open else value >= low) and (
      value < high if high_open else value <= high)
  if not ok:
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    raise ValueError(f"SequenceMatch {key}={value!r} is out of range; expected a number in "
                     f"{interval}.")


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f"Unknown SequenceMatch {key} {value!r}; expected one of "
                     f"{', '.join(choices)}.")


def _check_weighting(weighting: str, terminal: str, gamma: float) -> None:
  _check_choice("weighting", weighting, WEIGHTINGS)
  _check_choice("terminal", terminal, TERMINALS)
  _check_range("gamma", gamma, 0.0, 1.0, low_open=True)
  if terminal == "absorbing" and (weighting != "discounted" or gamma >= 1.0):
    raise ValueError(f"SequenceMatch terminal='absorbing' sums infinitely many absorbing "
                     f"transitions, which only weighting='discounted' with gamma < 1 keeps "
                     f"finite; got weighting={weighting!r}, gamma={gamma}.")


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Raises a ValueError naming the first bad value of a SequenceMatch config."""
  config_lib.check_keys(cfg, default_objective_config(), owner="SequenceMatch",
                        start_from="jaxsi.objectives.sequencematch.default_objective_config")
  if cfg.name != "sequencematch":
    raise ValueError(f"SequenceMatch config has name={cfg.name!r}; expected 'sequencematch'.")
  _check_weighting(cfg.weighting, cfg.terminal, cfg.gamma)
  _check_range("chi2_coef", cfg.chi2_coef, 0.0, float("inf"), high_open=True)
  _check_range("noise_prob", cfg.noise_prob, 0.0, 1.0, high_open=True)
  _check_choice("noise", cfg.noise, NOISES)
  _check_range("beta_end", cfg.beta_end, 0.0, 1.0)
  _check_choice("backspace_init", cfg.backspace_init, vocab_lib.INITS)
  for key in ("bc_steps", "anneal_steps", "top_k"):
    if not _is_int(cfg[key]) or cfg[key] < 0:
      raise ValueError(f"SequenceMatch {key}={cfg[key]!r} must be an integer >= 0.")
  for key in ("sample_every", "buffer_size"):
    if not _is_int(cfg[key]) or cfg[key] < 1:
      raise ValueError(f"SequenceMatch {key}={cfg[key]!r} must be a positive integer.")
  for key in ("max_new_tokens", "max_actions"):
    if cfg[key] is not None and (not _is_int(cfg[key]) or cfg[key] < 1):
      raise ValueError(f"SequenceMatch {key}={cfg[key]!r} must be a positive integer or None.")
  for key in ("backspace_id", "eos_id"):
    if cfg[key] is not None and (not _is_int(cfg[key]) or cfg[key] < 0):
      raise ValueError(f"SequenceMatch {key}={cfg[key]!r} must be a token id >= 0 or None.")
  _check_range("sample_temperature", cfg.sample_temperature, 0.0, float("inf"), high_open=True)
  _check_range("top_p", cfg.top_p, 0.0, 1.0, low_open=True)


def resolve_backspace_id(cfg: ml_collections.ConfigDict, lm: lm_lib.LanguageModel) -> int:
  """The <bksp> id for `lm` (the model after `grow_vocab`): `cfg.backspace_id` or the default.

  The default is the last real token id, `vocab.real_vocab_size(lm) - 1`: the row `grow_vocab`
  added (vocab_size − 1 when the head is not padded).
  """
  real = vocab_lib.real_vocab_size(lm)
  backspace_id = real - 1 if cfg.backspace_id is None else cfg.backspace_id
  if not _is_int(backspace_id) or not 0 <= backspace_id < real:
    raise ValueError(f"SequenceMatch backspace_id={backspace_id!r} must be a real token id in "
                     f"[0, {real}) of the (grown) model.")
  return int(backspace_id)


def max_actions(cfg: ml_collections.ConfigDict, response_width: int) -> int:
  """The action width L of training rows: `cfg.max_actions` or 2 × max_new_tokens."""
  if cfg.max_actions is not None:
    return int(cfg.max_actions)
  max_new_tokens = response_width if cfg.max_new_tokens is None else cfg.max_new_tokens
  return 2 * int(max_new_tokens)


# ----------------------------------------------------------------------------------------------
# The one-pass layout.


def boundary_tokens(lm: lm_lib.LanguageModel, prompt_BxS: jax.Array) -> jax.Array:
  """The token a position −1 slot feeds, per row [B] int32 (see the module docstring).

  Decoders: the last prompt token (prompts are left-padded, so it is prompt[:, -1]; a decoder
  prompt must hold at least one real token). T5: `decoder_start_token_id`.
  """
  if prompt_BxS.ndim != 2:
    raise ValueError(f"prompt has shape {tuple(prompt_BxS.shape)}; expected [B, S].")
  if lm.config.get("family") == "t5":
    return jnp.full((prompt_BxS.shape[0],), lm.config.decoder_start_token_id, jnp.int32)
  return jnp.asarray(prompt_BxS[:, -1], jnp.int32)


def fill_boundary_tokens(lm: lm_lib.LanguageModel, batch: lm_lib.Batch) -> dict[str, Any]:
  """A copy of `batch` whose position −1 response slots hold `boundary_tokens(lm, prompt)`."""
  boundary_B = boundary_tokens(lm, batch["prompt"])
  response_BxT = jnp.where(batch["response_positions"] == -1, boundary_B[:, None],
                           batch["response"]).astype(jnp.int32)
  return dict(batch, response=response_BxT)


def _prefix_mask(mask_BxL: jax.Array) -> jax.Array:
  """Keeps each row's mask up to its first 0 (a row's actions are a prefix)."""
  return jnp.cumprod(mask_BxL.astype(jnp.int32), axis=1).astype(bool)


def _stack_walk_row(actions_L, valid_L, boundary, backspace_id, pad_id):
  """The stack walk of one row: (inputs [L], positions [L], visibility [L, L + 1]).

  The carry is the stack: stack_slot[d] and stack_tok[d] are the slot and input id at depth d
  (a slot's position is its depth), `depth` its size and `member` [L + 1] the same stack as a
  mask over slots, which is the visibility row. Padding slots leave the carry unchanged.
  """
  length = actions_L.shape[0]
  slots = jnp.arange(length + 1)

  def step(carry, x):
    stack_slot, stack_tok, depth, member = carry
    j, action, valid = x
    one_hot_j = slots == j
    is_backspace = action == backspace_id

    # Token: push j at depth `depth`.
    tok_carry = (stack_slot.at[depth].set(j), stack_tok.at[depth].set(action), depth + 1,
                 member | one_hot_j)
    tok_out = (action, depth)

    # <bksp>: pop (if anything), then slot j replaces the new top (if any).
    popped_depth = jnp.maximum(depth - 1, 0)
    member_popped = jnp.where(depth > 0, member & (slots != stack_slot[popped_depth]), member)
    top_depth = popped_depth - 1
    has_top = top_depth >= 0
    top_slot = stack_slot[jnp.maximum(top_depth, 0)]
    member_bk = jnp.where(has_top, (member_popped & (slots != top_slot)) | one_hot_j,
                          member_popped)
    stack_slot_bk = jnp.where(has_top, stack_slot.at[jnp.maximum(top_depth, 0)].set(j),
                              stack_slot)
    bk_carry = (stack_slot_bk, stack_tok, popped_depth, member_bk)
    bk_out = (jnp.where(has_top, stack_tok[jnp.maximum(top_depth, 0)], boundary),
              jnp.where(has_top, top_depth, -1))

    def pick(tok, bk, pad):
      return jnp.where(valid, jnp.where(is_backspace, bk, tok), pad)

    new_carry = jax.tree.map(lambda t, b, old: pick(t, b, old), tok_carry, bk_carry, carry)
    token_in = pick(tok_out[0], bk_out[0], pad_id)
    position = pick(tok_out[1], bk_out[1], 0)
    visible = jnp.where(valid, new_carry[3], one_hot_j)
    return new_carry, (token_in, position, visible)

  init = (jnp.zeros((length,), jnp.int32), jnp.zeros((length,), jnp.int32), jnp.int32(0),
          jnp.zeros((length + 1,), bool))
  _, (inputs_L, positions_L, visible_LxT) = jax.lax.scan(
      step, init, (jnp.arange(length, dtype=jnp.int32), actions_L, valid_L))
  return inputs_L, positions_L, visible_LxT


@jax.jit
def _preprocess(actions_BxL, valid_BxL, loss_mask_BxL, boundary_B, backspace_id, pad_id):
  batch, length = actions_BxL.shape
  inputs_BxL, positions_BxL, visible_BxLxT = jax.vmap(
      _stack_walk_row, in_axes=(0, 0, 0, None, None))(
          actions_BxL, valid_BxL, boundary_B, backspace_id, pad_id)
  pad_col_Bx1 = jnp.full((batch, 1), pad_id, jnp.int32)
  zero_col_Bx1 = jnp.zeros((batch, 1), jnp.int32)
  # The trailing slot L sees only itself, like every padding slot.
  last_row_Bx1xT = jnp.broadcast_to(jnp.arange(length + 1) == length, (batch, 1, length + 1))
  return {
      "response": jnp.concatenate([inputs_BxL, pad_col_Bx1], axis=1),
      "response_mask": jnp.concatenate([valid_BxL.astype(jnp.int32), zero_col_Bx1], axis=1),
      "response_positions": jnp.concatenate([positions_BxL, zero_col_Bx1], axis=1),
      "response_visibility": jnp.concatenate([visible_BxLxT, last_row_Bx1xT], axis=1),
      "targets": jnp.concatenate([jnp.where(valid_BxL, actions_BxL, pad_id), pad_col_Bx1],
                                 axis=1),
      "loss_mask": jnp.concatenate([(loss_mask_BxL & valid_BxL).astype(jnp.int32),
                                    zero_col_Bx1], axis=1),
  }


def preprocess_actions(actions_BxL: Any, backspace_id: int, *, pad_id: int = 0,
                       actions_mask_BxL: Any = None, loss_mask_BxL: Any = None,
                       boundary_token: Any = None) -> dict[str, jax.Array]:
  """Turns raw action sequences into the one-pass response layout (see the module docstring).

  Pure jnp (a jitted stack walk); accepts NumPy or jax inputs, on the host or inside jit.

  Args:
    actions_BxL: [B, L] int raw response actions (tokens and `backspace_id`); the prompt is
      separate and always visible.
    backspace_id: the <bksp> id.
    pad_id: id written into padding slots (and as the target there).
    actions_mask_BxL: [B, L], 1 on real actions; a row's actions are the prefix up to its first
      0. None = every slot is a real action.
    loss_mask_BxL: [B, L], 0 on transitions left out of the data terms (noise tokens from
      `augment_with_noise`); None = all ones.
    boundary_token: int or [B] ints fed at position −1 slots (`boundary_tokens(lm, prompt)`);
      None = `pad_id` (then let the loss function, or `fill_boundary_tokens`, write it).

  Returns:
    A dict of [B, T] arrays with T = L + 1 (int32 unless noted):
      "response": input id of each slot (slot j < n: action j's input; slots >= n: pad_id).
      "response_mask": 1 on the n real action slots.
      "response_positions": position of each slot from the response start (−1: boundary copy;
        0 on padding).
      "response_visibility": [B, T, T] bool, the stack after each slot's action (padding slots
        and the trailing slot L see only themselves).
      "targets": the raw action a_j that logits[:, j] must predict (pad_id on padding).
      "loss_mask": response_mask × loss_mask_BxL.
    logits[:, j] of `lm.logits` on this batch is Q(s_j, ·) for j = 0 .. n; slot n (<= L) is
    the extra trailing slot giving V(s_n).
  """
  actions_BxL = jnp.asarray(actions_BxL)
  if actions_BxL.ndim != 2:
    raise ValueError(f"actions has shape {tuple(actions_BxL.shape)}; expected [B, L].")
  if not jnp.issubdtype(actions_BxL.dtype, jnp.integer):
    raise ValueError(f"actions have dtype {actions_BxL.dtype}; expected integer token ids.")
  shape = actions_BxL.shape
  for name, mask in (("actions_mask", actions_mask_BxL), ("loss_mask", loss_mask_BxL)):
    if mask is not None and tuple(jnp.shape(mask)) != shape:
      raise ValueError(f"{name} has shape {tuple(jnp.shape(mask))}; expected {shape} like "
                       "the actions.")
  valid_BxL = (jnp.ones(shape, bool) if actions_mask_BxL is None
               else _prefix_mask(jnp.asarray(actions_mask_BxL)))
  loss_mask_BxL = (jnp.ones(shape, bool) if loss_mask_BxL is None
                   else jnp.asarray(loss_mask_BxL).astype(bool))
  boundary_B = jnp.broadcast_to(
      jnp.asarray(pad_id if boundary_token is None else boundary_token, jnp.int32), shape[:1])
  return _preprocess(actions_BxL.astype(jnp.int32), valid_BxL, loss_mask_BxL, boundary_B,
                     jnp.int32(backspace_id), jnp.int32(pad_id))


# ----------------------------------------------------------------------------------------------
# Noise augmentation.


def _uniform_excluding(rng: jax.Array, shape: tuple[int, ...], vocab_size: int,
                       excluded: tuple[int, ...]) -> jax.Array:
  """Integers uniform over [0, vocab_size) minus the sorted, in-range `excluded` ids."""
  draw = jax.random.randint(rng, shape, 0, vocab_size - len(excluded), dtype=jnp.int32)
  for skipped in excluded:  # ascending: each shift keeps the earlier ones skipped
    draw = draw + (draw >= skipped).astype(jnp.int32)
  return draw


def augment_with_noise(rng: jax.Array, actions_BxL: Any, mask_BxL: Any, *, noise_prob: float,
                       backspace_id: int, vocab_size: int, max_len: int, noise: str = "random",
                       task_noise_fn: Callable[..., jax.Array] | None = None,
                       eos_id: int | None = None, pad_id: int = 0) -> dict[str, jax.Array]:
  """Inserts (noise token, <bksp>) pairs into data action sequences.

  Before each real action a_i, independently with probability `noise_prob`, the pair
  (n_i, <bksp>) is inserted, so the state the model sees after the pair is the one before it.
  Output rows have the fixed width `max_len`: what does not fit is cut off (the row is then
  `truncated`: its last action is not the original last one, so the loss must bootstrap it).

  Args:
    rng: PRNG key; the output is a pure function of it and the inputs.
    actions_BxL: [B, L] int data actions (no <bksp>).
    mask_BxL: [B, L], 1 on real actions (the prefix up to the first 0 counts).
    noise_prob: insertion probability in [0, 1).
    backspace_id: the <bksp> id.
    vocab_size: noise ids are drawn from [0, vocab_size) (pass the number of real tokens).
    max_len: output width.
    noise: "random": n_i uniform over [0, vocab_size) except `backspace_id` and `eos_id`;
      "task": n_i = task_noise_fn(rng, actions_BxL, mask_BxL)[:, i] (a task-specific wrong
      token, e.g. a wrong digit; [B, L] int).
    task_noise_fn: required for noise="task".
    eos_id: never drawn as random noise (a noise EOS would end the episode).
    pad_id: id of padding slots.

  Returns:
    {"actions": [B, max_len] int32, "mask": [B, max_len] int32 (1 on real actions),
     "loss_mask": [B, max_len] int32 (0 on noise tokens and padding, 1 elsewhere),
     "truncated": [B] bool (some original action did not fit in max_len)}.
  """
  actions_BxL = jnp.asarray(actions_BxL, jnp.int32)
  if actions_BxL.ndim != 2 or tuple(jnp.shape(mask_BxL)) != actions_BxL.shape:
    raise ValueError(f"actions {tuple(actions_BxL.shape)} and mask {tuple(jnp.shape(mask_BxL))} "
                     "must both be [B, L].")
  _check_range("noise_prob", noise_prob, 0.0, 1.0, high_open=True)
  _check_choice("noise", noise, NOISES)
  if noise == "task" and task_noise_fn is None:
    raise ValueError("augment_with_noise(noise='task') needs task_noise_fn(rng, actions, mask) "
                     "returning a wrong token per position; got None.")
  if not _is_int(max_len) or max_len < 1:
    raise ValueError(f"augment_with_noise max_len={max_len!r} must be a positive integer.")
  excluded = tuple(sorted({i for i in (backspace_id, eos_id)
                           if i is not None and 0 <= i < vocab_size}))
  if not _is_int(vocab_size) or vocab_size - len(excluded) < 1:
    raise ValueError(f"augment_with_noise vocab_size={vocab_size!r} leaves no id to draw noise "
                     f"from once {list(excluded)} are excluded.")

  batch, length = actions_BxL.shape
  valid_BxL = _prefix_mask(jnp.asarray(mask_BxL))
  insert_rng, noise_rng = jax.random.split(rng)
  insert_BxL = jax.random.bernoulli(insert_rng, noise_prob, (batch, length)) & valid_BxL
  if noise == "random":
    noise_BxL = _uniform_excluding(noise_rng, (batch, length), vocab_size, excluded)
  else:
    noise_BxL = jnp.asarray(task_noise_fn(noise_rng, actions_BxL, valid_BxL), jnp.int32)
    if noise_BxL.shape != (batch, length):
      raise ValueError(f"task_noise_fn returned shape {tuple(noise_BxL.shape)}; expected "
                       f"{(batch, length)}.")

  # Each insertion before action i shifts it (and everything after) by two slots.
  action_idx_BxL = jnp.arange(length)[None, :] + 2 * jnp.cumsum(insert_BxL, axis=1)
  drop = max_len  # out of range: `mode="drop"` discards the write
  action_idx_BxL = jnp.where(valid_BxL, action_idx_BxL, drop)
  noise_idx_BxL = jnp.where(insert_BxL, action_idx_BxL - 2, drop)
  backspace_idx_BxL = jnp.where(insert_BxL, action_idx_BxL - 1, drop)
  rows_BxL = jnp.broadcast_to(jnp.arange(batch)[:, None], (batch, length))

  def scatter(base, values_by_index):
    out = jnp.full((batch, max_len), base, jnp.int32)
    for index_BxL, value in values_by_index:
      out = out.at[rows_BxL, index_BxL].set(value, mode="drop")
    return out

  backspace_BxL = jnp.full((batch, length), backspace_id, jnp.int32)
  ones_BxL = jnp.ones((batch, length), jnp.int32)
  zeros_BxL = jnp.zeros((batch, length), jnp.int32)
  actions_out = scatter(pad_id, [(action_idx_BxL, actions_BxL), (noise_idx_BxL, noise_BxL),
                                 (backspace_idx_BxL, backspace_BxL)])
  mask_out = scatter(0, [(action_idx_BxL, ones_BxL), (noise_idx_BxL, ones_BxL),
                         (backspace_idx_BxL, ones_BxL)])
  loss_mask_out = scatter(0, [(action_idx_BxL, ones_BxL), (noise_idx_BxL, zeros_BxL),
                              (backspace_idx_BxL, ones_BxL)])
  truncated_B = jnp.any(valid_BxL & (action_idx_BxL >= max_len), axis=1)
  return {"actions": actions_out, "mask": mask_out, "loss_mask": loss_mask_out,
          "truncated": truncated_B}


# ----------------------------------------------------------------------------------------------
# Schedule and loss.


def sm_weight(step: Any, *, bc_steps: int, anneal_steps: int = 2000,
              beta_end: float = 0.2) -> jax.Array:
  """β of L = β·L_BC + (1 − β)·L_SM at `step` (a Python int or a traced scalar).

  β = 1 for step < bc_steps, then falls linearly to `beta_end`, reached at
  step = bc_steps + anneal_steps, and stays there (anneal_steps = 0: a jump at bc_steps).
  """
  step = jnp.asarray(step, jnp.float32)
  if anneal_steps > 0:
    progress = jnp.clip((step - bc_steps) / anneal_steps, 0.0, 1.0)
  else:
    progress = (step >= bc_steps).astype(jnp.float32)
  return 1.0 - (1.0 - beta_end) * progress


def _group_mean(per_row_B: jax.Array, rows_B: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(mean of per_row over the selected rows (0 if none), whether any row is selected)."""
  count = rows_B.sum()
  return jnp.where(rows_B, per_row_B, 0.0).sum() / jnp.maximum(count, 1.0), count > 0


def sequencematch_loss(logits_BxTxV: jax.Array, targets_BxT: jax.Array,
                       response_mask_BxT: jax.Array, loss_mask_BxT: jax.Array,
                       is_data_B: jax.Array, truncated_B: jax.Array | None = None, *,
                       gamma: float, chi2_coef: float, weighting: str = "discounted",
                       terminal: str = "zero", num_real_tokens: int | None = None,
                       ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L_SM and L_BC from one-pass logits (see the module docstring for every term).

  Args:
    logits_BxTxV: [B, T, V] logits of the `preprocess_actions` layout: logits[:, j] = Q(s_j, ·).
    targets_BxT: [B, T] int raw actions; targets[:, j] = a_j.
    response_mask_BxT: [B, T], 1 on the n_b real actions of row b (a prefix; n_b < T, so the
      trailing slot n_b is inside the array).
    loss_mask_BxT: [B, T], 1 on transitions that count (0 on noise tokens and padding).
    is_data_B: [B], 1 on data rows, 0 on model-sample rows.
    truncated_B: [B] bool, rows that hit the length cap without terminating (their V(s_n) is
      bootstrapped); None = no row is truncated.
    gamma: discount γ.
    chi2_coef: c.
    weighting: "discounted" or "uniform".
    terminal: "zero" or "absorbing".
    num_real_tokens: head rows >= it are padding and take no part in V (None = all rows).

  Returns:
    (L_SM [], aux) with aux float32 scalars: "sm_loss", "bc_loss" (E_data[V − Q] over real
    data transitions), "data_reward" (E_data[r]), "model_reward" (E_model[r]), "td"
    (E_mix[V(s) − γV(s')]), "chi2" (E_mix[r²]), "value" (E_mix[V(s)]).
  """
  _check_weighting(weighting, terminal, gamma)
  if logits_BxTxV.ndim != 3 or logits_BxTxV.shape[:2] != targets_BxT.shape:
    raise ValueError(f"logits of shape {logits_BxTxV.shape} do not fit targets of shape "
                     f"{targets_BxT.shape}; expected [B, T, V] logits for [B, T] targets.")
  batch, length, vocab = logits_BxTxV.shape
  for name, array, shape in (("response_mask", response_mask_BxT, (batch, length)),
                             ("loss_mask", loss_mask_BxT, (batch, length)),
                             ("is_data", is_data_B, (batch,)),
                             ("truncated", truncated_B, (batch,))):
    if array is not None and tuple(array.shape) != shape:
      raise ValueError(f"{name} has shape {tuple(array.shape)}; expected {shape}.")
  dtype = jnp.promote_types(logits_BxTxV.dtype, jnp.float32)
  valid_BxT = _prefix_mask(response_mask_BxT)
  counted_BxT = valid_BxT & loss_mask_BxT.astype(bool)
  n_B = valid_BxT.sum(axis=1)
  slots_T = jnp.arange(length)
  # Slots 0 .. n_b carry a state; the rest is zeroed so nothing they hold (even NaN) leaks in.
  state_BxT = slots_T[None, :] <= n_B[:, None]
  logits_BxTxV = jnp.where(state_BxT[..., None], logits_BxTxV.astype(dtype), 0.0)
  real = vocab if num_real_tokens is None else min(int(num_real_tokens), vocab)
  if real < vocab:
    logits_BxTxV = jnp.where(jnp.arange(vocab) < real, logits_BxTxV, -jnp.inf)
  targets_BxT = jnp.where(valid_BxT, jnp.clip(targets_BxT, 0, real - 1), 0)

  value_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
  q_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None].astype(jnp.int32),
                              axis=-1)[..., 0]
  next_value_BxT = jnp.concatenate([value_BxT[:, 1:], jnp.zeros((batch, 1), dtype)], axis=1)
  truncated_B = (jnp.zeros((batch,), bool) if truncated_B is None
                 else truncated_B.astype(bool))
  terminates_B = ~truncated_B & (n_B > 0)
  last_BxT = slots_T[None, :] == (n_B - 1)[:, None]
  if terminal == "zero":
    next_value_BxT = jnp.where(last_BxT & terminates_B[:, None], 0.0, next_value_BxT)
  # (absorbing and truncated rows keep V(s_n) = logsumexp of the trailing slot n.)

  reward_BxT = q_BxT - gamma * next_value_BxT
  td_BxT = value_BxT - gamma * next_value_BxT
  nll_BxT = value_BxT - q_BxT
  if weighting == "discounted":
    weight_BxT = jnp.broadcast_to(jnp.asarray(gamma, dtype) ** slots_T.astype(dtype),
                                  (batch, length))
  else:
    weight_BxT = jnp.ones((batch, length), dtype)
  weight_BxT = jnp.where(counted_BxT, weight_BxT, 0.0)

  def row_sums(x_BxT):
    return jnp.where(counted_BxT, x_BxT, 0.0) * weight_BxT

  reward_sum_B = row_sums(reward_BxT).sum(axis=1)
  td_sum_B = row_sums(td_BxT).sum(axis=1)
  chi2_sum_B = row_sums(reward_BxT ** 2).sum(axis=1)
  value_sum_B = row_sums(value_BxT).sum(axis=1)
  weight_sum_B = weight_BxT.sum(axis=1)
  bc_B = row_sums(nll_BxT).sum(axis=1) / jnp.maximum(weight_sum_B, 1e-30)
  if terminal == "absorbing":
    # The absorbing tail: the trailing slot's logits repeated forever, the expert's action
    # there being the terminating action again, with total weight sum_{k >= n} γ^k.
    tail_weight_B = jnp.where(terminates_B, gamma ** n_B.astype(dtype) / (1.0 - gamma), 0.0)
    at_n_BxT = slots_T[None, :] == n_B[:, None]
    tail_value_B = jnp.where(at_n_BxT, value_BxT, 0.0).sum(axis=1)
    last_action_B = jnp.where(last_BxT, targets_BxT, 0).sum(axis=1)
    tail_logits_BxV = jnp.where(at_n_BxT[..., None], logits_BxTxV, 0.0).sum(axis=1)
    tail_q_B = jnp.take_along_axis(tail_logits_BxV, last_action_B[:, None], axis=1)[:, 0]
    tail_reward_B = tail_q_B - gamma * tail_value_B
    reward_sum_B += tail_weight_B * tail_reward_B
    td_sum_B += tail_weight_B * (1.0 - gamma) * tail_value_B
    chi2_sum_B += tail_weight_B * tail_reward_B ** 2
    value_sum_B += tail_weight_B * tail_value_B
    weight_sum_B += tail_weight_B

  has_weight_B = weight_sum_B > 0
  norm_B = jnp.maximum(weight_sum_B, 1e-30)
  data_B = is_data_B.astype(bool) & has_weight_B
  model_B = ~is_data_B.astype(bool) & has_weight_B

  def mix(per_row_B):
    data, has_data = _group_mean(per_row_B, data_B)
    model, has_model = _group_mean(per_row_B, model_B)
    both = has_data & has_model
    return jnp.where(both, 0.5 * (data + model), data + model)  # one of them is 0 otherwise

  data_reward, _ = _group_mean(reward_sum_B / norm_B, data_B)
  model_reward, _ = _group_mean(reward_sum_B / norm_B, model_B)
  td = mix(td_sum_B / norm_B)
  chi2 = mix(chi2_sum_B / norm_B)
  sm_loss = -data_reward + td + chi2_coef * chi2
  bc_loss, _ = _group_mean(bc_B, data_B)
  aux = {"sm_loss": sm_loss, "bc_loss": bc_loss, "data_reward": data_reward,
         "model_reward": model_reward, "td": td, "chi2": chi2,
         "value": mix(value_sum_B / norm_B)}
  return sm_loss, aux


def make_loss_fn(lm: lm_lib.LanguageModel, objective_cfg: ml_collections.ConfigDict
                 ) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
  """Builds the SequenceMatch `loss_fn(params, frozen, batch, rng, step) -> (loss, metrics)`.

  `lm` must already have the <bksp> row (`jaxsi.models.vocab.grow_vocab`).

  The batch holds the `preprocess_actions` arrays (width T = L + 1) plus the prompt:
    prompt [B, S], prompt_mask [B, S], response, response_mask, response_positions,
    response_visibility [B, T, T], targets, loss_mask, is_data [B] (1 data row, 0 model
    sample) and optionally truncated [B] (absent = no row truncated).
  Position −1 slots get `boundary_tokens(lm, prompt)` before the forward pass.

  loss = β·L_BC + (1 − β)·L_SM with β = sm_weight(step, ...). Dropout is driven by `rng`;
  `frozen` is unused.

  Metrics (float32 scalars): "loss", "beta", the aux values of `sequencematch_loss`,
  "backspace_rate" (fraction of real actions that are <bksp>, data and model rows apart:
  "data_backspace_rate", "model_backspace_rate"), "num_actions", "data_fraction".
  """
  validate(objective_cfg)
  cfg = objective_cfg
  backspace_id = resolve_backspace_id(cfg, lm)
  num_real = vocab_lib.real_vocab_size(lm)
  num_real = None if num_real >= lm.vocab_size else num_real
  loss_kwargs = dict(gamma=float(cfg.gamma), chi2_coef=float(cfg.chi2_coef),
                     weighting=cfg.weighting, terminal=cfg.terminal, num_real_tokens=num_real)
  schedule = functools.partial(sm_weight, bc_steps=int(cfg.bc_steps),
                               anneal_steps=int(cfg.anneal_steps), beta_end=float(cfg.beta_end))
  required = ("prompt", "prompt_mask", "response", "response_positions", "response_visibility",
              "response_mask", "targets", "loss_mask", "is_data")

  def loss_fn(params: Any, frozen: Any, batch: lm_lib.Batch, rng: jax.Array,
              step: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    del frozen
    missing = [key for key in required if key not in batch]
    if missing:
      raise ValueError(f"SequenceMatch batch lacks {missing}; it has {sorted(batch)} (build it "
                       "with preprocess_actions and add is_data).")
    batch = fill_boundary_tokens(lm, batch)
    logits_BxTxV = lm.logits(params, batch, dropout_rng=rng)
    sm_loss, aux = sequencematch_loss(
        logits_BxTxV, batch["targets"], batch["response_mask"], batch["loss_mask"],
        batch["is_data"], batch.get("truncated"), **loss_kwargs)
    beta = schedule(step)
    loss = beta * aux["bc_loss"] + (1.0 - beta) * sm_loss

    valid_BxT = _prefix_mask(batch["response_mask"])
    is_backspace_BxT = (valid_BxT & (batch["targets"] == backspace_id)).astype(jnp.float32)
    is_data_B = batch["is_data"].astype(bool)

    def rate(rows_B):
      actions = jnp.where(rows_B[:, None], valid_BxT, False).sum()
      return jnp.where(rows_B[:, None], is_backspace_BxT, 0.0).sum() / jnp.maximum(actions, 1)

    metrics = dict(aux, loss=loss, beta=beta,
                   backspace_rate=is_backspace_BxT.sum() / jnp.maximum(valid_BxT.sum(), 1),
                   data_backspace_rate=rate(is_data_B), model_backspace_rate=rate(~is_data_B),
                   num_actions=valid_BxT.sum(), data_fraction=is_data_B.mean())
    return loss, jax.tree.map(lambda x: jax.lax.stop_gradient(x).astype(jnp.float32), metrics)

  return loss_fn
