"""Rematerialization, scanned layers and gradient fences change speed and memory, never results.

Every comparison runs the same weights through both layouts: the unscanned parameters are
stacked by `layer_stack.to_scanned` (exact), so any difference comes from the computation.
"""

import copy
import os

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxsi import config as config_lib
from jaxsi import export
from jaxsi import mesh as mesh_lib
from jaxsi import objectives
from jaxsi import optim
from jaxsi import partitioning
from jaxsi import pretrained
from jaxsi import sampling
from jaxsi import state as state_lib
from jaxsi import step as step_lib
from jaxsi import trainer
from jaxsi.models import build
from jaxsi.models import decoder
from jaxsi.models import from_pretrained
from jaxsi.models import layer_stack
from jaxsi.models import remat
from jaxsi.models import t5
from jaxsi.models import to_pretrained
from jaxsi.models import vocab
from jaxsi.objectives import sft

VOCAB = 64
MODELS = ("gpt2", "llama", "v1_0", "v1_1")


def model_config(variant, **overrides):
  """A tiny config of a decoder ("gpt2", "llama") or T5 ("v1_0", "v1_1") variant."""
  if variant in decoder.VARIANTS:
    cfg = decoder.default_config(variant)
    cfg.update(vocab_size=VOCAB, d_model=32, num_layers=3, num_heads=4,
               num_kv_heads=2 if variant == "llama" else 4, head_dim=8, d_ff=64, max_len=32)
  else:
    cfg = t5.default_config(variant)
    cfg.update(vocab_size=VOCAB, d_model=32, num_layers=2, num_decoder_layers=3, num_heads=4,
               head_dim=8, d_ff=64, dropout_rate=0.0)
  cfg.update(overrides)
  return cfg


def pair(variant, **overrides):
  """(unscanned lm, scanned lm, unscanned params, the same params stacked)."""
  flat_lm = build(model_config(variant, **overrides))
  scan_lm = build(model_config(variant, scan_layers=True, **overrides))
  params = flat_lm.init(jax.random.PRNGKey(0))
  return flat_lm, scan_lm, params, layer_stack.to_scanned(params, scan_lm.config)


def make_batch(seed=0, batch=4, prompt_len=6, response_len=5):
  rng = np.random.default_rng(seed)
  prompt_mask = np.ones((batch, prompt_len), np.int32)
  prompt_mask[1, :2] = 0  # left padding
  prompt_mask[3, :4] = 0
  response_mask = np.ones((batch, response_len), np.int32)
  response_mask[2, 3:] = 0
  return {"prompt": jnp.asarray(rng.integers(2, VOCAB, (batch, prompt_len)), jnp.int32),
          "prompt_mask": jnp.asarray(prompt_mask),
          "response": jnp.asarray(rng.integers(2, VOCAB, (batch, response_len)), jnp.int32),
          "response_mask": jnp.asarray(response_mask)}


def nll(lm, params, batch):
  """Mean token NLL of the response: a loss with gradients in every parameter."""
  logp = jax.nn.log_softmax(lm.logits(params, batch), axis=-1)
  token = jnp.take_along_axis(logp, batch["response"][..., None], axis=-1)[..., 0]
  mask = batch["response_mask"].astype(jnp.float32)
  return -(token * mask).sum() / mask.sum()


def assert_trees_close(a, b, rtol, atol=0.0, skip=()):
  """Leafwise |a - b| <= atol + rtol * max|b| of the leaf; returns how many leaves compared."""
  compared = 0
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    name = jax.tree_util.keystr(path)
    if any(s in name for s in skip):
      continue
    x, y = np.asarray(x), np.asarray(y)
    assert x.shape == y.shape, name
    np.testing.assert_allclose(x, y, rtol=0, atol=atol + rtol * float(np.abs(y).max()),
                               err_msg=name)
    compared += 1
  assert jax.tree.structure(a) == jax.tree.structure(b)
  return compared


# ------------------------------------------------------------------------------------------
# Config knobs.


