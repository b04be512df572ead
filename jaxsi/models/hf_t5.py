"""Hugging Face T5 <-> jaxsi T5: configs and weights (called by `jaxsi.models.hf`).

Weights follow transformers' `T5ForConditionalGeneration` state dict: torch `Linear` weights are
[out, in]; jaxsi keeps [in, out] with heads split out ([D, H, Dh] for queries/keys/values,
[H, Dh, D] for the attention output).

Tied or not: transformers 5 always ties in memory and records the v1.0 output scaling as
`scale_decoder_outputs`; older configs say `tie_word_embeddings`. jaxsi's `tie_embeddings`
means "logits from the shared embedding, scaled by d_model^-0.5", which is exactly
`scale_decoder_outputs` when present, else `tie_word_embeddings`.
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections
import numpy as np

from jaxsi.models import t5

_FEED_FORWARD = {"relu": "v1_0", "gated-gelu": "v1_1"}
_VARIANT_FEED_FORWARD = {v: k for k, v in _FEED_FORWARD.items()}

# Present in some checkpoints but unused by T5 (cross-attention has no position bias).
_IGNORED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)


def config_from_hf(hf_config: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A jaxsi T5 config from a transformers T5 `config.json` dict.

  Raises:
    ValueError: not a T5 config, or a feed-forward kind jaxsi does not implement.
  """
  model_type = hf_config.get("model_type")
  if model_type != "t5":
    raise ValueError(f"HF model_type {model_type!r} is not 't5'; jaxsi.models.hf_t5 converts "
                     "only T5.")
  feed_forward = hf_config.get("feed_forward_proj", "relu")
  if feed_forward not in _FEED_FORWARD:
    raise ValueError(f"HF T5 feed_forward_proj {feed_forward!r} is not supported; accepted values "
                     f"are {tuple(_FEED_FORWARD)}.")
  variant = _FEED_FORWARD[feed_forward]
  config = t5.default_config(variant)
  if "scale_decoder_outputs" in hf_config:
    tie = bool(hf_config["scale_decoder_outputs"])
  else:
    tie = bool(hf_config.get("tie_word_embeddings", True))
  num_layers = int(hf_config.get("num_layers", 6))
  num_decoder_layers = hf_config.get("num_decoder_layers")
  start = hf_config.get("decoder_start_token_id")
  if start is None:
    start = hf_config.get("pad_token_id", 0)
  config.update(dict(
      vocab_size=int(hf_config.get("vocab_size", 32128)),
      d_model=int(hf_config.get("d_model", 512)),
      num_layers=num_layers,
      num_decoder_layers=int(num_layers if num_decoder_layers is None else num_decoder_layers),
      num_heads=int(hf_config.get("num_heads", 8)),
      head_dim=int(hf_config.get("d_kv", 64)),
      d_ff=int(hf_config.get("d_ff", 2048)),
      relative_attention_num_buckets=int(hf_config.get("relative_attention_num_buckets", 32)),
      relative_attention_max_distance=int(hf_config.get("relative_attention_max_distance", 128)),
      dropout_rate=float(hf_config.get("dropout_rate", 0.1)),
      norm_eps=float(hf_config.get("layer_norm_epsilon", 1e-6)),
      tie_embeddings=tie,
      decoder_start_token_id=int(start or 0),
  ))
  t5.dims_from_config(config)
  return config


