"""Test-session setup: 4 simulated CPU devices, quiet TensorFlow, shared paths."""

import os
from pathlib import Path

# Must be set before JAX initialises its backends: multi-device tests shard over
# these 4 host devices; single-device code simply uses the first.
# Lower LLVM optimisation: the tiny test models compile several times faster
# and still run in milliseconds.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4 "
                      "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# XLA CPU compiles dominate the suite's time; tests that build the same tiny
# programs (and their subprocesses, through the environment) share them here.
_CACHE = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".jax_cache"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# `make test-slow` sets it: the tests too slow for CI's 10 minutes run only then.
SLOW_TESTS = bool(os.environ.get("MTLFACE_SLOW_TESTS"))


def slow(why: str):
  """Marks a test that runs only with ``MTLFACE_SLOW_TESTS=1`` (``make test-slow``)."""
  return pytest.mark.skipif(not SLOW_TESTS, reason=f"{why}: MTLFACE_SLOW_TESTS=1")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
  """``../shared`` beside the checkout; tests needing it skip when absent."""
  if not SHARED.is_dir():
    pytest.skip("../shared is not present")
  return SHARED


# The reference PyTorch layouts, vendored so their tests run on a clean clone;
# test_fixtures.py checks the copy against ../shared/reference when present.
TORCH_LAYOUTS = Path(__file__).resolve().parent / "fixtures" / "torch_layouts.json"


@pytest.fixture(scope="session")
def torch_layouts() -> dict:
  """The reference PyTorch layouts (``tests/fixtures/torch_layouts.json``).

  Every ``state_dict`` key with its shape and each module's trainable parameter
  count, read off the reference PyTorch modules (docs/architecture.md).
  """
  import json  # pylint: disable=g-import-not-at-top
  return json.loads(TORCH_LAYOUTS.read_text())


# The slowest files first (cold-cache CI times, `make test PYTEST_ARGS=--durations=0`):
# xdist hands out whole files in collection order (the Makefile turns its own
# reordering by test count off), so starting with the long ones lets the two
# workers finish together instead of one waiting on a long file at the end.
SLOWEST_FIRST = ("test_train_process.py", "test_training.py", "test_real_data.py",
                 "test_train_multiprocess.py", "test_fas_knobs.py", "test_tpami.py",
                 "test_eval_cli.py", "test_benchmarks.py", "test_reliability.py",
                 "test_selective.py", "test_app.py", "test_fas_truth.py")


def pytest_collection_modifyitems(config, items):
  """Orders the collected tests by file as ``SLOWEST_FIRST`` says (stable within a file)."""
  del config
  rank = {name: position for position, name in enumerate(SLOWEST_FIRST)}
  items.sort(key=lambda item: rank.get(Path(str(item.fspath)).name, len(rank)))
