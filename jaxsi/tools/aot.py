"""Ahead-of-time compile of the full-size train step: per-device memory before renting a pod.

  python -m jaxsi.tools.aot --config=configs/xsum_sft.py:t5_large --devices=32 --mesh=1,32,1
  python -m jaxsi.tools.aot --config=configs/arithmetic_sft.py --devices=8 --json

The step is the one the trainer runs (`jaxsi.step.make_train_step` with the objective's loss,
the trainer's shardings and donation), lowered from abstract shapes only: the state comes from
`jax.eval_shape` and the batch from `ShapeDtypeStruct`s carrying their shardings, so no
parameter is ever allocated and a model far larger than this machine compiles. On
`--platform=cpu` (the default) the devices are `--devices` fake host devices; XLA's CPU
compiler then reports the per-device buffer sizes of the sharded program (`arguments` =
this device's shards of state and batch). Temporaries and generated code depend on the
backend, so treat those as an estimate of what a TPU or GPU compile would need; pass
`--platform=tpu` (or `gpu`) on a machine that has those devices for the exact figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from jaxsi import config as config_lib
from jaxsi import mesh as mesh_lib
from jaxsi import models
from jaxsi import objectives
from jaxsi import optim
from jaxsi import partitioning
from jaxsi import state as state_lib
from jaxsi import step as step_lib

USAGE = ("python -m jaxsi.tools.aot --config=configs/NAME.py[:variant] [--config.KEY=VALUE ...] "
         "--devices=N [--mesh=DATA,FSDP,TENSOR] [--platform=cpu] [--hbm_gib=16] [--json]")
PLATFORMS = ("cpu", "gpu", "tpu")
# Objectives this tool compiles: SFT, and GKD with the teacher built from `teacher.model`
# (abstract parameters, sharded like the trainer shards them).
SUPPORTED_OBJECTIVES = ("sft", "gkd")
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


class AotError(ValueError):
  """A config, device count or mesh the plan cannot use; the message is one sentence."""


def batch_structs(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
                  ) -> dict[str, jax.ShapeDtypeStruct]:
  """The global train batch as ShapeDtypeStructs sharded like the trainer's batches.

  Returns:
    `prompt`, `prompt_mask` [B, S] and `response`, `response_mask` [B, T], int32, with
    B = train.batch_size, S = data.max_prompt_len, T = data.max_response_len.
  """
  widths = {"prompt": config.data.max_prompt_len, "response": config.data.max_response_len}
  structs = {}
  for name in ("prompt", "prompt_mask", "response", "response_mask"):
    shape = (config.train.batch_size, widths[name.split("_")[0]])
    structs[name] = jax.ShapeDtypeStruct(shape, jnp.int32,
                                         sharding=partitioning.batch_sharding(mesh, 2))
  return structs


def shard_bytes(structs: Any) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard each)."""
  total = 0
  for struct in jax.tree.leaves(structs):
    shard_shape = struct.sharding.shard_shape(struct.shape)
    total += math.prod(shard_shape) * jnp.dtype(struct.dtype).itemsize
  return total