@pytest.mark.parametrize("variant", ["gpt2", "v1_1"])
def test_knobs_default_off_and_bad_values_fail_in_one_sentence(variant):
  family = "Decoder" if variant in decoder.VARIANTS else "T5"
  cfg = model_config(variant)
  assert cfg.remat_policy == "none" and cfg.scan_layers is False
  assert cfg.fence_residual_grads is False
  cfg.remat_policy = "everything"
  with pytest.raises(ValueError, match=rf"^{family} config remat_policy='everything' is unknown; "
                     r"accepted: \['none', 'full', 'dots', 'dots_no_batch'\]\.$"):
    build(cfg)
  cfg = model_config(variant)
  del cfg.scan_layers  # ConfigDict refuses an int for a bool field; a stored JSON need not
  cfg.scan_layers = 1
  with pytest.raises(ValueError, match=rf"^{family} config scan_layers=1 must be True or False\.$"):
    build(cfg)
  cfg = model_config(variant)
  del cfg.fence_residual_grads
  cfg.fence_residual_grads = "yes"
  with pytest.raises(ValueError, match=rf"^{family} config fence_residual_grads='yes' must be "
                     r"True or False\.$"):
    build(cfg)


@pytest.mark.parametrize("variant", ["llama", "v1_0"])
def test_configs_stored_before_the_knobs_still_build(variant):
  cfg = model_config(variant)
  del cfg.remat_policy, cfg.scan_layers, cfg.fence_residual_grads  # stored before the knobs
  lm = build(cfg)
  assert lm.config.remat_policy == "none" and lm.config.scan_layers is False
  assert lm.config.fence_residual_grads is False
  assert "layers" not in lm.abstract_params().get("decoder", lm.abstract_params())


@pytest.mark.parametrize("variant", MODELS)
def test_stacked_params_match_the_scanned_model_and_convert_back(variant):
  flat_lm, scan_lm, params, stacked = pair(variant)
  expected = scan_lm.abstract_params()
  assert jax.tree.structure(stacked) == jax.tree.structure(expected)
  for got, want in zip(jax.tree.leaves(stacked), jax.tree.leaves(expected)):
    assert got.shape == want.shape
  # Stacked leaves, and only they, carry the "layers" logical axis first.
  axes = scan_lm.param_axes()
  mask = layer_stack.stacked_mask(stacked)
  for spec, is_stacked in zip(jax.tree.leaves(axes, is_leaf=lambda x: isinstance(
      x, jax.sharding.PartitionSpec)), jax.tree.leaves(mask)):
    assert (tuple(spec)[:1] == ("layers",)) == is_stacked
    assert list(tuple(spec)).count("layers") == int(is_stacked)
  assert sum(jax.tree.leaves(mask)) > 0
  back = layer_stack.to_unscanned(stacked, scan_lm.config)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  assert layer_stack.to_layout(params, scan_lm.config, scanned=False) is params
  with pytest.raises(ValueError, match="have no scanned 'layers' subtree"):
    layer_stack.to_unscanned(params, scan_lm.config)


# ------------------------------------------------------------------------------------------
# Forward passes and decoding.


@pytest.mark.parametrize("variant", MODELS)
def test_scanned_logits_equal_unscanned(variant):
  flat_lm, scan_lm, params, stacked = pair(variant)
  batch = make_batch()
  flat = jax.jit(flat_lm.logits)(params, batch)
  scanned = jax.jit(scan_lm.logits)(stacked, batch)
  scale = float(jnp.abs(flat).max())
  np.testing.assert_allclose(scanned, flat, rtol=0, atol=1e-5 * max(scale, 1.0))


@pytest.mark.parametrize("variant", ["llama", "v1_1"])
def test_scanned_prefill_and_decode_steps_equal_unscanned(variant):
  flat_lm, scan_lm, params, stacked = pair(variant)
  batch = make_batch()
  prompt, prompt_mask, response = batch["prompt"], batch["prompt_mask"], batch["response"]
  slots = response.shape[1]
  runs = []
  for lm, p in ((flat_lm, params), (scan_lm, stacked)):
    logits, cache = jax.jit(lm.prefill, static_argnums=3)(p, prompt, prompt_mask, slots)
    step = jax.jit(lm.decode_step)
    out = [logits]
    for t in range(slots - 1):
      visible = jnp.broadcast_to(jnp.arange(slots) <= t, (prompt.shape[0], slots))
      logits, cache = step(p, cache, response[:, t], jnp.int32(t),
                           jnp.full((prompt.shape[0],), t, jnp.int32), visible)
      out.append(logits)
    runs.append((jnp.stack(out, axis=1), cache))
  (flat, flat_cache), (scanned, scan_cache) = runs
  scale = max(float(jnp.abs(flat).max()), 1.0)
  np.testing.assert_allclose(scanned, flat, rtol=0, atol=1e-5 * scale)
  # ... and both equal teacher forcing.
  np.testing.assert_allclose(scanned, flat_lm.logits(params, batch), rtol=0, atol=1e-5 * scale)
  # Every cache leaf keeps the batch first (samplers repeat and gather along it).
  for leaf in jax.tree.leaves(scan_cache):
    assert leaf.shape[0] == prompt.shape[0]


