"""Face verification protocol on pairs of embeddings (LFW-style 10-fold).

The public entry point is :func:`evaluate_verification`. It scores any
embeddings, not only this project's models: pass ``issame`` (one boolean per
pair) and the two embedding arrays of the pairs.

Conventions:
  * The score of a pair is the cosine similarity of its two embeddings.
  * A pair is predicted "same person" when ``score >= threshold``.
  * Folds are integer labels >= 0, one per pair, as the pair list defines
    them (LFW ``pairs.txt``: 10 sets of 300 positive + 300 negative pairs,
    labelled 0..9 by ``mtlface_jax.formats``, so LFW's folds 6-10 are labels
    5..9). Without ``folds``, the pairs are split into ``num_folds``
    contiguous folds labelled ``0..num_folds-1`` (sizes differ by at most one,
    like scikit-learn's ``KFold(shuffle=False)`` used by insightface).
  * For each evaluated fold, the threshold is the one with the best accuracy on
    the OTHER evaluated folds (exact sweep over every distinct score unless a
    threshold grid is given; ties go to the lowest threshold, as
    ``np.argmax`` does in the insightface/facenet code). Accuracy is then
    measured on the held-out fold.
"""

import dataclasses
from typing import Any, Optional, Sequence

import numpy as np

DEFAULT_FARS = (1e-3, 1e-4)


@dataclasses.dataclass
class VerificationResult:
  """Result of :func:`evaluate_verification`; ``to_dict()`` is JSON-ready.

  Attributes:
    accuracy_mean: mean over evaluated folds of the held-out accuracy.
    accuracy_std: population standard deviation of those accuracies.
    fold_labels: the evaluated folds, in ascending order.
    fold_accuracies: held-out accuracy of each evaluated fold.
    fold_thresholds: threshold chosen on the other folds for each fold.
    auc: area under the ROC curve over all evaluated pairs.
    eer: equal error rate (FPR where FPR == 1 - TPR, linearly interpolated).
    eer_threshold: similarity threshold at the EER crossing.
    tar_at_far: list of {"far", "tar", "threshold"}: the highest TAR whose
      FPR <= far (no interpolation); with fewer than 1/far negatives this is
      the TAR at FAR 0.
    best_threshold: threshold maximising accuracy over all evaluated pairs.
    best_threshold_accuracy: that (optimistic, not cross-validated) accuracy.
    num_pairs, num_positive, num_negative: counts over evaluated pairs.
    roc_fpr, roc_tpr, roc_thresholds: the ROC curve (omitted from
      ``to_dict()`` unless asked for, as it has one point per distinct score).
  """
  accuracy_mean: float
  accuracy_std: float
  fold_labels: list[int]
  fold_accuracies: list[float]
  fold_thresholds: list[float]
  auc: float
  eer: float
  eer_threshold: float
  tar_at_far: list[dict[str, float]]
  best_threshold: float
  best_threshold_accuracy: float
  num_pairs: int
  num_positive: int
  num_negative: int
  roc_fpr: np.ndarray = dataclasses.field(repr=False)
  roc_tpr: np.ndarray = dataclasses.field(repr=False)
  roc_thresholds: np.ndarray = dataclasses.field(repr=False)

  def tar(self, far: float) -> float:
    """Returns the TAR recorded for ``far`` (KeyError if not computed)."""
    for entry in self.tar_at_far:
      if np.isclose(entry["far"], far, rtol=1e-9, atol=0.0):
        return entry["tar"]
    raise KeyError(f"TAR at FAR {far} was not computed; have "
                   f"{[e['far'] for e in self.tar_at_far]}")

  def to_dict(self, include_roc: bool = False) -> dict[str, Any]:
    """Returns plain Python types (JSON-serialisable).

    Args:
      include_roc: also include the ROC curve arrays as lists.

    Returns:
      A dict of the fields.
    """
    out = {}
    for field in dataclasses.fields(self):
      if field.name.startswith("roc_") and not include_roc:
        continue
      value = getattr(self, field.name)
      out[field.name] = value.tolist() if isinstance(value, np.ndarray) else value
    return out


def cosine_similarity(embeddings1, embeddings2) -> np.ndarray:
  """Row-wise cosine similarity of two [N, D] embedding arrays.

  Args:
    embeddings1: array-like [N, D].
    embeddings2: array-like [N, D].

  Returns:
    float64 [N] similarities in [-1, 1].

  Raises:
    ValueError: on shape mismatch, non-finite values or a zero-norm row.
  """
  e1 = validate_embeddings(embeddings1, "embeddings1")
  e2 = validate_embeddings(embeddings2, "embeddings2")
  if e1.shape != e2.shape:
    raise ValueError(f"embeddings1 has shape {e1.shape} but embeddings2 has "
                     f"shape {e2.shape}; they must match (one row per pair)")
  e1 = e1 / np.linalg.norm(e1, axis=1, keepdims=True)
  e2 = e2 / np.linalg.norm(e2, axis=1, keepdims=True)
  return np.clip(np.sum(e1 * e2, axis=1), -1.0, 1.0)


