"""Before and while renting a pod: the AOT memory plan and the launchers' dry runs.

`python -m jaxsi.tools.aot` compiles the train step from abstract shapes and reads its memory;
`launch/tpu_vm.sh` and `launch/gpu_slurm.sh` are checked in --dry_run mode (no network).
"""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh

from jaxsi import config as config_lib
from jaxsi import models
from jaxsi import optim
from jaxsi import partitioning
from jaxsi import state as state_lib
from jaxsi.tools import aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/arithmetic_sft.py:tiny"
MESH = (2, 4, 1)  # fsdp=4 shards parameters and AdamW moments


@pytest.fixture(scope="module")
def config():
  return config_lib.load(os.path.join(ROOT, CONFIG))


@pytest.fixture(scope="module")
def result(config):
  return aot.plan(config, 8, MESH, hbm_gib=16)


def _sharded_bytes(config):
  """This device's bytes of the train state and of the batch, from the shardings alone."""
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(MESH), partitioning.MESH_AXES,
              axis_types=(AxisType.Auto,) * 3)
  lm = models.build(config.model)
  tx = optim.build_optimizer(config.optim)
  abstract = jax.eval_shape(lambda r: state_lib.create(lm.init(r), tx), jax.random.PRNGKey(0))
  shardings = state_lib.shardings(abstract, lm.param_axes(), mesh)
  state_bytes = sum(
      math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
      for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)))
  unsharded = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(abstract))
  rows = config.train.batch_size // (MESH[0] * MESH[1])
  batch_bytes = rows * 2 * (config.data.max_prompt_len + config.data.max_response_len) * 4
  params = sum(a.size for a in jax.tree.leaves(abstract.params))
  return state_bytes, unsharded, batch_bytes, params


def test_argument_bytes_hold_this_devices_state_shards(config, result):
  state_bytes, unsharded, batch_bytes, params = _sharded_bytes(config)
  assert state_bytes < unsharded  # the mesh really shards the state
  assert result["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
  assert result["param_count"] == params
  assert result["state_bytes_per_device"] == state_bytes
  # Arguments = this device's state shards + its batch rows (+ at most the 8-byte RNG key).
  assert state_bytes <= result["argument_bytes"] <= state_bytes + batch_bytes + 8
  # The donated state comes back in place: the aliased bytes are the state's.
  assert result["alias_bytes"] == state_bytes
  assert result["total_bytes_per_device"] == (
      result["argument_bytes"] + result["output_bytes"] - result["alias_bytes"] +
      result["temp_bytes"] + result["generated_code_bytes"])
  assert result["fits"] and result["total_bytes_per_device"] <= result["hbm_bytes"]


def test_report_says_whether_it_fits(result):
  text = aot.format_report(result, CONFIG)
  assert text.splitlines()[-1].startswith("fits in 16 GiB per device")
  tight = dict(result, hbm_bytes=result["total_bytes_per_device"] - 1, fits=False)
  assert "does NOT fit" in aot.format_report(tight, CONFIG).splitlines()[-1]


def test_mesh_that_does_not_match_the_devices_fails_with_one_sentence(config, capsys,
                                                                      monkeypatch):
  with pytest.raises(aot.AotError, match=r"uses 12 devices but 8 are available"):
    aot.plan(config, 8, (2, 2, 3))
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
  code = aot.main([f"--config={os.path.join(ROOT, CONFIG)}", "--devices=8", "--mesh=3,3,1"])
  err = capsys.readouterr().err
  assert code == 1 and err.startswith("error: Mesh shape (3, 3, 1)") and err.count("\n") == 1
  with pytest.raises(aot.AotError, match="DATA,FSDP,TENSOR"):
    aot.parse_mesh("8,x")


def test_command_line_fakes_the_devices_and_prints_one_json_line():
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  completed = subprocess.run(
      [sys.executable, "-m", "jaxsi.tools.aot", f"--config={CONFIG}", "--devices=4",
       "--mesh=-1,2,1", "--hbm_gib=0.0001", "--json", "--config.train.batch_size=8"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert completed.returncode == 0, completed.stderr
  lines = completed.stdout.strip().splitlines()
  assert len(lines) == 1
  plan = json.loads(lines[0])
  assert plan["num_devices"] == 4 and plan["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
  assert plan["fits"] is False and plan["total_bytes_per_device"] > plan["hbm_bytes"]


# ----------------------------------------------------------------------------- launchers


def test_gkd_step_counts_the_frozen_teacher():
  config = config_lib.load(os.path.join(ROOT, "configs/arithmetic_gkd.py:tiny"))
  result = aot.plan(config, 8, MESH, hbm_gib=16)
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(MESH), partitioning.MESH_AXES,
              axis_types=(AxisType.Auto,) * 3)
  teacher = models.build(config.teacher.model)
  abstract = teacher.abstract_params()
  shardings = partitioning.shardings_for(teacher.param_axes(), abstract, mesh)
  teacher_shard_bytes = sum(math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
                            for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)))
  assert result["teacher_param_bytes"] == sum(a.size * 4 for a in jax.tree.leaves(abstract))
  # Arguments hold this device's student state and teacher shards (plus the small batch).
  assert result["argument_bytes"] >= result["state_bytes_per_device"] + teacher_shard_bytes
  assert result["alias_bytes"] == result["state_bytes_per_device"]  # only the state is donated
