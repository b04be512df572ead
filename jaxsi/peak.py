"""Device peaks: the matmul FLOP/s MFU divides by, and the memory a compiled step takes.

MFU (model FLOPs utilization) = model FLOPs per second (`jaxsi.flops`) ÷ the peak FLOP/s of
the devices. The peak is measured, not looked up in a table of datasheets: a jitted chain of
square matmuls in the model's dtype, timed on the devices themselves. It is what a perfectly
fed matmul achieves under the current jax configuration (TF32 on GPUs when float32 matmuls use
it, the same precision the model gets), so it is somewhat below datasheet numbers and MFU
somewhat above the datasheet-based figure. Set `JAXSI_PEAK_FLOPS` to a datasheet peak per
device to use that instead, or to 0 to skip MFU.

Measuring all local devices at once (`devices=jax.local_devices()`) rather than one device and
multiplying gives the right total both for real accelerators (independent) and for the fake
CPU devices of tests (which share the host's cores).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PEAK_ENV = "JAXSI_PEAK_FLOPS"

# A size is large enough once one matmul takes this long: launch overhead is then negligible and
# the matmul fills the device (too small a matrix leaves a GPU's cores idle).
_MIN_MATMUL_SECONDS = 1e-3
# Each timed call chains enough matmuls to take about this long.
_CALL_SECONDS = 0.01
_START_SIZE = 256
_MAX_SIZE = 8192

_measured: dict[tuple, float] = {}


def _chain(x_DxNxN: jax.Array, w_DxNxN: jax.Array, count: jax.Array) -> jax.Array:
  """`count` dependent matmuls x ← x·w per device (a loop XLA cannot shorten or fuse away)."""
  return jax.lax.fori_loop(0, count, lambda _, x: jnp.matmul(x, w_DxNxN), x_DxNxN)


def _operands(size: int, dtype: Any, sharding: jax.sharding.Sharding, num_devices: int):
  """Stacked [D, size, size] operands: x random, w a Householder reflection.

  w is orthogonal, so the chain neither overflows nor decays into denormals (which slow some
  CPUs down); a dense matmul's cost does not depend on the values.
  """
  rng = np.random.default_rng(0)
  v = rng.standard_normal(size).astype(np.float32)
  w = np.eye(size, dtype=np.float32) - 2.0 * np.outer(v, v) / np.dot(v, v)
  x = rng.standard_normal((size, size)).astype(np.float32) / math.sqrt(size)
  stack = lambda a: jax.device_put(np.broadcast_to(a, (num_devices, size, size)),
                                    sharding).astype(dtype)
  return stack(x), stack(w)


def _seconds(fn, *args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def measure_matmul_peak(dtype: Any = jnp.float32, *, size: int | None = None, repeats: int = 5,
                        devices: Sequence[jax.Device] | None = None) -> float:
  """Matmul FLOP/s of `devices` together, measured once per process and cached.

  Each device multiplies its own [size, size] matrices in a jitted chain; a timed call runs
  enough of them to take ~10 ms, and the result is the median over `repeats` calls (each
  waiting for its result) after an untimed warm-up call. Costs 0.1-0.4 s on a CPU (sizes 256
  or 512); an accelerator tries more sizes (up to 6 compilations) before one matmul is slow
  enough to be timed reliably.

  Args:
    dtype: the matmul dtype (the model's compute dtype).
    size: matrix size; None picks the smallest power of two from 256 (at most 8192) whose single
      matmul takes at least 1 ms.
    repeats: timed calls; the median is returned.
    devices: the devices measured together; None = the default device alone.

  Returns:
    FLOP/s (2·size³ per matmul and device).
  """
  devices = tuple(devices) if devices is not None else (jax.devices()[0],)
  dtype = jnp.dtype(dtype)
  if size is not None and (not isinstance(size, int) or size < 1):
    raise ValueError(f"measure_matmul_peak size={size!r} must be a positive integer or None.")
  if not isinstance(repeats, int) or repeats < 1:
    raise ValueError(f"measure_matmul_peak repeats={repeats!r} must be a positive integer.")
  if not devices:
    raise ValueError("measure_matmul_peak got an empty device list.")
  key = (dtype.name, size, repeats, tuple(d.id for d in devices), devices[0].platform)
  if key not in _measured:
    _measured[key] = _measure(dtype, size, repeats, devices)
  return _measured[key]


def _measure(dtype, size, repeats, devices) -> float:
  mesh = jax.sharding.Mesh(np.asarray(devices), ("devices",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("devices"))
  chain = jax.jit(_chain, in_shardings=(sharding, sharding, None), out_shardings=sharding)
  n = size or _START_SIZE
  while True:
    x, w = _operands(n, dtype, sharding, len(devices))
    one = jnp.int32(1)
    _seconds(chain, x, w, one)  # compile and warm up
    single = min(_seconds(chain, x, w, one) for _ in range(3))
    if size is not None or single >= _MIN_MATMUL_SECONDS or n >= _MAX_SIZE:
      break
    n *= 2
  count = jnp.int32(max(1, round(_CALL_SECONDS / max(single, 1e-9))))
  _seconds(chain, x, w, count)
  median = statistics.median(_seconds(chain, x, w, count) for _ in range(repeats))
  return 2.0 * n ** 3 * int(count) * len(devices) / median


def run_peak_flops(dtype: Any = jnp.float32) -> float | None:
  """The peak FLOP/s of all devices of a run (every process), or None to skip MFU.

  `JAXSI_PEAK_FLOPS` set to a number: that many FLOP/s per device (e.g. from a datasheet), 0
  disables MFU. Unset: `measure_matmul_peak` over this process's local devices, times the
  process count (hosts are assumed alike).
  """
  setting = os.environ.get(PEAK_ENV, "").strip()
  if setting:
    try:
      per_device = float(setting)
    except ValueError:
      raise ValueError(f"{PEAK_ENV}={setting!r} is not a number; set it to a per-device peak "
                       "in FLOP/s (e.g. 9.89e14), or 0 to skip MFU.") from None
    return per_device * jax.device_count() if per_device > 0 else None
  return measure_matmul_peak(dtype, devices=jax.local_devices()) * jax.process_count()


def compiled_memory_bytes(compiled: Any) -> int | None:
  """Bytes a compiled computation holds at once: arguments + outputs − donated aliases + temps.

  From XLA's `compiled.memory_analysis()` (per device); None where the backend gives none.
  """
  try:
    stats = compiled.memory_analysis()
  except (NotImplementedError, AttributeError, RuntimeError):
    return None
  if stats is None:
    return None
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
             - stats.alias_size_in_bytes + stats.temp_size_in_bytes)


def device_peak_memory_bytes(device: jax.Device | None = None) -> int | None:
  """The device allocator's high-water mark (`memory_stats()["peak_bytes_in_use"]`), if any.

  GPUs and TPUs report it; CPUs do not (None).
  """
  device = device or jax.devices()[0]
  try:
    stats = device.memory_stats()
  except (NotImplementedError, AttributeError, RuntimeError):
    return None
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return int(stats["peak_bytes_in_use"])