def validate_embeddings(embeddings, name: str) -> np.ndarray:
  """Validates an embedding array for cosine scoring.

  Args:
    embeddings: array-like [N, D].
    name: how error messages refer to the array.

  Returns:
    The embeddings as float64 [N, D].

  Raises:
    ValueError: if not 2-D, or a row has NaN/inf values or is all zeros (the
      first offending row index is named).
  """
  arr = np.asarray(embeddings, dtype=np.float64)
  if arr.ndim != 2:
    raise ValueError(f"{name} must be 2-D [num, dim], got shape {arr.shape}")
  bad_rows = np.flatnonzero(~np.all(np.isfinite(arr), axis=1))
  if bad_rows.size:
    raise ValueError(f"{name} has NaN/inf values in {bad_rows.size} row(s), "
                     f"first at row {bad_rows[0]}")
  zero_rows = np.flatnonzero(np.linalg.norm(arr, axis=1) == 0)
  if zero_rows.size:
    raise ValueError(f"{name} has {zero_rows.size} all-zero row(s) (cosine "
                     f"undefined), first at row {zero_rows[0]}")
  return arr


def contiguous_folds(num_pairs: int, num_folds: int = 10) -> np.ndarray:
  """Fold labels ``0..num_folds-1`` for pairs split into contiguous blocks.

  Args:
    num_pairs: number of pairs.
    num_folds: number of folds.

  Returns:
    int64 [num_pairs] labels; the first ``num_pairs % num_folds`` folds hold one
    extra pair (the ``np.array_split`` / ``KFold`` convention).
  """
  if num_folds < 2 or num_folds > num_pairs:
    raise ValueError(f"need 2 <= num_folds <= num_pairs, got num_folds="
                     f"{num_folds} for {num_pairs} pairs")
  sizes = [len(chunk) for chunk in np.array_split(np.arange(num_pairs), num_folds)]
  return np.repeat(np.arange(num_folds), sizes)


def accuracy_sweep(scores, issame, thresholds=None):
  """Accuracy of ``score >= t`` for every candidate threshold ``t``.

  Args:
    scores: [N] similarities.
    issame: [N] booleans.
    thresholds: optional ascending grid. Default: the exact sweep, i.e. one
      threshold below all scores, the midpoints between consecutive distinct
      scores, and one above all scores, which reaches every achievable
      accuracy.

  Returns:
    (thresholds [T], accuracies [T]) as float64 arrays.
  """
  scores = np.asarray(scores, np.float64)
  issame = np.asarray(issame, bool)
  if thresholds is None:
    distinct = np.unique(scores)
    thresholds = np.concatenate([[distinct[0] - 1.0],
                                 (distinct[:-1] + distinct[1:]) / 2.0,
                                 [distinct[-1] + 1.0]])
  thresholds = np.asarray(thresholds, np.float64)
  positives = np.sort(scores[issame])
  negatives = np.sort(scores[~issame])
  # Positives at or above t are true accepts; negatives below t true rejects.
  true_accepts = positives.size - np.searchsorted(positives, thresholds, "left")
  true_rejects = np.searchsorted(negatives, thresholds, "left")
  return thresholds, (true_accepts + true_rejects) / scores.size


def best_threshold(scores, issame, thresholds=None) -> tuple[float, float]:
  """Threshold with the highest accuracy (lowest such threshold on ties).

  Args:
    scores: [N] similarities.
    issame: [N] booleans.
    thresholds: optional grid, see :func:`accuracy_sweep`.

  Returns:
    (threshold, accuracy).
  """
  grid, accuracies = accuracy_sweep(scores, issame, thresholds)
  best = int(np.argmax(accuracies))
  return float(grid[best]), float(accuracies[best])


