"""The GKD sweep: per-method configs and the mean ± std table."""

import os
import statistics

import pytest

from jaxsi import config as config_lib
from jaxsi.tools import gkd_sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def main_config():
  return config_lib.load(os.path.join(ROOT, "configs/arithmetic_gkd.py"))


@pytest.mark.parametrize("method,lam,divergence,beta", [
    ("supervised_kd", 0.0, "forward_kl", None),
    ("mixed_fkl", 0.5, "forward_kl", None),
    ("on_policy_rkl", 1.0, "reverse_kl", None),
    ("on_policy_jsd0.9", 1.0, "jsd", 0.9),
])
def test_method_configs_set_the_objective(main_config, method, lam, divergence, beta):
  from jaxsi.objectives import gkd
  run = gkd_sweep.method_config(main_config, method, seed=3, teacher="T", student="S")
  resolved = gkd.resolve(run.objective)
  assert (resolved.lam, resolved.divergence) == (lam, divergence)
  if beta is not None:
    assert resolved.beta == beta
  assert (run.seed, run.teacher.source, run.init_from) == (3, "T", "S")
  assert tuple(run.eval.temperatures) == (0.0, 1.0)
  assert "pipeline" not in run
  # every method continues for the same number of steps with the same optimizer
  assert run.train.steps == main_config.train.steps
  assert run.optim.to_dict() == main_config.optim.to_dict()


def test_table_reports_mean_and_sample_std_in_percent():
  results = {"rows": {
      "teacher": {"eval/accuracy": [0.9], "eval/accuracy_t1": [0.8]},
      "on_policy_jsd0.5": {"eval/accuracy": [0.5, 0.6, 0.7], "eval/accuracy_t1": [0.2, 0.2, 0.2]},
  }}
  table = gkd_sweep.markdown_table(results).splitlines()
  assert table[2] == "| teacher | 90.0 ± 0.0 | 80.0 ± 0.0 | 1 |"
  std = 100 * statistics.stdev([0.5, 0.6, 0.7])
  assert table[3] == f"| on-policy GKD (λ = 1, JSD 0.5) | 60.0 ± {std:.1f} | 20.0 ± 0.0 | 3 |"
  assert f"{std:.1f}" == "10.0"
