"""Parity of jaxsi decoders with Hugging Face PyTorch models, and checkpoint import/export."""

import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import serialization

from jaxsi.models import decoder, from_pretrained, hf, hf_decoder, to_pretrained

VOCAB = 96
B, S, T = 3, 6, 5


def _randomize(model, seed):
  """Random weights everywhere, so zero biases or unit norms cannot hide a mapping bug."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      p.copy_(1.0 + 0.1 * noise if ("ln" in name or "norm" in name) and p.ndim == 1
              and name.endswith("weight") else 0.15 * noise)
  return model.eval()


def tiny_hf_model(kind):
  common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
  if kind == "gpt2":
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                     n_positions=64, bos_token_id=0, eos_token_id=0)
    cls = transformers.GPT2LMHeadModel
  elif kind == "llama":
    config = transformers.LlamaConfig(rope_theta=500.0, rms_norm_eps=1e-5, **common)
    cls = transformers.LlamaForCausalLM
  elif kind == "qwen2":
    config = transformers.Qwen2Config(tie_word_embeddings=True, **common)
    cls = transformers.Qwen2ForCausalLM
  else:
    config = transformers.MistralConfig(sliding_window=48, head_dim=16, **common)
    cls = transformers.MistralForCausalLM
  config._attn_implementation = "eager"  # pylint: disable=protected-access
  return _randomize(cls(config), seed=len(kind))


def make_batch(seed=0):
  rng = np.random.default_rng(seed)
  prompt = rng.integers(0, VOCAB, (B, S)).astype(np.int32)
  prompt_mask = np.arange(S)[None, :] >= (S - np.array([[6], [3], [1]]))
  response = rng.integers(0, VOCAB, (B, T)).astype(np.int32)
  return dict(prompt=prompt, prompt_mask=prompt_mask, response=response,
              response_mask=np.ones((B, T), bool))


def hf_response_logits(model, batch):
  """HF logits [B, T, V] for the response, with jaxsi's mask and positions."""
  prompt, prompt_mask, response = batch["prompt"], batch["prompt_mask"], batch["response"]
  ids = np.concatenate([prompt, response[:, :-1]], axis=1)
  mask = np.concatenate([prompt_mask, np.ones((B, T - 1), bool)], axis=1)
  n = prompt_mask.sum(1, keepdims=True)
  positions = np.concatenate([np.maximum(np.cumsum(prompt_mask, 1) - 1, 0),
                              n + np.arange(T - 1)[None]], axis=1)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long),
                position_ids=torch.tensor(positions, dtype=torch.long)).logits
  return out.numpy()[:, S - 1:]


KINDS = ["gpt2", "llama", "qwen2", "mistral"]


@pytest.fixture(scope="module", params=KINDS)
def saved(request, tmp_path_factory):
  model = tiny_hf_model(request.param)
  path = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(path)
  lm, params = from_pretrained(str(path))
  return request.param, model, path, lm, params


def test_logits_match_pytorch(saved):
  kind, model, _, lm, params = saved
  batch = make_batch()
  want = hf_response_logits(model, batch)
  got = np.asarray(jax.jit(lm.logits)(params, batch))
  assert got.shape == (B, T, VOCAB)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  assert lm.config.variant == ("gpt2" if kind == "gpt2" else "llama")


def test_imported_config(saved):
  kind, _, _, lm, _ = saved
  cfg = lm.config
  assert (cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.num_heads) == (VOCAB, 32, 2, 4)
  if kind == "gpt2":
    assert cfg.tie_embeddings and cfg.num_kv_heads == 4 and cfg.max_len == 64
  else:
    assert cfg.num_kv_heads == 2
    assert cfg.tie_embeddings == (kind == "qwen2")
    assert cfg.attention_bias == (kind == "qwen2") and not cfg.attention_out_bias
  if kind == "llama":
    assert cfg.rope_theta == 500.0 and cfg.norm_eps == 1e-5
  if kind == "mistral":
    assert cfg.head_dim == 16 and cfg.max_len == 48  # capped at the sliding window


def test_round_trip_through_transformers(saved, tmp_path):
  kind, model, _, lm, params = saved
  to_pretrained(lm, params, str(tmp_path))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path, attn_implementation="eager").eval()
  expected_type = {"mistral": "llama"}.get(kind, kind)
  assert reloaded.config.model_type == expected_type
  batch = make_batch(seed=1)
  np.testing.assert_allclose(hf_response_logits(reloaded, batch),
                             hf_response_logits(model, batch), atol=1e-5)
  original = {k: v.numpy() for k, v in model.state_dict().items()}
  for name, value in reloaded.state_dict().items():
    if name in original:
      np.testing.assert_array_equal(value.numpy(), original[name], err_msg=name)