def _tree_bytes(tree: Any) -> int:
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def build_mesh(config: ml_collections.ConfigDict, num_devices: int,
               mesh_shape: Sequence[int] | None = None) -> jax.sharding.Mesh:
  """The ("data", "fsdp", "tensor") mesh over the first `num_devices` devices.

  Args:
    config: the experiment config (its `mesh` section is used when `mesh_shape` is None).
    num_devices: how many devices the plan is for.
    mesh_shape: (data, fsdp, tensor) sizes, one of them may be -1.

  Raises:
    AotError: too few devices, or a mesh shape that does not multiply to `num_devices`.
  """
  available = jax.devices()
  if num_devices < 1 or num_devices > len(available):
    raise AotError(
        f"--devices={num_devices} but this process has {len(available)} "
        f"{available[0].platform} device(s); run through `python -m jaxsi.tools.aot`, which "
        "creates that many fake CPU devices, or pass --devices between 1 and "
        f"{len(available)}.")
  shape = tuple(mesh_shape) if mesh_shape is not None else (
      config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  if len(shape) != len(partitioning.MESH_AXES):
    raise AotError(f"--mesh={','.join(str(s) for s in shape)} has {len(shape)} sizes; pass "
                   "three, DATA,FSDP,TENSOR (one may be -1).")
  try:
    resolved = mesh_lib.resolve_mesh_shape(shape, num_devices)
  except ValueError as e:
    raise AotError(str(e)) from None
  mesh_config = ml_collections.ConfigDict(dict(zip(partitioning.MESH_AXES, resolved)))
  return mesh_lib.build_mesh(mesh_config, devices=available[:num_devices])


def plan(config: ml_collections.ConfigDict, num_devices: int,
         mesh_shape: Sequence[int] | None = None, *, hbm_gib: float = 16.0) -> dict[str, Any]:
  """Lowers and compiles the train step for `num_devices` devices and reads its memory.

  Args:
    config: a loaded experiment config.
    num_devices: devices of the target slice (this process must have at least that many).
    mesh_shape: (data, fsdp, tensor); None uses `config.mesh`.
    hbm_gib: memory per device of the target accelerator, for the fits / does-not-fit verdict.

  Returns:
    A JSON-ready dict: mesh, parameter count and bytes, this device's share of the train state
    (`state_bytes_per_device`), `compiled.memory_analysis()` figures per device
    (`argument_bytes`, `output_bytes`, `temp_bytes`, `generated_code_bytes`, `alias_bytes`),
    their `total_bytes_per_device` (arguments + outputs - aliased + temporaries + code), and
    `fits` for the `hbm_gib` budget.

  Raises:
    AotError: an unsupported objective, a bad device count or mesh, or an indivisible batch.
  """
  objective = config.objective.name
  if objective not in SUPPORTED_OBJECTIVES:
    raise AotError(f"objective.name={objective!r} needs frozen (teacher) parameters this tool "
                   f"does not build yet; it compiles {', '.join(SUPPORTED_OBJECTIVES)} steps.")
  mesh = build_mesh(config, num_devices, mesh_shape)
  batch_shards = partitioning.mesh_size(mesh, partitioning.BATCH_MESH_AXES)
  if config.train.batch_size % batch_shards:
    raise AotError(f"train.batch_size={config.train.batch_size} is not divisible by the "
                   f"data x fsdp mesh size {batch_shards}; change --mesh or "
                   "--config.train.batch_size.")

  lm = models.build(config.model)
  tx = optim.build_optimizer(config.optim)
  init_rng = jax.random.PRNGKey(config.seed)
  abstract_state = jax.eval_shape(lambda r: state_lib.create(lm.init(r), tx), init_rng)
  state_shardings = state_lib.shardings(abstract_state, lm.param_axes(), mesh)
  state_structs = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_state, state_shardings)
  replicated = partitioning.replicated(mesh)
  batch = batch_structs(config, mesh)
  rng = jax.ShapeDtypeStruct(init_rng.shape, init_rng.dtype, sharding=replicated)
  frozen: dict = {}
  frozen_shardings: dict = {}
  teacher_bytes = 0
  if objective == "gkd":
    # The on-policy step's memory: student state + frozen teacher + both forwards. Sampling
    # runs as its own program before the step (student params + a KV cache).
    teacher_lm = models.build(config.teacher.model)
    teacher_abstract = teacher_lm.abstract_params()
    frozen_shardings = {"teacher": partitioning.shardings_for(teacher_lm.param_axes(),
                                                              teacher_abstract, mesh)}
    frozen = {"teacher": jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        teacher_abstract, frozen_shardings["teacher"])}
    teacher_bytes = _tree_bytes(teacher_abstract)
    loss_fn = objectives.make_loss_fn(config.objective, lm, teacher_lm=teacher_lm, eos_id=1)
  else:
    loss_fn = objectives.make_loss_fn(config.objective, lm)
  train_step = jax.jit(
      step_lib.make_train_step(loss_fn, tx),
      in_shardings=(state_shardings, frozen_shardings,
                    {k: v.sharding for k, v in batch.items()}, replicated),
      out_shardings=(state_shardings, replicated),
      donate_argnums=(0,))
  start = time.perf_counter()
  compiled = train_step.lower(state_structs, frozen, batch, rng).compile()
  compile_seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  if memory is None:
    raise AotError(f"The {mesh.devices.flat[0].platform} backend reports no memory analysis for "
                   "compiled programs; rerun with --platform=cpu.")

  figures = {
      "argument_bytes": int(memory.argument_size_in_bytes),
      "output_bytes": int(memory.output_size_in_bytes),
      "temp_bytes": int(memory.temp_size_in_bytes),
      "generated_code_bytes": int(memory.generated_code_size_in_bytes),
      "alias_bytes": int(memory.alias_size_in_bytes),
  }
  # Outputs aliased to donated arguments (the new state) reuse the arguments' buffers.
  total = (figures["argument_bytes"] + figures["output_bytes"] - figures["alias_bytes"] +
           figures["temp_bytes"] + figures["generated_code_bytes"])
  budget = int(hbm_gib * (1 << 30))
  return {
      "platform": mesh.devices.flat[0].platform,
      "num_devices": num_devices,
      "mesh": dict(mesh.shape),
      "param_count": sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_state.params)),
      "param_bytes": _tree_bytes(abstract_state.params),
      "opt_state_bytes": _tree_bytes(abstract_state.opt_state),
      "teacher_param_bytes": teacher_bytes,
      "state_bytes_per_device": shard_bytes(state_structs),
      "batch_bytes_per_device": shard_bytes(batch),
      **figures,
      "total_bytes_per_device": total,
      "hbm_bytes": budget,
      "fits": total <= budget,
      "compile_seconds": round(compile_seconds, 2),
  }


