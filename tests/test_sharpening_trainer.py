"""RLHF-Sharpening through the trainer: a frozen base samples pairs every step."""

import os

import jax
import numpy as np

from jaxsi import config as config_lib
from jaxsi import metrics_writer
from jaxsi import pipeline
from jaxsi import pretrained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_rlhf_sharpening_trains_from_a_frozen_base(tmp_path):
  config = config_lib.load(os.path.join(ROOT, "configs/arithmetic_sharpen.py:tiny"),
                           [("train.progress", "false"), ("objective.mode", "rlhf")])
  workdir = str(tmp_path / "run")
  pipeline.run(config, workdir)
  rows = [r for r in metrics_writer.read(workdir) if "train/loss" in r]
  assert rows and all(np.isfinite(r["train/loss"]) and r["train/loss"] >= 0 for r in rows)
  # the policy moved away from the base; the base run itself is untouched
  _, base, _ = pretrained.load_workdir(os.path.join(workdir, "base"))
  _, policy, _ = pretrained.load_workdir(workdir)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(base),
                                                      jax.tree.leaves(policy)))
  step, _ = pretrained.stored_config(os.path.join(workdir, "base"))
  assert step == config.pipeline.base_steps
