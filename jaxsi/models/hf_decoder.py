"""Hugging Face <-> jaxsi conversion for decoder-only models.

Supported `model_type`s: "gpt2" (variant "gpt2") and "llama", "mistral",
"qwen2" (variant "llama"). Tensor names are those of the PyTorch checkpoints
(`GPT2LMHeadModel`, `LlamaForCausalLM`, ...). Orientation:

- GPT-2 `Conv1D` weights are stored [in, out], like a jaxsi kernel.
- `nn.Linear` weights (Llama family, GPT-2's untied `lm_head`) are [out, in].
- jaxsi attention kernels split the head axis out: query [E, H, D], out [H, D, E].
"""

from __future__ import annotations

import re
from typing import Any

import ml_collections
import numpy as np

from jaxsi.models import decoder

LLAMA_FAMILY = ("llama", "mistral", "qwen2")
MODEL_TYPES = ("gpt2",) + LLAMA_FAMILY
GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")

# Checkpoint entries that hold no learned weights (causal-mask buffers, rotary tables).
_IGNORED = re.compile(r"(^|\.)(attn\.bias|attn\.masked_bias|rotary_emb\.inv_freq)$")


def _get(hf: dict[str, Any], key: str, default: Any = None) -> Any:
  value = hf.get(key)
  return default if value is None else value


def _rope_theta(hf: dict[str, Any]) -> float:
  """The rotary base, from transformers 5 `rope_parameters` or older `rope_theta`/`rope_scaling`."""
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
  if rope_type not in (None, "default"):
    raise ValueError(f"Rotary scaling type {rope_type!r} is not supported; only 'default' "
                     "(no scaling) is.")
  return float(params.get("rope_theta") or _get(hf, "rope_theta", 10000.0))


def config_from_hf(hf_config: dict[str, Any]) -> ml_collections.ConfigDict:
  """jaxsi decoder config from a Hugging Face `config.json` dict.

  Dropout is set to 0; set `dropout_rate` through `from_pretrained` overrides.
  """
  model_type = hf_config.get("model_type")
  if model_type == "gpt2":
    return _gpt2_config(hf_config)
  if model_type in LLAMA_FAMILY:
    return _llama_config(hf_config)
  raise ValueError(f"Hugging Face model_type {model_type!r} is not a supported decoder; "
                   f"accepted: {list(MODEL_TYPES)}.")


def _gpt2_config(hf: dict[str, Any]) -> ml_collections.ConfigDict:
  activation = _get(hf, "activation_function", "gelu_new")
  if activation not in GPT2_ACTIVATIONS:
    raise ValueError(f"GPT-2 activation_function {activation!r} is not supported; "
                     f"accepted: {list(GPT2_ACTIVATIONS)}.")
  for key, supported in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                         ("add_cross_attention", False)):
    if _get(hf, key, supported) != supported:
      raise ValueError(f"GPT-2 config {key}={hf[key]!r} is not supported; only {supported}.")
  d_model, num_heads = hf["n_embd"], hf["n_head"]
  cfg = decoder.default_config("gpt2")
  cfg.update(
      vocab_size=hf["vocab_size"], d_model=d_model, num_layers=hf["n_layer"],
      num_heads=num_heads, num_kv_heads=num_heads, head_dim=d_model // num_heads,
      d_ff=_get(hf, "n_inner", 4 * d_model), max_len=hf["n_positions"],
      norm_eps=float(_get(hf, "layer_norm_epsilon", 1e-5)),
      tie_embeddings=bool(_get(hf, "tie_word_embeddings", True)),
      attention_bias=True, attention_out_bias=True, mlp_bias=True, dropout_rate=0.0)
  return cfg