def hf_config_from(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """A transformers `config.json` dict for `T5ForConditionalGeneration` from a jaxsi T5 config."""
  t5.dims_from_config(config)
  return {
      "model_type": "t5",
      "architectures": ["T5ForConditionalGeneration"],
      "is_encoder_decoder": True,
      "vocab_size": int(config.vocab_size),
      "d_model": int(config.d_model),
      "d_kv": int(config.head_dim),
      "d_ff": int(config.d_ff),
      "num_layers": int(config.num_layers),
      "num_decoder_layers": int(config.num_decoder_layers),
      "num_heads": int(config.num_heads),
      "relative_attention_num_buckets": int(config.relative_attention_num_buckets),
      "relative_attention_max_distance": int(config.relative_attention_max_distance),
      "dropout_rate": float(config.dropout_rate),
      "layer_norm_epsilon": float(config.norm_eps),
      "feed_forward_proj": _VARIANT_FEED_FORWARD[config.variant],
      "tie_word_embeddings": bool(config.tie_embeddings),
      "scale_decoder_outputs": bool(config.tie_embeddings),
      "decoder_start_token_id": int(config.decoder_start_token_id),
      # T5's tokenizers use pad = decoder start = 0 and EOS = 1.
      "pad_token_id": int(config.decoder_start_token_id),
      "eos_token_id": 1,
  }


def _attention_names(prefix: str) -> dict[str, str]:
  return {"query": f"{prefix}.q.weight", "key": f"{prefix}.k.weight",
          "value": f"{prefix}.v.weight", "out": f"{prefix}.o.weight"}


def _mlp_names(prefix: str, gated: bool) -> dict[str, str]:
  inputs = ({"wi_0": f"{prefix}.wi_0.weight", "wi_1": f"{prefix}.wi_1.weight"} if gated
            else {"wi": f"{prefix}.wi.weight"})
  return {**inputs, "wo": f"{prefix}.wo.weight"}


def _layer_names(dims: t5.T5Dims) -> dict[tuple[str, ...], str]:
  """jaxsi parameter path -> HF name, for every parameter except the embedding and the head."""
  names: dict[tuple[str, ...], str] = {}
  for stack, num_layers in (("encoder", dims.num_layers), ("decoder", dims.num_decoder_layers)):
    names[(stack, "relpos_bias", "rel_embedding")] = (
        f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    names[(stack, "final_norm", "scale")] = f"{stack}.final_layer_norm.weight"
    for i in range(num_layers):
      block = f"{stack}.block.{i}.layer"
      layer = (stack, f"layers_{i}")
      if stack == "encoder":
        blocks = {"attention": (0, "SelfAttention", "pre_attention_norm")}
        mlp_index = 1
      else:
        blocks = {"self_attention": (0, "SelfAttention", "pre_self_attention_norm"),
                  "cross_attention": (1, "EncDecAttention", "pre_cross_attention_norm")}
        mlp_index = 2
      for module, (index, hf_module, norm) in blocks.items():
        for ours, theirs in _attention_names(f"{block}.{index}.{hf_module}").items():
          names[layer + (module, ours)] = theirs
        names[layer + (norm, "scale")] = f"{block}.{index}.layer_norm.weight"
      for ours, theirs in _mlp_names(f"{block}.{mlp_index}.DenseReluDense",
                                     dims.gated_gelu).items():
        names[layer + ("mlp", ours)] = theirs
      names[layer + ("pre_mlp_norm", "scale")] = f"{block}.{mlp_index}.layer_norm.weight"
  return names


def _from_torch(leaf: str, weight: np.ndarray, dims: t5.T5Dims) -> np.ndarray:
  """Converts one HF weight to the jaxsi layout of the parameter named `leaf`."""
  if leaf in ("query", "key", "value"):
    return weight.T.reshape(dims.d_model, dims.num_heads, dims.head_dim)
  if leaf == "out":
    return weight.T.reshape(dims.num_heads, dims.head_dim, dims.d_model)
  if leaf in ("wi", "wi_0", "wi_1", "wo"):
    return weight.T
  return weight  # norm scales [D] and the bucket table [buckets, heads] share HF's layout


def _to_torch(leaf: str, param: np.ndarray, dims: t5.T5Dims) -> np.ndarray:
  """Inverse of `_from_torch`."""
  if leaf in ("query", "key", "value"):
    return param.reshape(dims.d_model, dims.num_heads * dims.head_dim).T
  if leaf == "out":
    return param.reshape(dims.num_heads * dims.head_dim, dims.d_model).T
  if leaf in ("wi", "wi_0", "wi_1", "wo"):
    return param.T
  return param


def _set(tree: dict, path: tuple[str, ...], value: np.ndarray) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def params_from_hf(tensors: Mapping[str, np.ndarray],
                   config: ml_collections.ConfigDict) -> dict[str, Any]:
  """jaxsi T5 parameters (float32 NumPy) from a transformers T5 state dict.

  Args:
    tensors: HF name -> array, e.g. from `safetensors.numpy.load_file`.
    config: the jaxsi config (from `config_from_hf`).

  Returns:
    A parameter tree like `T5LM(config).init(rng)`.

  Raises:
    KeyError: a weight the config needs is missing.
    ValueError: a weight has the wrong shape, or the checkpoint holds weights this config
      does not use (the config does not describe the checkpoint).
  """
  dims = t5.dims_from_config(config)
  expected = t5.T5LM(config).abstract_params()
  used = set(_IGNORED) | {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}

  def take(name: str) -> np.ndarray:
    if name not in tensors:
      raise KeyError(f"HF T5 checkpoint lacks {name!r}, which this config "
                     f"(variant {config.variant}, {dims.num_layers}+{dims.num_decoder_layers} "
                     f"layers) needs.")
    used.add(name)
    return np.asarray(tensors[name], dtype=np.float32)

  embedding_name = "shared.weight"
  if embedding_name not in tensors and "encoder.embed_tokens.weight" in tensors:
    embedding_name = "encoder.embed_tokens.weight"
  embedding = take(embedding_name)
  params: dict[str, Any] = {"token_embedder": {"embedding": embedding}}
  if not dims.tie_embeddings:
    # A checkpoint may tie the head without the v1.0 scaling; then the head is the embedding.
    head = take("lm_head.weight") if "lm_head.weight" in tensors else embedding
    params["logits_dense"] = np.ascontiguousarray(head.T)
  elif "lm_head.weight" in tensors:
    # Tied checkpoints may store the head too; it must then be the embedding itself.
    if not np.array_equal(take("lm_head.weight"), embedding):
      raise ValueError("HF T5 checkpoint has an lm_head.weight different from shared.weight but "
                       "its config ties them; set tie_word_embeddings=false in its config.json.")
  for path, name in _layer_names(dims).items():
    _set(params, path, np.ascontiguousarray(_from_torch(path[-1], take(name), dims)))

  unused = sorted(set(tensors) - used)
  if unused:
    raise ValueError(f"HF T5 checkpoint holds weights this config does not use, e.g. {unused[:3]}; "
                     f"check num_layers, num_decoder_layers and feed_forward_proj.")
  flat_expected = _flatten(expected)
  for path, leaf in _flatten(params).items():
    if path not in flat_expected:
      raise ValueError(f"Converted parameter {'/'.join(path)} is not a T5 parameter.")
    if tuple(leaf.shape) != tuple(flat_expected[path].shape):
      raise ValueError(f"HF T5 weight for {'/'.join(path)} converts to shape {tuple(leaf.shape)}; "
                       f"the config expects {tuple(flat_expected[path].shape)}.")
  return params


def params_to_hf(params: Mapping[str, Any],
                 config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """A transformers `T5ForConditionalGeneration` state dict (float32 NumPy) from jaxsi params.

  Holds `shared.weight` and its copies `encoder.embed_tokens.weight` and
  `decoder.embed_tokens.weight`, and `lm_head.weight` when the head is untied.
  """
  dims = t5.dims_from_config(config)
  embedding = np.asarray(params["token_embedder"]["embedding"], dtype=np.float32)
  tensors = {
      "shared.weight": embedding,
      "encoder.embed_tokens.weight": embedding.copy(),
      "decoder.embed_tokens.weight": embedding.copy(),
  }
  if not dims.tie_embeddings:
    tensors["lm_head.weight"] = np.asarray(params["logits_dense"], dtype=np.float32).T
  for path, name in _layer_names(dims).items():
    tensors[name] = _to_torch(path[-1], np.asarray(_get(params, path), dtype=np.float32), dims)
  return {name: np.ascontiguousarray(value) for name, value in tensors.items()}


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, prefix + (key,)))
    else:
      flat[prefix + (key,)] = value
  return flat