def _size(num_bytes: int) -> str:
  """Bytes in the largest unit that keeps the number >= 1, right-aligned for columns."""
  for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
    if abs(num_bytes) >= scale:
      return f"{num_bytes / scale:9.3f} {unit}"
  return f"{num_bytes:9d} B  "


def format_report(result: dict[str, Any], config_spec: str) -> str:
  """The plan as aligned text lines, ending with the fits / does-not-fit verdict."""
  mesh = " ".join(f"{axis}={size}" for axis, size in result["mesh"].items())
  lines = [
      f"config:      {config_spec}",
      f"devices:     {result['num_devices']} {result['platform']} (mesh {mesh})",
      f"parameters:  {result['param_count']:,} ({result['param_bytes'] / (1 << 20):,.1f} MiB); "
      f"optimizer state {result['opt_state_bytes'] / (1 << 20):,.1f} MiB",
      f"compiled in {result['compile_seconds']:.1f} s; per-device memory:",
  ]
  state_share = _size(result["state_bytes_per_device"]).strip()
  rows = (("arguments", "argument_bytes", f"train-state shards: {state_share}"),
          ("outputs", "output_bytes", ""),
          ("temporaries", "temp_bytes", ""),
          ("generated code", "generated_code_bytes", ""),
          ("aliased", "alias_bytes", "outputs reusing donated arguments, subtracted"),
          ("total", "total_bytes_per_device", ""))
  for label, key, note in rows:
    lines.append(f"  {label:<15} {_size(result[key])}" + (f"   ({note})" if note else ""))
  budget_gib = result["hbm_bytes"] / (1 << 30)
  verdict = "fits" if result["fits"] else "does NOT fit"
  lines.append(f"{verdict} in {budget_gib:g} GiB per device "
               f"({result['total_bytes_per_device'] / result['hbm_bytes']:.1%} used)")
  return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[tuple[str, str]]]:
  """Splits argv into the tool's flags and `--config.KEY=VALUE` overrides (in order)."""
  parser = argparse.ArgumentParser(prog="python -m jaxsi.tools.aot", usage=USAGE)
  parser.add_argument("--config", required=True, help="config file, optionally with :variant")
  parser.add_argument("--devices", type=int, required=True, help="devices of the target slice")
  parser.add_argument("--mesh", help="DATA,FSDP,TENSOR sizes (one may be -1); default: config")
  parser.add_argument("--platform", default="cpu", choices=PLATFORMS,
                      help="cpu: fake host devices; gpu/tpu: this machine's real devices")
  parser.add_argument("--hbm_gib", type=float, default=16.0, help="memory per device, GiB")
  parser.add_argument("--json", action="store_true", help="print one JSON line")
  try:
    rest, overrides = config_lib.split_overrides(argv)
  except config_lib.ConfigError as e:
    parser.error(str(e))
  return parser.parse_args(rest), overrides


def parse_mesh(text: str | None) -> tuple[int, ...] | None:
  """"8,1,1" -> (8, 1, 1); None stays None."""
  if text is None:
    return None
  if not re.fullmatch(r"\s*-?\d+\s*(,\s*-?\d+\s*)*", text):
    raise AotError(f"--mesh={text!r} is not a list of integers; pass DATA,FSDP,TENSOR such as "
                   "8,1,1 or -1,4,1.")
  return tuple(int(part) for part in text.split(","))


def use_fake_cpu_devices(count: int) -> None:
  """Makes the CPU backend expose `count` devices.

  XLA reads the flag when JAX first initializes a backend (the first device query), not at
  import, so this works as long as nothing has asked for devices yet.
  """
  flags = re.sub(rf"{_DEVICE_COUNT_FLAG}=\d+", "", os.environ.get("XLA_FLAGS", ""))
  os.environ["XLA_FLAGS"] = f"{flags} {_DEVICE_COUNT_FLAG}={count}".strip()
  jax.config.update("jax_platforms", "cpu")


def main(argv: Sequence[str] | None = None) -> int:
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  if args.devices < 1:
    print(f"error: --devices={args.devices} is invalid; pass a positive device count.",
          file=sys.stderr)
    return 2
  if args.platform == "cpu":
    use_fake_cpu_devices(args.devices)
  else:
    jax.config.update("jax_platforms", args.platform)
  try:
    config = config_lib.load(args.config, overrides)
    result = plan(config, args.devices, parse_mesh(args.mesh), hbm_gib=args.hbm_gib)
  except (AotError, config_lib.ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  result["config"] = args.config
  print(json.dumps(result) if args.json else format_report(result, args.config))
  return 0


if __name__ == "__main__":
  sys.exit(main())
