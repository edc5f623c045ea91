"""The batch contract: what the jitted training step receives, and fake batches of it.

A training batch is a dict of arrays, ``B = config.batch_size`` rows (global;
each process feeds its ``B / process_count`` rows), ``S = config.image_size``::

  image   float32 [B, S, S, 3]  in [-1, 1]: (x / 255 - 0.5) / 0.5, RGB
  id      int32   [B]   identity, -1 unknown
  age     float32 [B]   years, -1 unknown
  group   int32   [B]   age group (ages.age_to_group), -1 unknown
  gender  int32   [B]   1 male, 0 female, -1 unknown
  # FAS (config.train_fas) only:
  target_group  int32   [B]           the group each image is synthesized into
  target_image  float32 [B, S, S, 3]  a real image of that group (the GAN's real side)

:func:`keys` and :func:`spec` say it for a config; the input pipeline
(``data_sources.train_batches``), the tests' batches and the benchmarks'
random batches all come through here. :func:`fake` draws a batch that depends
only on (seed, step), like the real sampler, so a resumed run sees exactly the
batches an uninterrupted one would.
"""

from typing import Iterator, Optional, Sequence

import jax
import numpy as np

from mtlface_jax import ages

STEP_KEYS = ("image", "id", "age", "group", "gender")
FAS_KEYS = ("target_group", "target_image")
DTYPES = {"image": np.float32, "id": np.int32, "age": np.float32, "group": np.int32,
          "gender": np.int32, "target_group": np.int32, "target_image": np.float32}
IMAGE_KEYS = ("image", "target_image")


def keys(config) -> tuple[str, ...]:
  """The keys a step of ``config``'s task reads (FAS adds the targets)."""
  return STEP_KEYS + (FAS_KEYS if config.train_fas else ())


def spec(config, rows: Optional[int] = None) -> dict[str, jax.ShapeDtypeStruct]:
  """Shape and dtype of every key of a batch of ``config``.

  Args:
    config: a training config (``batch_size``, ``image_size``, ``train_fas``).
    rows: rows per batch; default the global ``config.batch_size``.

  Returns:
    key -> ``jax.ShapeDtypeStruct`` (e.g. for ``jax.eval_shape`` or ``.trace``).
  """
  rows = config.batch_size if rows is None else rows
  image = (config.image_size, config.image_size, 3)
  return {k: jax.ShapeDtypeStruct((rows, *(image if k in IMAGE_KEYS else ())), DTYPES[k])
          for k in keys(config)}


def check(batch: dict, config, rows: Optional[int] = None) -> None:
  """Raises ValueError naming the first way ``batch`` breaks the contract.

  Extra keys are allowed (the step ignores them); missing ones, other shapes
  and other dtypes are not.

  Args:
    batch: a dict of arrays.
    config: the training config.
    rows: rows expected (default ``config.batch_size``).
  """
  for key, want in spec(config, rows).items():
    if key not in batch:
      raise ValueError(f"batch lacks {key!r}; a {'FAS' if config.train_fas else 'AIFR'} "
                       f"step needs {list(keys(config))}")
    got = batch[key]
    if tuple(got.shape) != want.shape or np.dtype(got.dtype) != want.dtype:
      raise ValueError(f"batch[{key!r}] is {np.dtype(got.dtype).name} {tuple(got.shape)}, "
                       f"the contract says {want.dtype.name} {want.shape}")


def fake(config, step: int, *, rows: Optional[int] = None, nan: bool = False) -> dict:
  """Random contents of the contract, a pure function of (``config.seed``, ``step``).

  Args:
    config: the training config (labels stay within ``model.num_classes`` and
      ``age_group``).
    step: the training step.
    rows: rows (default ``config.batch_size``).
    nan: put a NaN into the first image (non-finite loss tests).

  Returns:
    A dict of NumPy arrays with exactly :func:`keys`.
  """
  n = config.batch_size if rows is None else rows
  size = config.image_size
  rng = np.random.default_rng([config.seed, step])
  age = rng.uniform(0, 80, n).astype(np.float32)
  batch = {
      "image": rng.uniform(-1, 1, (n, size, size, 3)).astype(np.float32),
      "id": rng.integers(0, config.model.num_classes, n).astype(np.int32),
      "age": age,
      "group": np.asarray(ages.age_to_group(age, config.age_group), np.int32),
      "gender": rng.integers(0, 2, n).astype(np.int32),
  }
  if config.train_fas:
    batch["target_group"] = rng.integers(0, config.age_group, n).astype(np.int32)
    batch["target_image"] = rng.uniform(-1, 1, (n, size, size, 3)).astype(np.float32)
  if nan:
    batch["image"][0, 0, 0, 0] = np.nan
  return batch


def fake_batches(config, start_step: int, *, fixed: bool = False,
                 nan_steps: Sequence[int] = ()) -> Iterator[dict]:
  """A ``batches_fn`` for ``loop.train``: :func:`fake` for ``start_step, start_step+1, ...``.

  Args:
    config: the training config.
    start_step: the first step (a resumed run's).
    fixed: every step gets step 0's batch (overfitting tests).
    nan_steps: steps whose first image holds a NaN.

  Yields:
    Batches of the contract.
  """
  step = start_step
  while True:
    yield fake(config, 0 if fixed else step, nan=step in nan_steps)
    step += 1
