"""The sweep tools' shared command line (jaxsi.tools.sweep_cli)."""

import pytest

from jaxsi.tools import sweep_cli

ARMS = ("sft", "bc", "sm")


def _parse(*argv):
  return sweep_cli.parse(sweep_cli.parser("sweep", "methods", ARMS), list(argv), "methods",
                          ARMS)


def test_defaults_overrides_and_subsets():
  args, overrides, arms, seeds = _parse("--config=c.py", "--workdir=w",
                                        "--config.train.steps=7", "--methods=sm,bc",
                                        "--seeds=3,1")
  assert (args.config, args.workdir) == ("c.py", "w")
  assert arms == ["sm", "bc"] and seeds == [3, 1]
  assert overrides == [("train.steps", "7")]
  _, _, arms, seeds = _parse("--config=c.py", "--workdir=w")
  assert arms == list(ARMS) and seeds == [0, 1, 2]


@pytest.mark.parametrize("bad,message", [
    ("--methods=sm,nope", "unknown method 'nope'; choose from sft, bc, sm."),
    ("--methods=", "unknown method ''; choose from sft, bc, sm."),
    ("--seeds=0,x", "--seeds='0,x' is invalid; pass integers like 0,1,2."),
    ("--seeds=", "--seeds is empty; pass at least one seed, e.g. --seeds=0."),
])
def test_bad_values_end_with_one_sentence(bad, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    _parse("--config=c.py", "--workdir=w", bad)
  assert exit_info.value.code == 2
  assert capsys.readouterr().err.strip().endswith(message)
