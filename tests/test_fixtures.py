"""The vendored test fixtures are faithful copies of their sources.

``tests/fixtures/torch_layouts.json`` is copied from ``../shared/reference`` so
that the layout tests run on a clean clone; these tests catch a copy that went
stale (when ``../shared`` is present) or was damaged (always).
"""

import json
import math

import pytest

from tests import conftest


def test_vendored_torch_layouts_equal_shared_copy(shared_dir):
  shared = shared_dir / "reference" / "torch_layouts.json"
  if not shared.is_file():
    pytest.skip(f"{shared} is not present")
  assert json.loads(conftest.TORCH_LAYOUTS.read_text()) == json.loads(shared.read_text()), (
      f"tests/fixtures/torch_layouts.json differs from {shared}; copy it again")


def test_vendored_torch_layouts_are_self_consistent(torch_layouts):
  """Each module's parameter count is the total size of its 'param' tensors."""
  checked = 0
  for family, modules in torch_layouts.items():
    for name, layout in modules.items():
      if not isinstance(layout, dict) or "state_dict" not in layout:
        continue
      params = sum(math.prod(shape) for _, shape, kind in layout["state_dict"] if kind == "param")
      assert params == layout["trainable_params"], (family, name)
      checked += 1
  # cvpr2021: IR-50, age estimator, CosFace, ICM+decoder, discriminator;
  # tpami2022_released: encoder, age estimator.
  assert checked == 7
