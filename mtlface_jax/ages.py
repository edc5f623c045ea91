"""Age-group definitions shared by models, data pipelines and evaluation.

MTLFace bins ages into groups by thresholds: a sample's group is the number of
thresholds strictly below its age (reference: docs/architecture.md section 4).
"""

from typing import Sequence

import numpy as np

# Thresholds per number of groups, as in the reference implementation.
AGE_GROUP_THRESHOLDS: dict[int, tuple[int, ...]] = {
    4: (30, 40, 50),
    5: (20, 30, 40, 50),
    6: (10, 20, 30, 40, 50),
    7: (10, 20, 30, 40, 50, 60),
    8: (12, 18, 25, 35, 45, 55, 65),
}

NUM_AGE_CLASSES = 101  # DEX-style ages 0..100.

# The one age range of labels, for training and evaluation alike: ages in
# [0, MAX_AGE] years are accepted, -1 means unknown, anything else is a label
# error. It is wider than the estimator's classes (0..100) because real sets
# hold older people (UTKFace goes to 116): training pulls their DEX expectation
# towards the oldest class (the age loss is an MSE on it), evaluation scores
# the prediction against the true age, and both bin them into the oldest group.
MAX_AGE = 120


def thresholds_for(num_groups: int) -> tuple[int, ...]:
  """Returns the group thresholds for ``num_groups`` (4 to 8).

  Args:
    num_groups: number of age groups.

  Returns:
    The ascending thresholds; group g covers ages in (t[g-1], t[g]].

  Raises:
    ValueError: if ``num_groups`` is not one the reference defines.
  """
  if num_groups not in AGE_GROUP_THRESHOLDS:
    raise ValueError(
        f"num_groups must be one of {sorted(AGE_GROUP_THRESHOLDS)}, got {num_groups}")
  return AGE_GROUP_THRESHOLDS[num_groups]


def age_to_group(age, num_groups: int = 7):
  """Maps ages to age groups: the count of thresholds strictly below the age.

  Works on NumPy arrays, JAX arrays (traceable) and Python scalars. Unknown ages
  (negative, the pipeline's -1 marker) map to group -1.

  Args:
    age: ages in years, any shape.
    num_groups: number of age groups (4 to 8).

  Returns:
    Integer groups in [0, num_groups - 1], or -1 where the age is negative.
  """
  thresholds = thresholds_for(num_groups)
  xp = _array_module(age)
  age_arr = xp.asarray(age)
  group = sum((age_arr > t).astype(xp.int32) for t in thresholds)
  return xp.where(age_arr < 0, -1, group).astype(xp.int32)


def group_ranges(num_groups: int = 7) -> list[str]:
  """Human-readable labels of the groups, e.g. ``['0-10', '11-20', ..., '61+']``."""
  bounds = thresholds_for(num_groups)
  labels, lower = [], 0
  for t in bounds:
    labels.append(f"{lower}-{t}")
    lower = t + 1
  labels.append(f"{lower}+")
  return labels


def _array_module(x) -> object:
  """Returns jax.numpy for JAX arrays/tracers, NumPy otherwise."""
  if type(x).__module__.startswith(("jax", "jaxlib")):
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    return jnp
  return np


def groups_of(ages: Sequence[float], num_groups: int = 7) -> np.ndarray:
  """NumPy convenience wrapper of :func:`age_to_group` for Python lists."""
  return np.asarray(age_to_group(np.asarray(ages, np.float32), num_groups))
