"""Preemption through the real CLI: SIGKILL then rerun is bitwise exact; SIGTERM saves first."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from jaxsi import checkpoint as checkpoint_lib
from jaxsi import pretrained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_ARGS = ["--config=configs/arithmetic_sft.py:tiny", "--config.train.progress=false",
             "--config.train.eval_every=0", "--config.eval.at_end=false"]


def _cli(workdir, *extra):
  return [sys.executable, "-m", "jaxsi.train", f"--workdir={workdir}", *BASE_ARGS, *extra]


def _wait_for_checkpoint(workdir, proc, timeout=600):
  directory = os.path.join(workdir, "checkpoints")
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f"run ended before it was interrupted: {proc.stdout.read()[-2000:]}")
    steps = [int(d) for d in os.listdir(directory) if d.isdigit()] if os.path.isdir(directory) else []
    if steps:
      return max(steps)
    time.sleep(0.2)
  raise AssertionError("no checkpoint appeared")


def test_sigkill_then_rerun_equals_an_uninterrupted_run(tmp_path):
  steps = ["--config.train.steps=60", "--config.train.checkpoint_every=10"]
  reference = str(tmp_path / "reference")
  subprocess.run(_cli(reference, *steps), cwd=ROOT, check=True, capture_output=True, timeout=600)

  workdir = str(tmp_path / "killed")
  proc = subprocess.Popen(_cli(workdir, *steps), cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  _wait_for_checkpoint(workdir, proc)
  proc.send_signal(signal.SIGKILL)                    # no chance to save anything
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  survived = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints")).all_steps()
  assert survived and max(survived) < 60

  subprocess.run(_cli(workdir, *steps), cwd=ROOT, check=True, capture_output=True, timeout=600)
  _, params_ref, _ = pretrained.load_workdir(reference)
  _, params_resumed, _ = pretrained.load_workdir(workdir)
  for a, b in zip(jax.tree.leaves(params_ref), jax.tree.leaves(params_resumed)):
    np.testing.assert_array_equal(a, b)


def test_sigterm_saves_the_current_step_and_exits_cleanly(tmp_path):
  workdir = str(tmp_path / "run")
  proc = subprocess.Popen(
      _cli(workdir, "--config.train.steps=100000", "--config.train.checkpoint_every=25"),
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  first = _wait_for_checkpoint(workdir, proc)
  time.sleep(1.0)  # let it run past that checkpoint
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-2000:]
  assert "SIGTERM received: saving step" in out
  saved = int(out.split("SIGTERM received: saving step ")[1].split()[0])
  steps = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints")).all_steps()
  assert saved == max(steps) and saved > first
  # the saved state is readable and at that step
  step, _ = pretrained.stored_config(workdir)
  assert step == saved