@pytest.mark.parametrize("variant", ["gpt2", "v1_0"])
def test_scanned_greedy_sampling_equals_unscanned(variant):
  flat_lm, scan_lm, params, stacked = pair(variant)
  batch = make_batch(seed=3)
  outs = [sampling.sample(lm, p, batch["prompt"], batch["prompt_mask"], jax.random.PRNGKey(0),
                          max_new_tokens=6, temperature=0.0, num_samples=2, eos_id=1)
          for lm, p in ((flat_lm, params), (scan_lm, stacked))]
  # The scanned model also samples sharded over 8 devices (parameters by their logical axes).
  mesh = mesh_lib.build_mesh(ml_collections.ConfigDict({"data": 2, "fsdp": 2, "tensor": 2}),
                             jax.devices())
  sampler = sampling.make_sampler(scan_lm, max_new_tokens=6, num_samples=2, eos_id=1, mesh=mesh)
  outs.append(sampler(stacked, batch["prompt"], batch["prompt_mask"], jax.random.PRNGKey(0),
                      temperature=0.0))
  for out in outs[1:]:
    np.testing.assert_array_equal(out.tokens, outs[0].tokens)
    np.testing.assert_array_equal(out.mask, outs[0].mask)
    np.testing.assert_allclose(out.logprobs, outs[0].logprobs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", ["llama", "v1_1"])
def test_scanned_program_does_not_grow_with_depth(variant):
  """What scanning is for: the traced program (hence compile time) is the same for any depth."""
  batch = make_batch()

  def program_size(num_layers, scan):
    depth = {"num_layers": num_layers}
    if variant not in decoder.VARIANTS:
      depth["num_decoder_layers"] = num_layers
    lm = build(model_config(variant, scan_layers=scan, **depth))
    grad_fn = jax.grad(lambda p: nll(lm, p, batch))
    return len(jax.make_jaxpr(grad_fn)(lm.abstract_params()).eqns)

  assert program_size(2, True) == program_size(6, True)
  assert program_size(6, False) > 2 * program_size(2, False)


# ------------------------------------------------------------------------------------------
# Rematerialization.


def residual_size(lm, params, batch):
  """Elements the backward pass keeps from the forward (the leaves of the VJP closure)."""
  vjp = jax.eval_shape(lambda p: jax.vjp(lambda q: nll(lm, q, batch), p)[1], params)
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(vjp))


@pytest.mark.parametrize("variant", ["llama", "v1_1"])
@pytest.mark.parametrize("scan", [False, True])
def test_remat_policies_keep_less_for_the_backward_pass(variant, scan):
  batch = make_batch()
  params = build(model_config(variant, scan_layers=scan)).init(jax.random.PRNGKey(0))
  size = {policy: residual_size(build(model_config(variant, remat_policy=policy,
                                                   scan_layers=scan)), params, batch)
          for policy in remat.POLICIES}
  assert size["full"] < size["dots_no_batch"] < size["dots"] < size["none"], size


@pytest.mark.parametrize("variant", ["llama", "v1_1"])
def test_every_remat_policy_keeps_loss_and_gradients(variant):
  batch = make_batch()
  params = build(model_config(variant)).init(jax.random.PRNGKey(0))
  reference = {}
  for scan in (False, True):
    p = layer_stack.to_scanned(params, model_config(variant)) if scan else params
    for policy in remat.POLICIES:
      lm = build(model_config(variant, remat_policy=policy, scan_layers=scan))
      loss, grads = jax.jit(jax.value_and_grad(lambda q, lm=lm: nll(lm, q, batch)))(p)
      if policy == "none":
        reference[scan] = (loss, grads)
        continue
      ref_loss, ref_grads = reference[scan]
      np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, err_msg=policy)
      assert_trees_close(grads, ref_grads, rtol=1e-5, atol=1e-7)
  # Scanned gradients, unstacked, are the unscanned ones.
  assert_trees_close(layer_stack.to_unscanned(reference[True][1], model_config(variant)),
                     reference[False][1], rtol=1e-5, atol=1e-7)


