"""Import and export of Hugging Face checkpoints (architecture-independent part).

A converter module per architecture family does the name and layout mapping;
it exposes exactly:

  config_from_hf(hf_config: dict) -> ConfigDict
  params_from_hf(tensors: dict[str, np.ndarray], config) -> params
  params_to_hf(params, config) -> dict[str, np.ndarray]
  hf_config_from(config) -> dict

Tensor names are always those of the PyTorch checkpoints; weights stored in a
Hugging Face Flax `flax_model.msgpack` are renamed to them on load.

Converters see the unscanned layout only (one subtree per layer); models with
`scan_layers=True` are converted to and from it here (`jaxsi.models.layer_stack`).
"""

from __future__ import annotations

import glob
import importlib
import json
import os
import tempfile
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import PartitionSpec

from jaxsi.models import layer_stack
from jaxsi.models.lm import LanguageModel

# Hugging Face model_type -> converter module.
CONVERTERS = {
    "gpt2": "jaxsi.models.hf_decoder",
    "llama": "jaxsi.models.hf_decoder",
    "mistral": "jaxsi.models.hf_decoder",
    "qwen2": "jaxsi.models.hf_decoder",
    "t5": "jaxsi.models.hf_t5",
}
# jaxsi model family -> converter module (for export).
FAMILY_CONVERTERS = {
    "decoder": "jaxsi.models.hf_decoder",
    "t5": "jaxsi.models.hf_t5",
}
# Extra `from_pretrained` keyword that is not a model config key.
PAD_VOCAB_MULTIPLE = "pad_vocab_multiple"

_SAFETENSORS_INDEX = "model.safetensors.index.json"
_TORCH_INDEX = "pytorch_model.bin.index.json"
_FLAX_WEIGHTS = "flax_model.msgpack"
_TORCH_WEIGHTS = "pytorch_model.bin"


def converter_for_model_type(model_type: str | None):
  """The converter module for a Hugging Face `model_type`."""
  if model_type not in CONVERTERS:
    raise ValueError(f"Hugging Face model_type {model_type!r} is not supported; accepted: "
                     f"{sorted(CONVERTERS)}.")
  return importlib.import_module(CONVERTERS[model_type])


def converter_for_family(family: str | None):
  """The converter module for a jaxsi model family."""
  if family not in FAMILY_CONVERTERS:
    raise ValueError(f"Model family {family!r} has no Hugging Face converter; accepted: "
                     f"{sorted(FAMILY_CONVERTERS)}.")
  return importlib.import_module(FAMILY_CONVERTERS[family])


def resolve_checkpoint_dir(name_or_path: str) -> str:
  """A local directory as is; otherwise a hub id downloaded with `snapshot_download`."""
  if os.path.isdir(name_or_path):
    return name_or_path
  if os.path.exists(name_or_path):
    raise ValueError(f"Checkpoint path {name_or_path!r} is a file; pass the directory that "
                     "holds config.json and the weights.")
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  try:
    directory = huggingface_hub.snapshot_download(
        name_or_path, allow_patterns=["*.json", "*.safetensors"])
    if not _has_weights(directory):
      directory = huggingface_hub.snapshot_download(
          name_or_path, allow_patterns=["*.json", _FLAX_WEIGHTS, "pytorch_model*.bin"])
  except Exception as e:  # the hub raises many types; one message says what failed.
    raise ValueError(f"{name_or_path!r} is neither a local directory nor a Hugging Face hub "
                     f"model that could be downloaded ({type(e).__name__}: {e}).") from e
  return directory


def _has_weights(directory: str) -> bool:
  return bool(glob.glob(os.path.join(directory, "*.safetensors"))
              or os.path.exists(os.path.join(directory, _FLAX_WEIGHTS))
              or glob.glob(os.path.join(directory, "pytorch_model*.bin")))


def _float32(array: Any) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(array).astype(np.float32))


def _flax_msgpack_tensors(path: str) -> dict[str, np.ndarray]:
  """Hugging Face Flax weights renamed to the PyTorch names (Dense kernels transposed)."""
  from flax import serialization  # pylint: disable=g-import-not-at-top
  with open(path, "rb") as f:
    tree = serialization.msgpack_restore(f.read())
  flat = {}
  for path_keys, value in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = [str(k.key) for k in path_keys]
    leaf = names[-1]
    if leaf == "kernel":
      names[-1] = "weight"
      value = np.asarray(value).T if np.ndim(value) == 2 else value
    elif leaf in ("embedding", "scale"):
      names[-1] = "weight"
    flat[".".join(names)] = _float32(value)
  return flat


