"""The launchers: they parse, and their dry runs print the right commands (no network)."""

import os
import shlex
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(script, *args, env=None):
  full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  full_env.update(env or {})
  return subprocess.run(["bash", os.path.join(ROOT, "launch", script), *args], cwd=ROOT,
                        env=full_env, capture_output=True, text=True, timeout=60, check=False)


def _commands(stdout):
  """The printed commands ("+ cmd args"), each split into words as the shell would."""
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


@pytest.mark.parametrize("script", ["tpu_vm.sh", "gpu_slurm.sh"])
def test_launch_scripts_parse(script):
  assert subprocess.run(["bash", "-n", os.path.join(ROOT, "launch", script)],
                        check=False).returncode == 0


def test_tpu_vm_dry_run_prints_create_install_and_train_on_all_workers():
  done = _launch("tpu_vm.sh", "--dry_run", "--name=jx", "--zone=europe-west4-a",
                 "--accelerator=v3-32", "--config=configs/xsum_sft.py:t5_large",
                 "--workdir=gs://bucket/run", "--spot", "--",
                 "--config.train.steps=20000", "--config.data.prompt_template=It's {document}")
  assert done.returncode == 0, done.stderr
  create, pack, copy, install, train = _commands(done.stdout)
  assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "jx", "--zone=europe-west4-a",
                    "--accelerator-type=v3-32", "--version=tpu-ubuntu2204-base", "--spot"]
  assert pack[:2] == ["tar", "-czf"] and "--exclude=.git" in pack
  assert copy[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in copy
  assert install[4:6] == ["ssh", "jx"] and "--worker=all" in install
  assert "pip install -q -e ~/jaxsi 'jax[tpu]>=0.10.2,<0.11'" in install[-1]
  assert train[4:6] == ["ssh", "jx"] and "--worker=all" in train
  remote = shlex.split(train[-1][len("--command="):])
  python_at = remote.index("-m") - 1
  assert remote[python_at:] == [
      "~/jaxsi-venv/bin/python", "-m", "jaxsi.train", "--config=configs/xsum_sft.py:t5_large",
      "--workdir=gs://bucket/run", "--config.train.steps=20000",
      "--config.data.prompt_template=It's {document}"]


def test_tpu_vm_rejects_a_local_workdir_with_one_sentence():
  done = _launch("tpu_vm.sh", "--dry_run", "--name=jx", "--zone=z", "--accelerator=v3-8",
                 "--config=c.py", "--workdir=/tmp/run")
  assert done.returncode == 2 and done.stdout == ""
  assert done.stderr == "error: --workdir='/tmp/run' must be a gs:// path: every worker " \
      "writes checkpoints there.\n"


def test_gpu_slurm_dry_run_one_process_per_node_sees_all_gpus():
  done = _launch("gpu_slurm.sh", "--dry_run", "--config=configs/xsum_sft.py:t5_large",
                 "--workdir=/shared/run", "--", "--config.mesh.fsdp=-1",
                 env={"SLURM_CPUS_ON_NODE": "64"})
  assert done.returncode == 0, done.stderr
  [command] = _commands(done.stdout)
  assert command == ["srun", "--ntasks-per-node=1", "--gpus-per-node=8", "--kill-on-bad-exit=1",
                     "--cpus-per-task=64", "env", "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7",
                     "python", "-m", "jaxsi.train", "--config=configs/xsum_sft.py:t5_large",
                     "--workdir=/shared/run", "--config.mesh.fsdp=-1"]


def test_gpu_slurm_dry_run_one_process_per_gpu():
  done = _launch("gpu_slurm.sh", "--dry_run", "--per=gpu", "--gpus_per_node=4",
                 "--config=c.py", "--workdir=/shared/run", "--python=/opt/venv/bin/python")
  assert done.returncode == 0, done.stderr
  [command] = _commands(done.stdout)
  assert command == ["srun", "--ntasks-per-node=4", "--gpus-per-node=4", "--kill-on-bad-exit=1",
                     "/opt/venv/bin/python", "-m", "jaxsi.train", "--config=c.py",
                     "--workdir=/shared/run"]
  outside = _launch("gpu_slurm.sh", "--config=c.py", "--workdir=/shared/run")
  assert outside.returncode == 2 and "not inside a Slurm allocation" in outside.stderr