# Each family's layers in each layout (the variants of a family share their layer code).
@pytest.mark.parametrize("variant,scan", [("gpt2", False), ("llama", True), ("v1_1", False),
                                          ("v1_0", True)])
def test_residual_grad_fence_keeps_loss_and_gradients(variant, scan):
  batch = make_batch()
  params = build(model_config(variant, scan_layers=scan)).init(jax.random.PRNGKey(0))
  results = {}
  for fence in (False, True):
    lm = build(model_config(variant, scan_layers=scan, fence_residual_grads=fence))
    compiled = jax.jit(jax.value_and_grad(lambda p, lm=lm: nll(lm, p, batch))).lower(
        params).compile()
    results[fence] = compiled(params), compiled.as_text().count(" conditional(")
  (loss, grads), fences = results[True]
  (ref_loss, ref_grads), no_fences = results[False]
  # Often bitwise equal; where the fence moves a fusion boundary XLA may sum in another order.
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  assert_trees_close(grads, ref_grads, rtol=1e-5, atol=1e-7)
  # The optimized program keeps one conditional per residual sum of the backward pass (a
  # scanned stack's body holds one layer's): XLA did not fold the fences away.
  cfg = model_config(variant)
  if variant in decoder.VARIANTS:
    per_stack = [(2, cfg.num_layers)]
  else:
    per_stack = [(2, cfg.num_layers), (3, cfg.num_decoder_layers)]
  assert no_fences == 0
  assert fences == sum(sums * (1 if scan else layers) for sums, layers in per_stack)


@pytest.mark.parametrize("variant", ["llama", "v1_1"])
def test_dropout_runs_under_scan_and_remat(variant):
  lm = build(model_config(variant, dropout_rate=0.2, remat_policy="full", scan_layers=True))
  params = lm.init(jax.random.PRNGKey(0))
  batch = make_batch()
  grad_fn = jax.jit(jax.grad(lambda p, rng: jnp.mean(lm.logits(p, batch, dropout_rng=rng))))
  grads = grad_fn(params, jax.random.PRNGKey(1))
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  logits = jax.jit(lambda p, rng: lm.logits(p, batch, dropout_rng=rng))
  a = logits(params, jax.random.PRNGKey(1))
  assert not np.allclose(a, logits(params, jax.random.PRNGKey(2)))  # dropout on, per key
  np.testing.assert_array_equal(a, logits(params, jax.random.PRNGKey(1)))


# ------------------------------------------------------------------------------------------
# Optimizers: stacked layers train exactly like separate ones.


def optim_config(name, **overrides):
  cfg = optim.default_optim_config()
  # Factoring from 16 on makes Adafactor factor the tiny models' kernels, as it does real ones.
  cfg.update(name=name, lr=1e-2, weight_decay=0.1, grad_clip_norm=0.5,
             adafactor_min_dim_size_to_factor=16, schedule="linear", warmup_steps=2,
             total_steps=10)
  cfg.update(overrides)
  return cfg


def train(lm, params, tx, steps=5):
  """`steps` updates on a fixed rotation of batches; returns the final parameters."""
  @jax.jit
  def update(params, opt_state, batch):
    grads = jax.grad(lambda p: nll(lm, p, batch))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return jax.tree.map(lambda p, u: p + u, params, updates), opt_state

  opt_state = tx.init(params)
  for step in range(steps):
    params, opt_state = update(params, opt_state, make_batch(seed=step % 2))
  return params, opt_state


@pytest.mark.parametrize("variant,name", [("llama", "adafactor"), ("v1_1", "adafactor"),
                                          ("gpt2", "adamw"), ("v1_0", "adamw")])