def roc_curve(scores, issame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """ROC curve, one point per distinct score (accept when ``score >= t``).

  Args:
    scores: [N] similarities.
    issame: [N] booleans with at least one positive and one negative.

  Returns:
    (fpr, tpr, thresholds), starting at (0, 0) with threshold +inf and ending
    at (1, 1); thresholds descend.
  """
  scores = np.asarray(scores, np.float64)
  issame = np.asarray(issame, bool)
  order = np.argsort(-scores, kind="stable")
  sorted_scores, sorted_same = scores[order], issame[order]
  # Last index of each run of equal scores: all tied pairs flip together.
  run_ends = np.flatnonzero(np.diff(sorted_scores) != 0)
  run_ends = np.append(run_ends, sorted_scores.size - 1)
  tp = np.cumsum(sorted_same)[run_ends]
  fp = np.cumsum(~sorted_same)[run_ends]
  tpr = np.concatenate([[0.0], tp / max(issame.sum(), 1)])
  fpr = np.concatenate([[0.0], fp / max((~issame).sum(), 1)])
  thresholds = np.concatenate([[np.inf], sorted_scores[run_ends]])
  return fpr, tpr, thresholds


def roc_auc(fpr, tpr) -> float:
  """Trapezoidal area under a ROC curve (equals the Mann-Whitney AUC).

  Args:
    fpr: ascending false positive rates.
    tpr: matching true positive rates.

  Returns:
    The area.
  """
  fpr, tpr = np.asarray(fpr, np.float64), np.asarray(tpr, np.float64)
  return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def equal_error_rate(fpr, tpr, thresholds) -> tuple[float, float]:
  """EER: where FPR equals FNR = 1 - TPR along the ROC, linearly interpolated.

  Args:
    fpr: ascending false positive rates (from :func:`roc_curve`).
    tpr: matching true positive rates.
    thresholds: matching thresholds (descending; the first may be +inf).

  Returns:
    (eer, threshold). The threshold is interpolated like the rates; where the
    crossing involves the +inf start point, the first finite threshold is used.
  """
  fpr, tpr = np.asarray(fpr, np.float64), np.asarray(tpr, np.float64)
  gap = (1.0 - tpr) - fpr  # FNR - FPR: starts at 1, ends at -1, non-increasing.
  after = int(np.argmax(gap <= 0))
  if gap[after] == 0:  # An ROC point lies exactly on the diagonal.
    return float(fpr[after]), float(thresholds[after])
  before = after - 1
  weight = gap[before] / (gap[before] - gap[after])
  eer = fpr[before] + weight * (fpr[after] - fpr[before])
  if np.isinf(thresholds[before]):
    threshold = thresholds[after]
  else:
    threshold = thresholds[before] + weight * (thresholds[after] - thresholds[before])
  return float(eer), float(threshold)


def tar_at_far(scores, issame, far: float) -> tuple[float, float]:
  """Highest true accept rate whose false accept rate is <= ``far``.

  Args:
    scores: [N] similarities.
    issame: [N] booleans.
    far: allowed false accept rate in [0, 1].

  Returns:
    (tar, threshold) where accepting ``score >= threshold`` achieves it. With
    N negatives at most ``floor(far * N)`` may be accepted, so with fewer than
    ``1 / far`` negatives this is the TAR at FAR 0.
  """
  if not 0.0 <= far <= 1.0:
    raise ValueError(f"far must be in [0, 1], got {far}")
  scores = np.asarray(scores, np.float64)
  issame = np.asarray(issame, bool)
  negatives = np.sort(scores[~issame])[::-1]
  allowed = int(np.floor(far * negatives.size + 1e-9))
  if allowed >= negatives.size:
    return 1.0, float(scores.min())
  # Accept only scores strictly above the (allowed+1)-th highest negative; this
  # also keeps ties with it rejected, so the FAR bound holds.
  cut = negatives[allowed]
  threshold = float(np.nextafter(cut, np.inf))
  return float(np.mean(scores[issame] >= threshold)), threshold


def evaluate_verification(issame,
                          embeddings1,
                          embeddings2,
                          folds=None,
                          num_folds: int = 10,
                          eval_folds: Optional[Sequence[int]] = None,
                          fars: Sequence[float] = DEFAULT_FARS,
                          thresholds=None) -> VerificationResult:
  """Runs the k-fold verification protocol on pair embeddings.

  Args:
    issame: [N] booleans, True for a same-identity pair.
    embeddings1: [N, D] embeddings of each pair's first image.
    embeddings2: [N, D] embeddings of each pair's second image.
    folds: optional [N] integer fold label (>= 0) of each pair, as the pair
      list defines it. Default: ``num_folds`` contiguous folds labelled
      0..num_folds-1.
    num_folds: number of contiguous folds when ``folds`` is None.
    eval_folds: optional subset of fold labels to evaluate. Only these folds'
      pairs are used at all: each one's threshold is chosen on the OTHER folds
      of the subset (e.g. labels 5..9, LFW's folds 6-10, when folds 1-5 were
      seen in training),
      and AUC/EER/TAR/best threshold are computed over the subset's pairs.
    fars: false accept rates at which to report the TAR.
    thresholds: optional threshold grid for the fold sweep; default exact.

  Returns:
    A :class:`VerificationResult`.

  Raises:
    ValueError: on unequal lengths, NaN/inf or zero embeddings, fewer than two
      evaluated folds, an unknown fold in ``eval_folds``, or an evaluated fold
      without a positive or without a negative pair (the fold is named).
  """
  issame, scores, folds = _check_pairs(issame, embeddings1, embeddings2, folds, num_folds)
  issame, scores, folds = _select_folds(issame, scores, folds, eval_folds)
  labels = np.unique(folds)
  accuracies, chosen = [], []
  for label in labels:
    held_out = folds == label
    threshold, _ = best_threshold(scores[~held_out], issame[~held_out], thresholds)
    chosen.append(threshold)
    accuracies.append(float(np.mean((scores[held_out] >= threshold) == issame[held_out])))
  fpr, tpr, roc_thresholds = roc_curve(scores, issame)
  eer, eer_threshold = equal_error_rate(fpr, tpr, roc_thresholds)
  overall_threshold, overall_accuracy = best_threshold(scores, issame, thresholds)
  tars = []
  for far in fars:
    tar, tar_threshold = tar_at_far(scores, issame, far)
    tars.append({"far": float(far), "tar": tar, "threshold": tar_threshold})
  return VerificationResult(
      accuracy_mean=float(np.mean(accuracies)),
      accuracy_std=float(np.std(accuracies)),
      fold_labels=[int(label) for label in labels],
      fold_accuracies=accuracies,
      fold_thresholds=chosen,
      auc=roc_auc(fpr, tpr),
      eer=eer,
      eer_threshold=eer_threshold,
      tar_at_far=tars,
      best_threshold=overall_threshold,
      best_threshold_accuracy=overall_accuracy,
      num_pairs=int(scores.size),
      num_positive=int(issame.sum()),
      num_negative=int((~issame).sum()),
      roc_fpr=fpr,
      roc_tpr=tpr,
      roc_thresholds=roc_thresholds)


def _check_pairs(issame, embeddings1, embeddings2, folds, num_folds):
  """Validates lengths and returns (issame bool, scores, fold labels)."""
  issame_arr = np.asarray(issame)
  if issame_arr.ndim != 1:
    raise ValueError(f"issame must be 1-D, got shape {issame_arr.shape}")
  if not np.isin(issame_arr, (0, 1)).all():
    raise ValueError("issame must hold booleans or 0/1 values")
  lengths = {"issame": issame_arr.shape[0],
             "embeddings1": np.shape(embeddings1)[0],
             "embeddings2": np.shape(embeddings2)[0]}
  if folds is not None:
    lengths["folds"] = np.shape(folds)[0]
  if len(set(lengths.values())) != 1:
    raise ValueError(f"unequal lengths: {lengths}; every input needs one entry per pair")
  scores = cosine_similarity(embeddings1, embeddings2)
  if folds is None:
    folds = contiguous_folds(scores.size, num_folds)
  folds = np.asarray(folds)
  if folds.ndim != 1 or not np.issubdtype(folds.dtype, np.integer):
    raise ValueError(f"folds must be a 1-D integer array, got dtype {folds.dtype} "
                     f"shape {folds.shape}")
  if folds.size and folds.min() < 0:
    raise ValueError(f"fold labels must be >= 0, pair {int(np.argmin(folds))} has "
                     f"{folds.min()} (-1 means the list defines no folds: pass "
                     "folds=None for contiguous ones)")
  return issame_arr.astype(bool), scores, folds


def _select_folds(issame, scores, folds, eval_folds):
  """Keeps the pairs of ``eval_folds`` and checks every fold is usable."""
  present = np.unique(folds)
  if eval_folds is not None:
    wanted = np.asarray(sorted(set(int(f) for f in eval_folds)))
    missing = np.setdiff1d(wanted, present)
    if missing.size:
      raise ValueError(f"eval_folds {missing.tolist()} not present; the pair list "
                       f"has folds {present.tolist()}")
    keep = np.isin(folds, wanted)
    issame, scores, folds = issame[keep], scores[keep], folds[keep]
    present = wanted
  if present.size < 2:
    raise ValueError(f"need at least 2 folds to cross-validate, got {present.tolist()}")
  for label in present:
    in_fold = issame[folds == label]
    if not in_fold.any():
      raise ValueError(f"fold {label} has no positive (same-identity) pair")
    if in_fold.all():
      raise ValueError(f"fold {label} has no negative (different-identity) pair")
  return issame, scores, folds
