"""Parameters from elsewhere: a finished jaxsi run, or a Hugging Face checkpoint.

Used to start a run from trained weights (`init_from`), to load a frozen teacher or base
model, and to export. A *source* is either a jaxsi workdir (it has a `checkpoints/` folder),
or anything `jaxsi.models.from_pretrained` accepts (a local HF directory, or a hub id).

Parameters come in the layer layout of their source (scanned or not, see
`jaxsi.models.layer_stack`); `load(..., like=lm)` converts them to the layout of `lm`, e.g. to
start a scanned run from a Hugging Face checkpoint.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from jaxsi import checkpoint as checkpoint_lib
from jaxsi import partitioning
from jaxsi.models import build
from jaxsi.models import layer_stack
from jaxsi.models.lm import LanguageModel


def is_workdir(source: str) -> bool:
  """Whether `source` is a jaxsi run directory."""
  return os.path.isdir(os.path.join(source, "checkpoints"))


def stored_config(workdir: str, step: int | None = None) -> tuple[int, ml_collections.ConfigDict]:
  """(step, resolved config) stored with a checkpoint of `workdir` (latest step by default).

  Raises:
    FileNotFoundError: the workdir has no checkpoint (or not that step).
  """
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    steps = checkpointer.all_steps()
    if not steps:
      raise FileNotFoundError(f"{workdir!r} has no checkpoint; train it first or point to "
                              "another run or a Hugging Face checkpoint.")
    step = steps[-1] if step is None else step
    if step not in steps:
      raise FileNotFoundError(f"{workdir!r} has no checkpoint at step {step}; it has {steps}.")
    return step, ml_collections.ConfigDict(checkpointer.read_json(step, "config"))
  finally:
    checkpointer.close()


def _place(params: Any, lm: LanguageModel, mesh: Mesh | None) -> Any:
  if mesh is None:
    return jax.tree.map(np.asarray, params)
  shardings = partitioning.shardings_for(lm.param_axes(), lm.abstract_params(), mesh)
  return jax.device_put(params, shardings)


def load_workdir(workdir: str, *, mesh: Mesh | None = None, step: int | None = None
                 ) -> tuple[LanguageModel, Any, ml_collections.ConfigDict]:
  """The model and parameters of a jaxsi run.

  Only the parameters are read (the optimizer state stays on disk), directly into the layout
  they will be used in: sharded over `mesh` when one is given (so a large teacher never has to
  fit on one device), else on one device and returned as NumPy arrays.

  Returns:
    (lm, params, the run's stored config).
  """
  step, config = stored_config(workdir, step)
  lm = build(config.model)
  if config.objective.get("name") == "sequencematch":
    # The run trained a model grown by the <bksp> row; its stored config is the un-grown one.
    from jaxsi import sm_batches
    lm = sm_batches.with_backspace(lm, config.objective)
  abstract = lm.abstract_params()
  target_mesh = mesh if mesh is not None else Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1),
                                                   partitioning.MESH_AXES)
  shardings = partitioning.shardings_for(lm.param_axes(), abstract, target_mesh)
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    params = checkpointer.restore_params(
        checkpoint_lib.abstract_with_shardings(abstract, shardings), step)
  finally:
    checkpointer.close()
  return lm, params if mesh is not None else jax.tree.map(np.asarray, params), config


def in_layout_of(like: LanguageModel, lm: LanguageModel, params: Any
                 ) -> tuple[LanguageModel, Any]:
  """`lm` and its `params` with the layers stacked (or not) as in `like`.

  Only the layer layout changes (`scan_layers`); sizes, vocabulary and the rest of `lm`'s config
  stay its own. The parameters keep their NumPy or jax type; placement is the caller's.
  """
  scanned = bool(like.config.get("scan_layers"))
  if bool(lm.config.get("scan_layers")) == scanned:
    return lm, params
  config = copy.deepcopy(lm.config)
  config.scan_layers = scanned
  return build(config), layer_stack.to_layout(params, lm.config, scanned)


def load(source: str, *, mesh: Mesh | None = None, like: LanguageModel | None = None
         ) -> tuple[LanguageModel, Any]:
  """(lm, params) from a jaxsi workdir or a Hugging Face checkpoint (directory or hub id).

  Args:
    source: a jaxsi run directory, a Hugging Face directory or a hub id.
    mesh: shard the parameters over it (else NumPy arrays on the host).
    like: convert to the layer layout (scanned or not) of this model; None keeps the source's.
  """
  if is_workdir(source):
    lm, params, _ = load_workdir(source, mesh=mesh)
    if like is None:
      return lm, params
    converted_lm, converted = in_layout_of(like, lm, params)
    if converted_lm is lm:
      return lm, params
    return converted_lm, _place(converted, converted_lm, mesh)
  looks_local = os.path.isabs(source) or source.startswith(".") or os.path.exists(source) \
      or "://" in source or source.count("/") > 1
  if looks_local and not os.path.exists(os.path.join(source, "config.json")):
    raise FileNotFoundError(f"{source!r} is neither a jaxsi run (no checkpoints/) nor a Hugging "
                            "Face checkpoint (no config.json); pass a run directory, a Hugging "
                            "Face directory, or a hub id like 'google/flan-t5-small'.")
  from jaxsi.models import from_pretrained
  lm, params = from_pretrained(source)
  if like is not None:
    lm, params = in_layout_of(like, lm, params)
  return lm, _place(params, lm, mesh)


def check_compatible(expected_abstract: Any, params: Any, source: str) -> None:
  """Raises ValueError naming the first leaf whose path or shape differs from the model's."""
  want = {jax.tree_util.keystr(p): tuple(x.shape)
          for p, x in jax.tree_util.tree_flatten_with_path(expected_abstract)[0]}
  have = {jax.tree_util.keystr(p): tuple(np.shape(x))
          for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  for name, shape in want.items():
    if name not in have:
      raise ValueError(f"Parameters from {source!r} lack {name} that the configured model has; "
                       "make config.model match the checkpoint.")
    if have[name] != shape:
      raise ValueError(f"Parameter {name} from {source!r} has shape {have[name]} but the configured "
                       f"model expects {shape}; make config.model match the checkpoint.")
  extra = sorted(set(have) - set(want))
  if extra:
    raise ValueError(f"Parameters from {source!r} have {extra[0]} that the configured model lacks; "
                     "make config.model match the checkpoint.")
