"""The batch contract (mtlface_jax/batch.py): spec, fake batches and the input pipeline agree."""

import numpy as np
import pytest

from configs import tiny
from mtlface_jax import batch as batch_lib
from mtlface_jax import data_sources


def _config(train_fas: bool):
  config = tiny.get_config()
  config.train_fas = train_fas
  return config


@pytest.mark.parametrize("train_fas", [False, True])
def test_fake_batches_follow_the_spec_and_depend_only_on_seed_and_step(train_fas):
  config = _config(train_fas)
  spec = batch_lib.spec(config)
  assert list(spec) == list(batch_lib.keys(config))
  assert ("target_image" in spec) == train_fas
  assert spec["image"].shape == (8, 48, 48, 3) and spec["image"].dtype == np.float32
  assert spec["id"].shape == (8,) and spec["group"].dtype == np.int32
  batch = batch_lib.fake(config, 3)
  batch_lib.check(batch, config)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      k: (s.shape, s.dtype) for k, s in spec.items()}
  assert batch["id"].max() < config.model.num_classes
  assert batch["target_group" if train_fas else "group"].max() < config.age_group
  np.testing.assert_array_equal(batch["image"], batch_lib.fake(config, 3)["image"])
  assert not np.array_equal(batch["image"], batch_lib.fake(config, 4)["image"])
  # The iterator: step s is fake(step s), or step 0's with fixed; NaNs where asked.
  stream = batch_lib.fake_batches(config, 2, nan_steps=(3,))
  first, second = next(stream), next(stream)
  np.testing.assert_array_equal(first["id"], batch_lib.fake(config, 2)["id"])
  assert np.isnan(second["image"][0, 0, 0, 0]) and np.isfinite(first["image"]).all()
  fixed = batch_lib.fake_batches(config, 5, fixed=True)
  np.testing.assert_array_equal(next(fixed)["image"], batch_lib.fake(config, 0)["image"])


def test_check_names_what_breaks_the_contract():
  config = _config(True)
  batch = batch_lib.fake(config, 0)
  with pytest.raises(ValueError, match=r"contract says float32 \(4, 48, 48, 3\)"):
    batch_lib.check(batch, config, rows=4)
  wrong = {**batch, "id": batch["id"].astype(np.int64)}
  with pytest.raises(ValueError, match=r"batch\['id'\] is int64"):
    batch_lib.check(wrong, config)
  del batch["target_image"]
  with pytest.raises(ValueError, match="lacks 'target_image'"):
    batch_lib.check(batch, config)


@pytest.mark.parametrize("train_fas", [False, True])
def test_input_pipeline_batches_follow_the_spec(train_fas):
  config = _config(train_fas)
  batches = data_sources.train_batches(config, 0)
  try:
    batch = next(batches)
  finally:
    batches.close()
  batch_lib.check(batch, config)
  assert list(batch) == list(batch_lib.keys(config))