def test_scanned_training_equals_unscanned(variant, name):
  flat_lm, scan_lm, params, stacked = pair(variant)
  tx = optim.build_optimizer(optim_config(name))
  flat, flat_state = train(flat_lm, params, tx)
  scanned, scan_state = train(scan_lm, stacked, tx)
  is_per_layer = lambda x: isinstance(x, optim.PerLayerState)  # noqa: E731
  assert any(map(is_per_layer, jax.tree.leaves(scan_state, is_leaf=is_per_layer)))
  assert not any(map(is_per_layer, jax.tree.leaves(flat_state, is_leaf=is_per_layer)))
  moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
              for a, b in zip(jax.tree.leaves(flat), jax.tree.leaves(params)))
  assert moved > 1e-3  # the steps did something
  # GPT-2's key bias has an exactly zero true gradient (softmax ignores a shift shared by all
  # keys), so Adam turns its rounding noise into lr-sized steps; see tests/test_train_step.py.
  compared = assert_trees_close(layer_stack.to_unscanned(scanned, scan_lm.config), flat,
                                rtol=1e-5, atol=1e-6, skip=("['key']['bias']",))
  assert compared >= 10


def test_stacked_adafactor_without_per_layer_would_differ():
  """Why `per_layer` exists: Adafactor over whole [L, ...] stacks trains differently."""
  flat_lm, scan_lm, params, stacked = pair("llama")
  cfg = optim_config("adafactor")
  never_stacked = lambda tree: jax.tree.map(lambda _: False, tree)  # noqa: E731
  flat, _ = train(flat_lm, params, optim.build_optimizer(cfg), steps=2)
  whole, _ = train(scan_lm, stacked, optim.build_optimizer(cfg, stacked=never_stacked), steps=2)
  whole = layer_stack.to_unscanned(whole, scan_lm.config)
  differs = [not np.allclose(a, b, rtol=1e-4, atol=1e-6)
             for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(flat))]
  assert any(differs)


def test_per_layer_keeps_the_state_of_unscanned_models():
  """Checkpoints of unscanned runs keep their optimizer-state layout."""
  lm = build(model_config("gpt2"))
  params = lm.init(jax.random.PRNGKey(0))
  cfg = optim_config("adafactor", grad_clip_norm=0.0, weight_decay=0.0)
  import optax  # pylint: disable=g-import-not-at-top
  plain = optax.adafactor(learning_rate=optim.build_schedule(cfg),
                          min_dim_size_to_factor=16, decay_rate=0.8,
                          multiply_by_parameter_scale=True, clipping_threshold=1.0,
                          momentum=None, eps=1e-30, factored=True)
  ours = jax.eval_shape(optim.build_optimizer(cfg).init, params)
  theirs = jax.eval_shape(plain.init, params)
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)


# ------------------------------------------------------------------------------------------
# Sharding.


