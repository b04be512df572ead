"""Config loading: variants, overrides, and one-sentence errors for bad keys and values."""

import textwrap

import pytest

from jaxsi import config as config_lib


@pytest.fixture
def config_file(tmp_path):
  path = tmp_path / "exp.py"
  path.write_text(textwrap.dedent("""
      import ml_collections
      def get_config(arg=None):
        c = ml_collections.ConfigDict()
        c.steps = 10
        c.name = "base"
        c.flag = False
        c.optim = ml_collections.ConfigDict({"lr": 1e-3, "betas": (0.9, 0.99)})
        if arg == "big":
          c.steps = 100
        elif arg is not None:
          raise ValueError(f"unknown variant {arg!r}; choose from: big")
        return c
      """))
  return str(path)


def test_variant_and_overrides_apply_with_types(config_file):
  config = config_lib.load(config_file + ":big", [("optim.lr", "3e-4"), ("flag", "true"),
                                                   ("name", "x"), ("optim.betas", "(0.8, 0.9)")])
  assert config.steps == 100
  assert config.optim.lr == pytest.approx(3e-4)
  assert config.flag is True
  assert config.name == "x"
  assert config.optim.betas == (0.8, 0.9)


def test_config_is_locked_after_load(config_file):
  config = config_lib.load(config_file)
  with pytest.raises(AttributeError):
    config.new_key = 1


def test_unknown_top_level_key_names_valid_keys(config_file):
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.load(config_file, [("no_such_key", "1")])
  message = str(err.value)
  assert "'no_such_key'" in message
  assert "flag, name, optim, steps" in message
  assert "\n" not in message


def test_unknown_nested_key_names_the_section(config_file):
  with pytest.raises(config_lib.ConfigError, match=r"at optim; valid keys there are betas, lr"):
    config_lib.load(config_file, [("optim.lrr", "1")])


@pytest.mark.parametrize("key,value,expected", [
    ("steps", "abc", "expects an int, got 'abc'"),
    ("optim.lr", "fast", "expects a float, got 'fast'"),
    ("flag", "maybe", "expects a bool"),
])
def test_wrong_value_type_fails_with_one_sentence(config_file, key, value, expected):
  with pytest.raises(config_lib.ConfigError, match=expected):
    config_lib.load(config_file, [(key, value)])


def test_integral_float_text_is_accepted_for_int(config_file):
  assert config_lib.load(config_file, [("steps", "2e3")]).steps == 2000


def test_missing_file_is_a_clear_error(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="does not exist"):
    config_lib.load(str(tmp_path / "nope.py"))


def test_section_cannot_be_set_as_a_value(config_file):
  with pytest.raises(config_lib.ConfigError, match="is a section"):
    config_lib.load(config_file, [("optim", "1")])