def test_pad_vocab_multiple(tmp_path):
  model = tiny_hf_model("llama")
  model.save_pretrained(tmp_path / "in")
  lm, params = from_pretrained(str(tmp_path / "in"), pad_vocab_multiple=64, dtype="float32")
  assert lm.vocab_size == 128 and lm.config.num_real_tokens == VOCAB
  assert params["embed"]["embedding"].shape == (128, 32)
  np.testing.assert_array_equal(params["embed"]["embedding"][VOCAB:], 0.0)
  np.testing.assert_array_equal(params["lm_head"]["kernel"][:, VOCAB:], 0.0)
  batch = make_batch()
  got = np.asarray(jax.jit(lm.logits)(params, batch))
  assert got.shape == (B, T, 128)
  np.testing.assert_allclose(got[..., :VOCAB], hf_response_logits(model, batch), atol=1e-4)
  to_pretrained(lm, params, str(tmp_path / "out"))
  with open(tmp_path / "out" / "config.json") as f:
    assert json.load(f)["vocab_size"] == VOCAB
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
  np.testing.assert_array_equal(reloaded.lm_head.weight.detach().numpy(),
                                model.lm_head.weight.detach().numpy())


def test_other_weight_formats_load_identically(tmp_path):
  model = tiny_hf_model("gpt2")
  model.save_pretrained(tmp_path / "ref")
  _, want = from_pretrained(str(tmp_path / "ref"))
  state = {k: v.detach().clone() for k, v in model.state_dict().items()}

  model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
  assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")

  torch_dir = tmp_path / "torch"
  torch_dir.mkdir()
  model.config.to_json_file(torch_dir / "config.json")
  # Old GPT-2 checkpoints have no "transformer." prefix and carry causal-mask buffers.
  legacy = {k.removeprefix("transformer."): v for k, v in state.items()}
  legacy["h.0.attn.bias"] = torch.ones(1, 1, 4, 4)
  torch.save(legacy, torch_dir / "pytorch_model.bin")

  # Hugging Face Flax naming: Dense "kernel" is the transposed torch weight, "embedding"/"scale".
  flax_dir = tmp_path / "flax"
  flax_dir.mkdir()
  model.config.to_json_file(flax_dir / "config.json")
  tree = {}
  for name, value in state.items():
    *parents, leaf = name.split(".")
    array = value.numpy()
    if leaf == "weight":
      if parents[-1].startswith("ln"):
        leaf = "scale"
      elif parents[-1] in ("wte", "wpe"):
        leaf = "embedding"
      else:
        leaf, array = "kernel", array.T
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = array
  with open(flax_dir / "flax_model.msgpack", "wb") as f:
    f.write(serialization.msgpack_serialize(tree))

  for directory in ("sharded", "torch", "flax"):
    _, got = from_pretrained(str(tmp_path / directory))
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_bad_inputs_fail_clearly(tmp_path):
  model = tiny_hf_model("gpt2")
  model.save_pretrained(tmp_path)
  with pytest.raises(ValueError, match="'num_layer'.*valid keys"):
    from_pretrained(str(tmp_path), num_layer=3)
  with pytest.raises(ValueError, match="num_layers"):  # overriding structure mismatches weights
    from_pretrained(str(tmp_path), num_layers=3)
  with pytest.raises(ValueError, match="pad_vocab_multiple"):
    from_pretrained(str(tmp_path), pad_vocab_multiple=0)
  with pytest.raises(ValueError, match="'bert'"):
    hf.converter_for_model_type("bert")
  with pytest.raises(ValueError, match="rope_type|Rotary scaling"):
    hf_decoder.config_from_hf({"model_type": "llama", "hidden_size": 32,
                               "num_attention_heads": 4, "num_hidden_layers": 1,
                               "intermediate_size": 8, "vocab_size": 8,
                               "max_position_embeddings": 8,
                               "rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}})
  empty = tmp_path / "empty"
  empty.mkdir()
  with open(empty / "config.json", "w") as f:
    json.dump(model.config.to_dict(), f)
  with pytest.raises(ValueError, match="No weights found"):
    from_pretrained(str(empty))


def test_converter_functions_round_trip_params():
  cfg = decoder.default_config("llama")
  cfg.update(vocab_size=16, d_model=8, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4,
             d_ff=12, attention_bias=True, attention_out_bias=True, mlp_bias=True)
  from jaxsi.models import build  # pylint: disable=g-import-not-at-top
  lm = build(cfg)
  params = jax.tree.map(np.asarray, lm.init(jax.random.key(0)))
  tensors = hf_decoder.params_to_hf(params, cfg)
  assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (4, 8)
  assert hf_decoder.hf_config_from(cfg)["model_type"] == "llama"
  back = hf_decoder.params_from_hf(tensors, hf_decoder.config_from_hf(hf_decoder.hf_config_from(
      cfg)))
  jax.tree.map(np.testing.assert_array_equal, back, params)
