"""Deterministic in-memory batches for training tests (no tf.data needed)."""

import numpy as np

from mtlface_jax import ages


def fake_batches(config, start_step, *, fixed=False, nan_steps=()):
  """Yields the batch contract for steps ``start_step, start_step+1, ...``.

  Each batch depends only on (seed, step), like the real sampler, so a resumed
  run sees exactly the batches an uninterrupted one would.
  """
  step = start_step
  size, n = config.image_size, config.batch_size
  while True:
    rng = np.random.default_rng([config.seed, 0 if fixed else step])
    age = rng.uniform(0, 80, n).astype(np.float32)
    batch = {
        "image": rng.uniform(-1, 1, (n, size, size, 3)).astype(np.float32),
        "id": rng.integers(0, config.model.num_classes, n).astype(np.int32),
        "age": age,
        "group": np.asarray(ages.age_to_group(age, config.age_group), np.int32),
        "gender": rng.integers(0, 2, n).astype(np.int32),
        "target_group": rng.integers(0, config.age_group, n).astype(np.int32),
        "target_image": rng.uniform(-1, 1, (n, size, size, 3)).astype(np.float32),
    }
    if step in nan_steps:
      batch["image"][0, 0, 0, 0] = np.nan
    yield batch
    step += 1
