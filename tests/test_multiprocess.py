"""Two local processes (jax.distributed, gloo, 4 fake CPU devices each) train like one process.

Each process runs the real CLI on its host-local slice of every batch; together they save one
checkpoint. The result must equal the single-process run on 8 devices, for SFT and for the GKD
pipeline (teacher SFT, student SFT, on-policy distillation with sampling).
"""

import os
import socket
import subprocess
import sys

import jax
import numpy as np

from jaxsi import config as config_lib
from jaxsi import metrics_writer
from jaxsi import pipeline
from jaxsi import pretrained
from jaxsi import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = [("train.progress", "false")]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_two_processes(config: str, workdir: str, overrides=()) -> None:
  port = _free_port()
  procs = []
  for process_id in range(2):
    env = {**os.environ,
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu",
           "JAXSI_COORDINATOR": f"127.0.0.1:{port}",
           "JAXSI_NUM_PROCESSES": "2",
           "JAXSI_PROCESS_ID": str(process_id)}
    args = [sys.executable, "-m", "jaxsi.train", f"--config={config}", f"--workdir={workdir}"]
    args += [f"--config.{k}={v}" for k, v in [*OVERRIDES, *overrides]]
    procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  outputs = []
  for proc in procs:
    try:
      out, _ = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      raise
    outputs.append(out)
  for proc, out in zip(procs, outputs):
    assert proc.returncode == 0, out[-3000:]
  assert "on 8 cpu device(s), 2 process(es)" in outputs[0]


def _assert_same_params(dir_a: str, dir_b: str) -> None:
  _, params_a, _ = pretrained.load_workdir(dir_a)
  _, params_b, _ = pretrained.load_workdir(dir_b)
  leaves_a, leaves_b = jax.tree.leaves(params_a), jax.tree.leaves(params_b)
  assert len(leaves_a) == len(leaves_b) > 0
  for a, b in zip(leaves_a, leaves_b):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_two_processes_equal_one_sft(tmp_path):
  spec = "configs/arithmetic_sft.py:tiny"
  multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
  _run_two_processes(spec, multi)
  config = config_lib.load(os.path.join(ROOT, spec), OVERRIDES)
  trainer.train(config, single)
  _assert_same_params(multi, single)
  # the checkpoint written by two processes restores in one (8 devices, one process)
  step, _ = pretrained.stored_config(multi)
  assert step == config.train.steps


def test_two_processes_equal_one_gkd(tmp_path):
  """On-policy GKD (student sampling, frozen teacher) across two processes.

  The teacher and the student's SFT start are trained once, in this process; both the
  two-process and the one-process distillation start from them.
  """
  spec = "configs/arithmetic_gkd.py:tiny"
  prereq = str(tmp_path / "prereq")
  config = config_lib.load(os.path.join(ROOT, spec), OVERRIDES)
  for stage in pipeline.stages(config, prereq)[:-1]:
    trainer.train(stage.config, stage.workdir)
  given = [("teacher.source", os.path.join(prereq, "teacher")),
           ("init_from", os.path.join(prereq, "student_sft"))]
  multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
  _run_two_processes(spec, multi, given)
  pipeline.run(config_lib.load(os.path.join(ROOT, spec), [*OVERRIDES, *given]), single)
  assert not os.path.exists(os.path.join(multi, "teacher"))  # the given teacher was used
  _assert_same_params(multi, single)
  rows = [r for r in metrics_writer.read(multi) if "train/on_policy_fraction" in r]
  assert rows and rows[-1]["train/on_policy_fraction"] == 1.0
