"""The device mesh ("data", "fsdp", "tensor") and multi-process initialization."""

from __future__ import annotations

import logging
import os
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from jaxsi.partitioning import MESH_AXES


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None) -> None:
  """Calls `jax.distributed.initialize` when this run spans several processes.

  Explicit arguments win; otherwise JAX's cluster auto-detection (TPU VM pods, SLURM, ...) is
  used when it finds a multi-process environment, or `JAXSI_COORDINATOR`,
  `JAXSI_NUM_PROCESSES` and `JAXSI_PROCESS_ID` when set. A single process does nothing.
  """
  coordinator_address = coordinator_address or os.environ.get("JAXSI_COORDINATOR")
  if num_processes is None and "JAXSI_NUM_PROCESSES" in os.environ:
    num_processes = int(os.environ["JAXSI_NUM_PROCESSES"])
  if process_id is None and "JAXSI_PROCESS_ID" in os.environ:
    process_id = int(os.environ["JAXSI_PROCESS_ID"])
  if coordinator_address and num_processes and num_processes > 1:
    # Cross-process collectives for CPU devices (how tests and laptops run several processes);
    # GPU and TPU devices use their own and ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    logging.info("jax.distributed initialized: process %d of %d", jax.process_index(),
                 jax.process_count())
  elif any(v in os.environ for v in ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID")) and \
      int(os.environ.get("SLURM_NTASKS", os.environ.get("TPU_WORKER_COUNT", "2"))) > 1:
    jax.distributed.initialize()


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Fills one -1 entry so that the product equals `num_devices`.

  Raises:
    ValueError: more than one -1, or sizes that do not multiply to `num_devices`.
  """
  shape = [int(s) for s in shape]
  if shape.count(-1) > 1:
    raise ValueError(f"Mesh shape {tuple(shape)} has more than one -1; at most one axis can fill.")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"Mesh shape {tuple(shape)} cannot fill {num_devices} devices: "
                       f"{num_devices} is not divisible by {known}.")
    shape[shape.index(-1)] = num_devices // known
  if int(np.prod(shape)) != num_devices:
    raise ValueError(f"Mesh shape {tuple(shape)} (data, fsdp, tensor) uses {int(np.prod(shape))} "
                     f"devices but {num_devices} are available; use -1 on one axis to fill.")
  return tuple(shape)


def build_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with axes ("data", "fsdp", "tensor") from `mesh_config.{data,fsdp,tensor}`.

  Args:
    mesh_config: ConfigDict with integer fields data, fsdp, tensor (one may be -1).
    devices: devices to use (default: all of `jax.devices()`).
  """
  devices = list(devices if devices is not None else jax.devices())
  shape = resolve_mesh_shape((mesh_config.data, mesh_config.fsdp, mesh_config.tensor), len(devices))
  if devices == list(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
              axis_types=(AxisType.Auto,) * len(MESH_AXES))


_SYNC_COUNTS: dict[str, int] = {}


def sync_processes(name: str, timeout_s: int = 1800) -> None:
  """Waits until every process of the run reaches this point; a no-op for one process.

  Gloo gives up on a cross-process collective whose peers arrive more than 30 s apart (not
  configurable), which happens when one host is still importing, building or compiling. The
  coordination service's barrier waits up to `timeout_s`, so callers place one just before a
  first collective.
  """
  if jax.process_count() == 1:
    return
  count = _SYNC_COUNTS.get(name, 0)
  _SYNC_COUNTS[name] = count + 1
  from jax._src import distributed  # the client of jax.distributed.initialize
  distributed.global_state.client.wait_at_barrier(f"jaxsi/{name}/{count}", timeout_s * 1000)


def compile_together(jitted, name: str):
  """Wraps a jitted function: its first call for new argument shapes compiles, then waits for
  every process (`sync_processes`), then runs, so its collectives start together.

  Single-process runs call `jitted` directly.
  """
  seen: set = set()

  def call(*args):
    if jax.process_count() > 1:
      leaves, tree = jax.tree.flatten(args)
      key = (str(tree), tuple((getattr(x, "shape", None), str(getattr(x, "dtype", type(x))))
                              for x in leaves))
      if key not in seen:
        jitted.lower(*args).compile()  # fills the cache the call below uses
        sync_processes(name)
        seen.add(key)
    return jitted(*args)

  call.jitted = jitted
  return call
