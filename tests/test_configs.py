"""Configs say what they do: every key declared in common.py, locked, explicit variants."""

import importlib
from pathlib import Path

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from configs import common

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
VARIANTS = [(path.stem, "") for path in sorted(CONFIGS.glob("*.py"))
            if path.stem not in ("__init__", "common")]
VARIANTS += [("default", "cpu"), ("real_lfw_utkface", "cpu"), ("fas_tpami", "tiny"),
             ("fas_tpami", "demo"), ("fas_tpami", "demo_aifr")]


def _keys(config: ml_collections.ConfigDict, prefix: str = "") -> set[str]:
  keys = set()
  for key, value in config.items():
    keys.add(prefix + key)
    if isinstance(value, ml_collections.ConfigDict):
      keys |= _keys(value, f"{prefix}{key}.")
  return keys


@pytest.mark.parametrize("name,variant", VARIANTS)
def test_every_config_has_exactly_the_keys_of_common(name, variant):
  module = importlib.import_module(f"configs.{name}")
  config = module.get_config(variant) if variant else module.get_config()
  assert _keys(config) == _keys(common.get_config())
  assert config.is_locked
  with pytest.raises(AttributeError):
    config.data.synthetic_faces.num_identitys = 3  # a typo cannot add a key


def test_default_cpu_is_an_explicit_variant():
  from configs import default  # pylint: disable=g-import-not-at-top
  full, cpu = default.get_config(), default.get_config("cpu")
  assert (full.image_size, full.dtype) == (112, "bfloat16")
  assert (cpu.image_size, cpu.dtype) == (64, "float32")
  assert full.eval.synthetic and cpu.eval_every > 0  # the demo watches held-out accuracy
  with pytest.raises(ValueError, match="unknown variant"):
    default.get_config("gpu")


def _parse(*argv):
  values, argv = flags.FlagValues(), ["prog", *argv]
  # sys_argv: config_flags finds the --config.x=y overrides there.
  holder = config_flags.DEFINE_config_file("config", str(CONFIGS / "default.py"),
                                           flag_values=values, lock_config=True, sys_argv=argv)
  values(argv)
  return holder.value


def test_config_flag_overrides_declared_keys_and_refuses_others():
  config = _parse(f"--config={CONFIGS / 'default.py'}:cpu",
                  "--config.data.synthetic_faces.num_identities=40",
                  "--config.eval.bins=('a.bin','b.bin')")
  assert config.data.synthetic_faces.num_identities == 40 and config.image_size == 64
  assert config.eval.bins == ("a.bin", "b.bin")
  with pytest.raises(Exception, match="num_identities"):
    _parse(f"--config={CONFIGS / 'default.py'}", "--config.data.num_identities=40")