def load_checkpoint_tensors(directory: str) -> dict[str, np.ndarray]:
  """All weights of a checkpoint directory as float32 numpy arrays, by PyTorch name.

  Looks for, in order: `*.safetensors` (sharded via its index when present),
  `flax_model.msgpack`, `pytorch_model.bin` (sharded via its index; needs torch).
  """
  index = os.path.join(directory, _SAFETENSORS_INDEX)
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
    files = [os.path.join(directory, name) for name in files]
  else:
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
  if files:
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    tensors = {}
    for path in files:
      tensors.update({name: _float32(value) for name, value in load_file(path).items()})
    return tensors

  if os.path.exists(os.path.join(directory, _FLAX_WEIGHTS)):
    return _flax_msgpack_tensors(os.path.join(directory, _FLAX_WEIGHTS))

  index = os.path.join(directory, _TORCH_INDEX)
  files = []
  if os.path.exists(index):
    with open(index) as f:
      files = [os.path.join(directory, n) for n in sorted(set(json.load(f)["weight_map"].values()))]
  elif os.path.exists(os.path.join(directory, _TORCH_WEIGHTS)):
    files = [os.path.join(directory, _TORCH_WEIGHTS)]
  if files:
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ValueError(f"{directory!r} holds only PyTorch .bin weights and torch is not "
                       "installed; install torch or convert the checkpoint to safetensors.") from e
    tensors = {}
    for path in files:
      state = torch.load(path, map_location="cpu", weights_only=True)
      tensors.update({name: value.float().numpy() for name, value in state.items()})
    return tensors

  raise ValueError(f"No weights found in {directory!r}; looked for *.safetensors, "
                   f"{_SAFETENSORS_INDEX}, {_FLAX_WEIGHTS}, {_TORCH_WEIGHTS} and {_TORCH_INDEX}.")


def _apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> None:
  for key, value in overrides.items():
    if key not in config:
      raise ValueError(f"Unknown model config override {key!r}; valid keys are "
                       f"{sorted(config.keys()) + [PAD_VOCAB_MULTIPLE]}.")
    try:
      config[key] = value
    except TypeError as e:
      raise ValueError(f"Model config override {key}={value!r} has the wrong type for the "
                       f"current value {config[key]!r}.") from e


def _is_spec(x: Any) -> bool:
  return isinstance(x, PartitionSpec)


def _resize_vocab(lm_params: Any, axes: Any, new_size: int) -> Any:
  """Zero-pads or truncates every parameter dimension named "vocab" to `new_size`."""
  def resize(spec, leaf):
    leaf = np.asarray(leaf, np.float32)
    for dim, name in enumerate(tuple(spec)):
      if name != "vocab":
        continue
      if leaf.shape[dim] >= new_size:
        leaf = np.take(leaf, np.arange(new_size), axis=dim)
      else:
        widths = [(0, 0)] * leaf.ndim
        widths[dim] = (0, new_size - leaf.shape[dim])
        leaf = np.pad(leaf, widths)
    return leaf
  return jax.tree.map(resize, axes, lm_params, is_leaf=_is_spec)


def _check_params_match(lm: LanguageModel, params: Any, overrides: dict[str, Any]) -> None:
  """Fails with the first parameter whose path or shape differs from the model's."""
  context = (f"the model config (after overrides {overrides})" if overrides
             else "the model config")
  expected = dict(jax.tree_util.tree_flatten_with_path(lm.abstract_params())[0])
  got = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  for path in sorted(set(expected) | set(got), key=str):
    name = jax.tree_util.keystr(path)
    if path not in got:
      raise ValueError(f"The checkpoint lacks parameter {name} that {context} expects.")
    if path not in expected:
      raise ValueError(f"The checkpoint has parameter {name} that {context} lacks.")
    if tuple(expected[path].shape) != tuple(np.shape(got[path])):
      raise ValueError(f"Parameter {name} has shape {tuple(np.shape(got[path]))} in the "
                       f"checkpoint but {tuple(expected[path].shape)} in {context}.")


