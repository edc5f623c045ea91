"""Closed-set identification: rank-k accuracy by cosine similarity.

Two protocols:
  * :func:`gallery_probe_identification`: every probe is ranked against a
    separate gallery (e.g. rank-1/rank-5 on gallery/probe lists).
  * :func:`leave_one_out_identification`: every image of a labelled set is a
    probe against all the OTHER images (the FG-NET leave-one-image-out
    protocol).

A probe's rank is 1 + the number of impostor (different-identity) candidates
whose similarity is >= the best genuine (same-identity) candidate. Counting
ties against the probe keeps degenerate embeddings (e.g. all equal) from
scoring well. Probes without any genuine candidate cannot be ranked and are
counted in ``num_skipped`` instead. Similarities are computed in chunks of
probes so memory stays ``chunk_size x num_candidates``.
"""

import dataclasses
from typing import Any, Optional, Sequence

import numpy as np

from mtlface_jax.evaluation.verification import validate_embeddings


@dataclasses.dataclass
class IdentificationResult:
  """Rank-k accuracies; ``to_dict()`` is JSON-ready.

  Attributes:
    rank_accuracies: {"rank_1": fraction, "rank_5": ...} over ranked probes.
    num_probes: probes that had at least one genuine candidate (ranked).
    num_skipped: probes without any genuine candidate (not ranked).
  """
  rank_accuracies: dict[str, float]
  num_probes: int
  num_skipped: int

  def to_dict(self) -> dict[str, Any]:
    """Returns the fields as plain Python types."""
    return dataclasses.asdict(self)


def gallery_probe_identification(gallery_embeddings,
                                 gallery_labels,
                                 probe_embeddings,
                                 probe_labels,
                                 ranks: Sequence[int] = (1, 5),
                                 chunk_size: int = 256) -> IdentificationResult:
  """Rank-k identification of probes against a gallery.

  Args:
    gallery_embeddings: [G, D] gallery embeddings.
    gallery_labels: [G] identity labels (ints or strings).
    probe_embeddings: [P, D] probe embeddings.
    probe_labels: [P] identity labels.
    ranks: the k values to report.
    chunk_size: probes scored at a time.

  Returns:
    An :class:`IdentificationResult`.

  Raises:
    ValueError: on mismatched lengths/dimensions, invalid embeddings, or no
      probe with a gallery image of its identity.
  """
  gallery = _normalized(gallery_embeddings, gallery_labels, "gallery")
  probes = _normalized(probe_embeddings, probe_labels, "probe")
  if gallery.shape[1] != probes.shape[1]:
    raise ValueError(f"gallery dim {gallery.shape[1]} != probe dim {probes.shape[1]}")
  probe_ranks = _probe_ranks(probes, np.asarray(probe_labels), gallery,
                             np.asarray(gallery_labels), None, chunk_size)
  return _summarise(probe_ranks, ranks)


def leave_one_out_identification(embeddings,
                                 labels,
                                 ranks: Sequence[int] = (1, 5),
                                 chunk_size: int = 256) -> IdentificationResult:
  """Leave-one-image-out identification (FG-NET protocol).

  Each image is a probe against all other images of the set; images whose
  identity has no other image are skipped and counted.

  Args:
    embeddings: [N, D] embeddings.
    labels: [N] identity labels.
    ranks: the k values to report (the protocol's headline is rank 1).
    chunk_size: probes scored at a time.

  Returns:
    An :class:`IdentificationResult`.

  Raises:
    ValueError: on mismatched lengths, invalid embeddings, or no identity with
      two or more images.
  """
  normalized = _normalized(embeddings, labels, "labelled set")
  labels = np.asarray(labels)
  probe_ranks = _probe_ranks(normalized, labels, normalized, labels,
                             np.arange(labels.shape[0]), chunk_size)
  return _summarise(probe_ranks, ranks)


def _normalized(embeddings, labels, name: str) -> np.ndarray:
  """Validates embeddings against their labels and L2-normalises them."""
  arr = validate_embeddings(embeddings, f"{name} embeddings")
  num_labels = np.shape(labels)[0] if np.ndim(labels) else 0
  if np.ndim(labels) != 1 or num_labels != arr.shape[0]:
    raise ValueError(f"{name}: {arr.shape[0]} embeddings but labels of shape "
                     f"{np.shape(labels)}; need one label per embedding")
  return (arr / np.linalg.norm(arr, axis=1, keepdims=True)).astype(np.float32)


def _probe_ranks(probes, probe_labels, gallery, gallery_labels,
                 self_index: Optional[np.ndarray], chunk_size: int) -> np.ndarray:
  """Rank of each probe (0 where it has no genuine candidate).

  ``self_index[i]`` is the gallery column that IS probe i (leave-one-out), so
  it is neither a genuine nor an impostor candidate.
  """
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  result = np.zeros(probes.shape[0], np.int64)
  for start in range(0, probes.shape[0], chunk_size):
    stop = min(start + chunk_size, probes.shape[0])
    similarity = probes[start:stop] @ gallery.T
    genuine = probe_labels[start:stop, None] == gallery_labels[None, :]
    impostor = ~genuine
    if self_index is not None:
      rows = np.arange(stop - start)
      genuine[rows, self_index[start:stop]] = False
    best_genuine = np.where(genuine, similarity, -np.inf).max(axis=1)
    rank = 1 + np.sum(impostor & (similarity >= best_genuine[:, None]), axis=1)
    result[start:stop] = np.where(genuine.any(axis=1), rank, 0)
  return result


def _summarise(probe_ranks: np.ndarray, ranks: Sequence[int]) -> IdentificationResult:
  """Turns per-probe ranks into rank-k accuracies."""
  ranked = probe_ranks[probe_ranks > 0]
  if not ranked.size:
    raise ValueError(f"none of the {probe_ranks.size} probes has a same-identity "
                     "candidate, so no rank can be computed")
  accuracies = {}
  for k in ranks:
    if k < 1:
      raise ValueError(f"ranks must be >= 1, got {k}")
    accuracies[f"rank_{k}"] = float(np.mean(ranked <= k))
  return IdentificationResult(rank_accuracies=accuracies,
                              num_probes=int(ranked.size),
                              num_skipped=int(probe_ranks.size - ranked.size))