def _llama_config(hf: dict[str, Any]) -> ml_collections.ConfigDict:
  model_type = hf["model_type"]
  activation = _get(hf, "hidden_act", "silu")
  if activation != "silu":
    raise ValueError(f"{model_type} hidden_act {activation!r} is not supported; only 'silu'.")
  d_model, num_heads = hf["hidden_size"], hf["num_attention_heads"]
  max_len = hf["max_position_embeddings"]
  # Sliding-window attention equals full attention on sequences no longer than
  # the window, so cap the length instead of implementing the window.
  window = hf.get("sliding_window")
  if window and (model_type == "mistral" or hf.get("use_sliding_window")):
    max_len = min(max_len, window)
  if model_type == "qwen2":
    qkv_bias, out_bias, mlp_bias = True, False, False
  elif model_type == "llama":
    qkv_bias = out_bias = bool(_get(hf, "attention_bias", False))
    mlp_bias = bool(_get(hf, "mlp_bias", False))
  else:
    qkv_bias = out_bias = mlp_bias = False
  cfg = decoder.default_config("llama")
  cfg.update(
      vocab_size=hf["vocab_size"], d_model=d_model, num_layers=hf["num_hidden_layers"],
      num_heads=num_heads, num_kv_heads=_get(hf, "num_key_value_heads", num_heads),
      head_dim=_get(hf, "head_dim", d_model // num_heads), d_ff=hf["intermediate_size"],
      max_len=max_len, norm_eps=float(_get(hf, "rms_norm_eps", 1e-6)),
      rope_theta=_rope_theta(hf), tie_embeddings=bool(_get(hf, "tie_word_embeddings", False)),
      attention_bias=qkv_bias, attention_out_bias=out_bias, mlp_bias=mlp_bias,
      dropout_rate=0.0)
  return cfg


class _Tensors:
  """Named checkpoint tensors, tolerant of a missing or extra model prefix; tracks use."""

  def __init__(self, tensors: dict[str, np.ndarray], prefix: str):
    self._tensors = {}
    for name, value in tensors.items():
      if not name.startswith(prefix) and not name.startswith("lm_head."):
        name = prefix + name
      self._tensors[name] = value
    self._used: set[str] = set()

  def take(self, name: str) -> np.ndarray:
    if name not in self._tensors:
      raise ValueError(f"Checkpoint lacks tensor {name!r}; it has e.g. "
                       f"{sorted(self._tensors)[:8]}.")
    self._used.add(name)
    return np.asarray(self._tensors[name], np.float32)

  def has(self, name: str) -> bool:
    return name in self._tensors

  def check_all_used(self, also_ignored: tuple[str, ...] = ()) -> None:
    left = sorted(n for n in self._tensors
                  if n not in self._used and n not in also_ignored and not _IGNORED.search(n))
    if left:
      raise ValueError(f"Checkpoint tensors {left[:8]} have no place in the jaxsi model; "
                       "the config and the weights disagree.")


def params_from_hf(tensors: dict[str, np.ndarray], config: ml_collections.ConfigDict) -> dict:
  """jaxsi decoder params (numpy float32) from Hugging Face PyTorch-named tensors."""
  if config.variant == "gpt2":
    return _gpt2_params(_Tensors(tensors, "transformer."), config)
  return _llama_params(_Tensors(tensors, "model."), config)


def _gpt2_params(t: _Tensors, cfg: ml_collections.ConfigDict) -> dict:
  e, h, d = cfg.d_model, cfg.num_heads, cfg.head_dim

  def norm(name):
    return {"scale": t.take(f"{name}.weight"), "bias": t.take(f"{name}.bias")}

  params: dict[str, Any] = {
      "embed": {"embedding": t.take("transformer.wte.weight")},
      "pos_embed": {"embedding": t.take("transformer.wpe.weight")},
      "final_norm": norm("transformer.ln_f"),
  }
  for i in range(cfg.num_layers):
    pre = f"transformer.h.{i}."
    q_w, k_w, v_w = np.split(t.take(pre + "attn.c_attn.weight"), 3, axis=1)
    q_b, k_b, v_b = np.split(t.take(pre + "attn.c_attn.bias"), 3)
    params[f"layer_{i}"] = {
        "attn_norm": norm(pre + "ln_1"),
        "attn": {
            "query": {"kernel": q_w.reshape(e, h, d), "bias": q_b.reshape(h, d)},
            "key": {"kernel": k_w.reshape(e, h, d), "bias": k_b.reshape(h, d)},
            "value": {"kernel": v_w.reshape(e, h, d), "bias": v_b.reshape(h, d)},
            "out": {"kernel": t.take(pre + "attn.c_proj.weight").reshape(h, d, e),
                    "bias": t.take(pre + "attn.c_proj.bias")},
        },
        "mlp_norm": norm(pre + "ln_2"),
        "mlp": {
            "wi": {"kernel": t.take(pre + "mlp.c_fc.weight"),
                   "bias": t.take(pre + "mlp.c_fc.bias")},
            "wo": {"kernel": t.take(pre + "mlp.c_proj.weight"),
                   "bias": t.take(pre + "mlp.c_proj.bias")},
        },
    }
  if not cfg.tie_embeddings:
    params["lm_head"] = {"kernel": t.take("lm_head.weight").T}
  t.check_all_used(also_ignored=("lm_head.weight",))
  return params


def _llama_params(t: _Tensors, cfg: ml_collections.ConfigDict) -> dict:
  e, h, k, d = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

  def linear(name, heads, bias):
    """A torch Linear [heads * D, E] -> kernel [E, heads, D] (+ bias [heads, D])."""
    out = {"kernel": t.take(f"{name}.weight").T.reshape(e, heads, d)}
    if bias:
      out["bias"] = t.take(f"{name}.bias").reshape(heads, d)
    return out

  def dense(name, bias):
    out = {"kernel": t.take(f"{name}.weight").T}
    if bias:
      out["bias"] = t.take(f"{name}.bias")
    return out

  params: dict[str, Any] = {
      "embed": {"embedding": t.take("model.embed_tokens.weight")},
      "final_norm": {"scale": t.take("model.norm.weight")},
  }
  for i in range(cfg.num_layers):
    pre = f"model.layers.{i}."
    out = {"kernel": t.take(pre + "self_attn.o_proj.weight").T.reshape(h, d, e)}
    if cfg.attention_out_bias:
      out["bias"] = t.take(pre + "self_attn.o_proj.bias")
    params[f"layer_{i}"] = {
        "attn_norm": {"scale": t.take(pre + "input_layernorm.weight")},
        "attn": {
            "query": linear(pre + "self_attn.q_proj", h, cfg.attention_bias),
            "key": linear(pre + "self_attn.k_proj", k, cfg.attention_bias),
            "value": linear(pre + "self_attn.v_proj", k, cfg.attention_bias),
            "out": out,
        },
        "mlp_norm": {"scale": t.take(pre + "post_attention_layernorm.weight")},
        "mlp": {
            "wi_0": dense(pre + "mlp.gate_proj", cfg.mlp_bias),
            "wi_1": dense(pre + "mlp.up_proj", cfg.mlp_bias),
            "wo": dense(pre + "mlp.down_proj", cfg.mlp_bias),
        },
    }
  if not cfg.tie_embeddings:
    params["lm_head"] = {"kernel": t.take("lm_head.weight").T}
  t.check_all_used(also_ignored=("lm_head.weight",))
  return params


def _llama_model_type(cfg: ml_collections.ConfigDict) -> str:
  """"qwen2" for query/key/value-only biases (its fixed layout), else "llama"."""
  if cfg.attention_bias and not cfg.attention_out_bias and not cfg.mlp_bias:
    return "qwen2"
  return "llama"


def params_to_hf(params: dict, config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """Hugging Face PyTorch-named float32 tensors from jaxsi decoder params.

  Biases the Hugging Face layout needs but the jaxsi model lacks are written as zeros.
  """
  params = _to_numpy(params)
  if config.variant == "gpt2":
    return _gpt2_to_hf(params, config)
  return _llama_to_hf(params, config)


def _to_numpy(tree: Any) -> Any:
  if isinstance(tree, dict):
    return {key: _to_numpy(value) for key, value in tree.items()}
  return np.asarray(tree, np.float32)


def _gpt2_to_hf(p: dict, cfg: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  e, h, d = cfg.d_model, cfg.num_heads, cfg.head_dim
  if cfg.num_kv_heads != h or h * d != e:
    raise ValueError(f"Hugging Face GPT-2 needs num_kv_heads == num_heads and "
                     f"num_heads * head_dim == d_model; got num_heads={h}, "
                     f"num_kv_heads={cfg.num_kv_heads}, head_dim={d}, d_model={e}.")

  def bias(layer, shape):
    return layer["bias"] if "bias" in layer else np.zeros(shape, np.float32)

  out = {
      "transformer.wte.weight": p["embed"]["embedding"],
      "transformer.wpe.weight": p["pos_embed"]["embedding"],
      "transformer.ln_f.weight": p["final_norm"]["scale"],
      "transformer.ln_f.bias": p["final_norm"]["bias"],
  }
  for i in range(cfg.num_layers):
    layer, pre = p[f"layer_{i}"], f"transformer.h.{i}."
    attn, mlp = layer["attn"], layer["mlp"]
    out.update({
        pre + "ln_1.weight": layer["attn_norm"]["scale"],
        pre + "ln_1.bias": layer["attn_norm"]["bias"],
        pre + "attn.c_attn.weight": np.concatenate(
            [attn[n]["kernel"].reshape(e, h * d) for n in ("query", "key", "value")], axis=1),
        pre + "attn.c_attn.bias": np.concatenate(
            [bias(attn[n], (h, d)).reshape(h * d) for n in ("query", "key", "value")]),
        pre + "attn.c_proj.weight": attn["out"]["kernel"].reshape(h * d, e),
        pre + "attn.c_proj.bias": bias(attn["out"], (e,)),
        pre + "ln_2.weight": layer["mlp_norm"]["scale"],
        pre + "ln_2.bias": layer["mlp_norm"]["bias"],
        pre + "mlp.c_fc.weight": mlp["wi"]["kernel"],
        pre + "mlp.c_fc.bias": bias(mlp["wi"], (cfg.d_ff,)),
        pre + "mlp.c_proj.weight": mlp["wo"]["kernel"],
        pre + "mlp.c_proj.bias": bias(mlp["wo"], (e,)),
    })
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = p["lm_head"]["kernel"].T
  return out


def _llama_to_hf(p: dict, cfg: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  e, h, k, d, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_ff
  model_type = _llama_model_type(cfg)
  # Hugging Face Llama's `attention_bias` covers q, k, v and o together; Qwen2 has q, k, v only.
  qkv_bias = cfg.attention_bias or (model_type == "llama" and cfg.attention_out_bias)
  out_bias = model_type == "llama" and qkv_bias

  def linear(layer, name, heads, with_bias):
    tensors = {f"{name}.weight": layer["kernel"].reshape(e, heads * d).T}
    if with_bias:
      b = layer.get("bias", np.zeros((heads, d), np.float32))
      tensors[f"{name}.bias"] = b.reshape(heads * d)
    return tensors

  def dense(layer, name, out_dim):
    tensors = {f"{name}.weight": layer["kernel"].T}
    if cfg.mlp_bias:
      tensors[f"{name}.bias"] = layer.get("bias", np.zeros((out_dim,), np.float32))
    return tensors

  out = {"model.embed_tokens.weight": p["embed"]["embedding"],
         "model.norm.weight": p["final_norm"]["scale"]}
  for i in range(cfg.num_layers):
    layer, pre = p[f"layer_{i}"], f"model.layers.{i}."
    attn, mlp = layer["attn"], layer["mlp"]
    out[pre + "input_layernorm.weight"] = layer["attn_norm"]["scale"]
    out[pre + "post_attention_layernorm.weight"] = layer["mlp_norm"]["scale"]
    out.update(linear(attn["query"], pre + "self_attn.q_proj", h, qkv_bias))
    out.update(linear(attn["key"], pre + "self_attn.k_proj", k, qkv_bias))
    out.update(linear(attn["value"], pre + "self_attn.v_proj", k, qkv_bias))
    out[pre + "self_attn.o_proj.weight"] = attn["out"]["kernel"].reshape(h * d, e).T
    if out_bias:
      out[pre + "self_attn.o_proj.bias"] = attn["out"].get("bias", np.zeros((e,), np.float32))
    out.update(dense(mlp["wi_0"], pre + "mlp.gate_proj", f))
    out.update(dense(mlp["wi_1"], pre + "mlp.up_proj", f))
    out.update(dense(mlp["wo"], pre + "mlp.down_proj", e))
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = p["lm_head"]["kernel"].T
  return out


def hf_config_from(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """A Hugging Face `config.json` dict for a jaxsi decoder config."""
  common = {"vocab_size": config.vocab_size, "tie_word_embeddings": bool(config.tie_embeddings),
            "dtype": "float32"}
  if config.variant == "gpt2":
    return dict(
        common, model_type="gpt2", architectures=["GPT2LMHeadModel"], n_embd=config.d_model,
        n_layer=config.num_layers, n_head=config.num_heads, n_inner=config.d_ff,
        n_positions=config.max_len, layer_norm_epsilon=config.norm_eps,
        activation_function="gelu_new", embd_pdrop=config.dropout_rate,
        resid_pdrop=config.dropout_rate, attn_pdrop=0.0)
  model_type = _llama_model_type(config)
  out = dict(
      common, model_type=model_type,
      architectures=["Qwen2ForCausalLM" if model_type == "qwen2" else "LlamaForCausalLM"],
      hidden_size=config.d_model, num_hidden_layers=config.num_layers,
      num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
      head_dim=config.head_dim, intermediate_size=config.d_ff,
      max_position_embeddings=config.max_len, rms_norm_eps=config.norm_eps,
      hidden_act="silu", rope_theta=config.rope_theta,
      rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
      attention_dropout=0.0)
  if model_type == "llama":
    out.update(attention_bias=bool(config.attention_bias or config.attention_out_bias),
               mlp_bias=bool(config.mlp_bias))
  return out