def from_pretrained(name_or_path: str, **overrides: Any) -> tuple[LanguageModel, Any]:
  """Loads a Hugging Face checkpoint as a jaxsi model and its parameters.

  Args:
    name_or_path: a local checkpoint directory (works offline) or a hub model id.
    **overrides: jaxsi model config keys to change (e.g. dtype="bfloat16",
      dropout_rate=0.1), and optionally `pad_vocab_multiple=N`: pad the
      vocabulary dimension of the embedding/head with zero rows up to a multiple
      of N (the config then records `num_real_tokens`).

  Returns:
    (lm, params) with params a nested dict of numpy float32 arrays on the host.
  """
  from jaxsi.models import build  # pylint: disable=g-import-not-at-top
  directory = resolve_checkpoint_dir(name_or_path)
  config_path = os.path.join(directory, "config.json")
  if not os.path.exists(config_path):
    raise ValueError(f"Checkpoint directory {directory!r} has no config.json.")
  with open(config_path) as f:
    hf_config = json.load(f)
  converter = converter_for_model_type(hf_config.get("model_type"))
  config = converter.config_from_hf(hf_config)
  params = converter.params_from_hf(load_checkpoint_tensors(directory), config)

  pad_multiple = overrides.pop(PAD_VOCAB_MULTIPLE, None)
  if pad_multiple is not None and (not isinstance(pad_multiple, int) or pad_multiple < 1):
    raise ValueError(f"{PAD_VOCAB_MULTIPLE}={pad_multiple!r} must be a positive integer.")
  _apply_overrides(config, overrides)
  lm = build(config)
  if lm.config.get("scan_layers"):
    params = layer_stack.to_scanned(params, lm.config)
  _check_params_match(lm, params, overrides)
  if pad_multiple is not None:
    if "num_real_tokens" not in config:
      raise ValueError(f"{PAD_VOCAB_MULTIPLE} needs a model config with a num_real_tokens key; "
                       f"the {config.get('family')!r} config has none.")
    real = config.vocab_size
    padded = -(-real // pad_multiple) * pad_multiple
    if padded != real:
      params = _resize_vocab(params, lm.param_axes(), padded)
      config.vocab_size = padded
      config.num_real_tokens = real
      lm = build(config)
  return lm, params


def to_pretrained(lm: LanguageModel, params: Any, out_dir: str) -> None:
  """Writes `config.json` and `model.safetensors` that transformers can load.

  Vocabulary padding added by `pad_vocab_multiple` is removed again. Files are
  written to temporary names first and renamed, so a failure never leaves a
  half-written checkpoint over an existing one.

  Args:
    lm: the model (its config picks the converter).
    params: its parameters (host arrays, or device arrays, sharded across
      processes or not: every process must call this then; let only one write
      to a shared `out_dir`).
    out_dir: target directory, created if missing.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  converter = converter_for_family(lm.config.get("family"))
  config = ml_collections.ConfigDict(lm.config.to_dict())
  params = jax.tree.map(_host_float32, params)
  real = config.get("num_real_tokens")
  if real is not None and real < config.vocab_size:
    params = _resize_vocab(params, lm.param_axes(), real)
    config.vocab_size = real
  if "num_real_tokens" in config:
    config.num_real_tokens = None
  if config.get("scan_layers"):
    params = layer_stack.to_unscanned(params, config)
    config.scan_layers = False
  tensors = {name: np.ascontiguousarray(value, np.float32)
             for name, value in converter.params_to_hf(params, config).items()}
  hf_config = converter.hf_config_from(config)

  os.makedirs(out_dir, exist_ok=True)
  staged = []
  for name, write in (
      ("model.safetensors", lambda p: save_file(tensors, p, metadata={"format": "pt"})),
      ("config.json", lambda p: _write_json(hf_config, p))):
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=out_dir)
    os.close(fd)
    write(tmp)
    staged.append((tmp, os.path.join(out_dir, name)))
  for tmp, final in staged:
    os.replace(tmp, final)


def _host_float32(x: Any) -> np.ndarray:
  """A full host copy of a parameter, gathering it first if other processes hold shards."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x), np.float32)


def _write_json(obj: Any, path: str) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