def test_sharded_scanned_train_step_equals_unscanned_single_device():
  """A scanned llama on a 2x2x2 mesh takes the same SFT steps as the unscanned one on 1 device."""
  flat_lm, scan_lm, params, stacked = pair("llama")
  tx = optim.build_optimizer(optim_config("adafactor", weight_decay=0.0))
  batches = [make_batch(seed=s, batch=8) for s in range(3)]

  def run(lm, init_params, mesh_shape, devices):
    mesh = mesh_lib.build_mesh(ml_collections.ConfigDict(dict(zip(partitioning.MESH_AXES,
                                                                   mesh_shape))), devices)
    abstract = jax.eval_shape(lambda p: state_lib.create(p, tx), init_params)
    shardings = state_lib.shardings(abstract, lm.param_axes(), mesh)
    state = jax.jit(lambda p: state_lib.create(p, tx), out_shardings=shardings)(init_params)
    loss_fn = objectives.make_loss_fn(sft.default_objective_config(), lm)
    batch_sh = partitioning.batch_shardings(mesh, batches[0])
    repl = partitioning.replicated(mesh)
    step = jax.jit(chex.assert_max_traces(step_lib.make_train_step(loss_fn, tx), n=1),
                   in_shardings=(shardings, {}, batch_sh, repl),
                   out_shardings=(shardings, repl), donate_argnums=(0,))
    losses = []
    for batch in batches:
      state, metrics = step(state, {}, jax.device_put(batch, batch_sh), jax.random.PRNGKey(1))
      losses.append(float(metrics["loss"]))
    return losses, state

  chex.clear_trace_counter()
  losses_8, state_8 = run(scan_lm, stacked, (2, 2, 2), jax.devices())
  chex.clear_trace_counter()
  losses_1, state_1 = run(flat_lm, params, (1, 1, 1), jax.devices()[:1])
  assert len(jax.devices()) == 8
  # The stacked kernels really are split over the devices (fsdp on "embed", tensor on heads).
  kernel = state_8.params["layers"]["attn"]["query"]["kernel"]
  assert not kernel.sharding.is_fully_replicated and len(kernel.sharding.device_set) == 8
  assert kernel.sharding.spec[0] is None  # the layer axis is never split
  np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5)
  assert losses_1[-1] < losses_1[0]
  assert_trees_close(layer_stack.to_unscanned(jax.device_get(state_8.params), scan_lm.config),
                     jax.device_get(state_1.params), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Hugging Face export/import, loading, vocabulary growth.


@pytest.mark.parametrize("variant", ["gpt2", "v1_1"])
def test_hf_export_of_a_scanned_model_round_trips(variant, tmp_path):
  flat_lm, scan_lm, params, stacked = pair(variant)
  batch = make_batch()
  expected = flat_lm.logits(params, batch)
  to_pretrained(scan_lm, stacked, str(tmp_path))
  again_lm, again = from_pretrained(str(tmp_path), scan_layers=True)
  assert again_lm.config.scan_layers and layer_stack.is_scanned(again, again_lm.config)
  np.testing.assert_allclose(again_lm.logits(again, batch), expected, rtol=0, atol=1e-5)
  flat_again_lm, flat_again = from_pretrained(str(tmp_path))  # the file is plain HF layout
  assert not flat_again_lm.config.scan_layers
  np.testing.assert_allclose(flat_again_lm.logits(flat_again, batch), expected, rtol=0, atol=1e-5)
  # `pretrained.load(..., like=...)` brings a checkpoint into the layout of the run's model.
  loaded_lm, loaded = pretrained.load(str(tmp_path), like=scan_lm)
  assert loaded_lm.config.scan_layers
  assert jax.tree.structure(loaded) == jax.tree.structure(stacked)
  back_lm, back = pretrained.in_layout_of(flat_lm, loaded_lm, loaded)
  assert not back_lm.config.scan_layers
  assert jax.tree.structure(back) == jax.tree.structure(params)


@pytest.mark.parametrize("variant", ["llama", "v1_0"])
def test_vocab_growth_of_a_scanned_model(variant):
  _, scan_lm, _, stacked = pair(variant)
  batch = make_batch()
  grown_lm, grown = vocab.grow_vocab(scan_lm, stacked, 2)
  assert grown_lm.config.scan_layers and grown_lm.vocab_size == VOCAB + 2
  logits = grown_lm.logits(grown, batch)
  np.testing.assert_allclose(logits[..., :VOCAB], scan_lm.logits(stacked, batch), rtol=0,
                             atol=1e-5)
  assert copy.deepcopy(grown_lm.config).scan_layers


def test_scanned_run_exports_and_initializes_runs_of_either_layout(tmp_path):
  """A scanned run's checkpoint starts an unscanned run; its HF export starts a scanned one."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def load(**overrides):
    items = [("train.progress", "false"), ("eval.at_end", "false")]
    items += [(k, str(v)) for k, v in overrides.items()]
    return config_lib.load(os.path.join(root, "configs/arithmetic_sft.py:tiny"), items)

  scanned_run = str(tmp_path / "scanned")
  trainer.train(load(**{"train.steps": 3, "model.scan_layers": True}), scanned_run)
  lm, params, _ = pretrained.load_workdir(scanned_run)
  assert lm.config.scan_layers and layer_stack.is_scanned(params, lm.config)
  flat_params = layer_stack.to_unscanned(params, lm.config)

  def initial_params(workdir, **overrides):
    run = trainer.setup(load(**overrides), workdir)
    try:
      state, step = trainer.restore_or_init(run)
    finally:
      run.checkpointer.close()
    assert step == 0
    return jax.device_get(state.params)

  started = initial_params(str(tmp_path / "flat"), init_from=scanned_run)
  assert jax.tree.structure(started) == jax.tree.structure(flat_params)
  for a, b in zip(jax.tree.leaves(started), jax.tree.leaves(flat_params)):
    np.testing.assert_array_equal(a, b)

  hf_dir = str(tmp_path / "hf")
  assert export.main([scanned_run, hf_dir]) == 0
  started = initial_params(str(tmp_path / "scanned_b"), init_from=hf_dir,
                           **{"model.scan_layers": True})
  assert jax.tree.structure(started) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(started), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
