"""Age estimation metrics: MAE, age-group accuracy and CS(5).

Samples whose true age is unknown (negative; the pipeline marks them -1) are
ignored and counted, so a mixed labelled/unlabelled set can be scored as is.
"""

import dataclasses
from typing import Any

import numpy as np

from mtlface_jax.ages import age_to_group


@dataclasses.dataclass
class AgeResult:
  """Age estimation metrics; ``to_dict()`` is JSON-ready.

  Attributes:
    mae: mean absolute error in years.
    group_accuracy: fraction whose predicted group equals the true group.
    cs: cumulative score, fraction with absolute error <= ``cs_years``.
    cs_years: the CS tolerance in years.
    num_groups: number of age groups used for ``group_accuracy``.
    num_samples: samples with a known true age (scored).
    num_ignored: samples with an unknown true age (not scored).
  """
  mae: float
  group_accuracy: float
  cs: float
  cs_years: float
  num_groups: int
  num_samples: int
  num_ignored: int

  def to_dict(self) -> dict[str, Any]:
    """Returns the fields as plain Python types."""
    return dataclasses.asdict(self)


def age_metrics(predicted_ages,
                true_ages,
                num_groups: int = 7,
                predicted_groups=None,
                cs_years: float = 5.0) -> AgeResult:
  """Scores age predictions against true ages.

  Args:
    predicted_ages: [N] estimated ages in years (e.g. the DEX expectation).
    true_ages: [N] true ages; negative means unknown and the sample is ignored.
    num_groups: age groups for the group accuracy (see ``mtlface_jax.ages``).
    predicted_groups: optional [N] groups from a group classifier head. By
      default the group of each predicted age is used.
    cs_years: tolerance of the cumulative score (CS(5) by default).

  Returns:
    An :class:`AgeResult`.

  Raises:
    ValueError: on unequal lengths, NaN/inf predictions of scored samples, or
      no sample with a known age.
  """
  predicted = np.asarray(predicted_ages, np.float64).reshape(-1)
  true = np.asarray(true_ages, np.float64).reshape(-1)
  lengths = {"predicted_ages": predicted.size, "true_ages": true.size}
  if predicted_groups is not None:
    predicted_groups = np.asarray(predicted_groups).reshape(-1)
    lengths["predicted_groups"] = predicted_groups.size
  if len(set(lengths.values())) != 1:
    raise ValueError(f"unequal lengths: {lengths}")
  known = true >= 0
  if not known.any():
    raise ValueError(f"none of the {true.size} samples has a known (>= 0) age")
  bad = np.flatnonzero(known & ~np.isfinite(predicted))
  if bad.size:
    raise ValueError(f"{bad.size} predicted age(s) are NaN/inf, first at index {bad[0]}")
  if predicted_groups is None:
    predicted_groups = age_to_group(predicted, num_groups)
  errors = np.abs(predicted[known] - true[known])
  true_groups = age_to_group(true[known], num_groups)
  return AgeResult(
      mae=float(np.mean(errors)),
      group_accuracy=float(np.mean(predicted_groups[known] == true_groups)),
      cs=float(np.mean(errors <= cs_years)),
      cs_years=float(cs_years),
      num_groups=int(num_groups),
      num_samples=int(known.sum()),
      num_ignored=int((~known).sum()))
