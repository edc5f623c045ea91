"""Test-session setup: 4 simulated CPU devices, quiet TensorFlow, shared paths."""

import os
from pathlib import Path

# Must be set before JAX initialises its backends: multi-device tests shard over
# these 4 host devices; single-device code simply uses the first.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # pylint: disable=g-import-not-at-top

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
  """``../shared`` beside the checkout; tests needing it skip when absent."""
  if not SHARED.is_dir():
    pytest.skip("../shared is not present")
  return SHARED


@pytest.fixture(scope="session")
def torch_layouts(shared_dir) -> dict:
  """The reference PyTorch layouts (``../shared/reference/torch_layouts.json``)."""
  import json  # pylint: disable=g-import-not-at-top
  path = shared_dir / "reference" / "torch_layouts.json"
  if not path.is_file():
    pytest.skip(f"{path} is not present")
  return json.loads(path.read_text())
