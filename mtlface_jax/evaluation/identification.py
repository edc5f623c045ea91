"""Closed-set identification: rank-k accuracy by cosine similarity.

Three protocols:
  * :func:`gallery_probe_identification`: every probe is ranked against a
    separate gallery (e.g. rank-1/rank-5 on gallery/probe lists).
  * :func:`leave_one_out_identification`: every image of a labelled set is a
    probe against all the OTHER images (the FG-NET leave-one-image-out
    protocol).
  * :func:`leave_one_person_out_identification`: folds by person (the FG-NET
    leave-one-person-out protocol); anything fitted on the embeddings sees
    only the other persons, and accuracies are also averaged per person.

:func:`thin_by_identity` and :func:`thin_gallery_probe` pick a smaller set
that keeps whole identities, so every kept probe still has its matches.

A probe's rank is 1 + the number of impostor (different-identity) candidates
whose similarity is >= the best genuine (same-identity) candidate. Counting
ties against the probe keeps degenerate embeddings (e.g. all equal) from
scoring well. Probes without any genuine candidate cannot be ranked and are
counted in ``num_skipped`` instead. Similarities are computed in chunks of
probes so memory stays ``chunk_size x num_candidates``.
"""

import dataclasses
from typing import Any, Callable, Optional, Sequence

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


@dataclasses.dataclass
class PersonFoldResult(IdentificationResult):
  """Leave-one-person-out accuracies; ``to_dict()`` is JSON-ready.

  Attributes:
    rank_accuracies: pooled over all ranked probes (as in the base class).
    mean_person_accuracies: the mean over persons (folds) of each person's
      rank-k accuracy, so a person with many photos counts once.
    num_persons: persons with at least one ranked probe (folds scored).
    num_persons_skipped: persons with a single image (no fold to score).
  """
  mean_person_accuracies: dict[str, float]
  num_persons: int
  num_persons_skipped: int


# fit(train_embeddings [M, D], train_labels [M]) -> transform([K, D]) -> [K, E]
FoldFit = Callable[[np.ndarray, np.ndarray], Callable[[np.ndarray], np.ndarray]]


def leave_one_person_out_identification(embeddings,
                                        labels,
                                        ranks: Sequence[int] = (1, 5),
                                        fit: Optional[FoldFit] = None,
                                        chunk_size: int = 256
                                        ) -> PersonFoldResult:
  """Leave-one-person-out identification (the FG-NET LOPO protocol).

  The set is cut into one fold per person. In fold ``p`` the test images are
  person ``p``'s, and whatever is learned from the data sees only the OTHER
  persons (in the AIFR literature on FG-NET, e.g. Li et al. TIFS 2011 and
  Gong et al. ICCV 2013, that is the whole model, trained on the other 81
  persons). Each test image is then a probe ranked against every other image
  of the set: the other persons' images (impostors) and ``p``'s remaining
  images (its matches). A model trained on other data (MTLFace on CASIA or
  SCAF) already never saw the FG-NET persons.

  Here the embedding model is fixed, so what a fold can learn is ``fit``: a
  projection, whitening, mean-centring... fitted on the other persons'
  embeddings and applied to all embeddings of the fold. Without ``fit`` the
  per-probe ranks are exactly those of :func:`leave_one_out_identification`
  (the pooled accuracies agree); the per-person means are new.

  Args:
    embeddings: [N, D] embeddings (L2-normalised here).
    labels: [N] person labels.
    ranks: the k values to report.
    fit: optional ``fit(train_embeddings, train_labels) -> transform``,
      called once per person with two or more images on the other persons'
      (normalised) embeddings; ``transform([K, D]) -> [K, E]`` maps the fold's
      embeddings, whose outputs are L2-normalised before ranking.
    chunk_size: probes scored at a time.

  Returns:
    A :class:`PersonFoldResult`.

  Raises:
    ValueError: on mismatched lengths, invalid embeddings or transform
      outputs, or no person with two or more images.
  """
  normalized = _normalized(embeddings, labels, "labelled set")
  labels = np.asarray(labels)
  _, person = np.unique(labels, return_inverse=True)
  person = person.reshape(-1)
  if fit is None:
    probe_ranks = _probe_ranks(normalized, labels, normalized, labels,
                               np.arange(labels.shape[0]), chunk_size)
    return _summarise_by_person(probe_ranks, person, ranks)
  probe_ranks = np.zeros(labels.shape[0], np.int64)
  for p in np.unique(person):
    test = np.flatnonzero(person == p)
    if test.size < 2:
      continue  # Nothing to match: counted as skipped, no fit needed.
    train = person != p
    transform = fit(normalized[train], labels[train])
    mapped = _normalized(transform(normalized), labels,
                         f"fold of person '{labels[test[0]]}': transformed")
    probe_ranks[test] = _probe_ranks(mapped[test], labels[test], mapped,
                                     labels, test, chunk_size)
  return _summarise_by_person(probe_ranks, person, ranks)


def _summarise_by_person(probe_ranks: np.ndarray, person: np.ndarray,
                         ranks: Sequence[int]) -> PersonFoldResult:
  """Pooled accuracies plus their mean over persons with ranked probes."""
  pooled = _summarise(probe_ranks, ranks)
  scored = [p for p in np.unique(person) if (probe_ranks[person == p] > 0).any()]
  means = {}
  for k in ranks:
    per_person = [np.mean(probe_ranks[(person == p) & (probe_ranks > 0)] <= k)
                  for p in scored]
    means[f"rank_{k}"] = float(np.mean(per_person))
  return PersonFoldResult(
      rank_accuracies=pooled.rank_accuracies, num_probes=pooled.num_probes,
      num_skipped=pooled.num_skipped, mean_person_accuracies=means,
      num_persons=len(scored),
      num_persons_skipped=int(np.unique(person).size - len(scored)))


def thin_by_identity(ids, max_images: Optional[int], *, min_images: int = 2,
                     seed: int = 0) -> np.ndarray:
  """Indices of at most ``max_images`` faces made of whole identities.

  Thinning a set evenly (every k-th face) leaves most identities with one
  image, so most probes of a leave-one-out run lose their matches. Here an
  identity is kept or dropped whole: identities with at least ``min_images``
  faces (fewer cannot be ranked) are visited in a fixed pseudo-random order
  and taken while they fit in what is left of ``max_images``.

  Args:
    ids: [N] identity labels (ints or strings).
    max_images: the budget; None, 0 or >= N keeps every face.
    min_images: smallest identity worth keeping.
    seed: the visiting order (the same seed picks the same identities).

  Returns:
    Sorted int64 indices into ``ids``.

  Raises:
    ValueError: if no identity of ``min_images`` or more faces fits.
  """
  ids = np.asarray(ids).reshape(-1)
  if not max_images or max_images >= ids.size:
    return np.arange(ids.size, dtype=np.int64)
  return _take_identities([ids], max_images, min_images, seed)[0]


def thin_gallery_probe(gallery_ids, probe_ids, max_images: Optional[int], *,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Whole identities present in both sets, at most ``max_images`` per set.

  Gallery/probe thinning that keeps every kept probe's gallery matches:
  identities found in both sets are visited in a fixed pseudo-random order
  and taken (all their gallery and probe faces) while both sets stay within
  ``max_images``.

  Args:
    gallery_ids: [G] gallery identity labels.
    probe_ids: [P] probe identity labels.
    max_images: budget per set; None, 0, or a budget both sets already meet
      keeps everything.
    seed: the visiting order.

  Returns:
    ``(gallery indices, probe indices)``, each sorted int64.

  Raises:
    ValueError: if no shared identity fits.
  """
  gallery_ids = np.asarray(gallery_ids).reshape(-1)
  probe_ids = np.asarray(probe_ids).reshape(-1)
  if not max_images or max(gallery_ids.size, probe_ids.size) <= max_images:
    return (np.arange(gallery_ids.size, dtype=np.int64),
            np.arange(probe_ids.size, dtype=np.int64))
  kept = _take_identities([gallery_ids, probe_ids], max_images, 1, seed)
  return kept[0], kept[1]


def _take_identities(id_sets: Sequence[np.ndarray], budget: int,
                     min_images: int, seed: int) -> list[np.ndarray]:
  """Greedy whole-identity selection shared by the thinning helpers."""
  counts = []
  for ids in id_sets:
    names, size = np.unique(ids, return_counts=True)
    counts.append(dict(zip(names.tolist(), size.tolist())))
  shared = sorted(set.intersection(*(set(c) for c in counts)), key=str)
  eligible = [n for n in shared if all(c[n] >= min_images for c in counts)]
  order = np.random.default_rng(seed).permutation(len(eligible))
  used, chosen = [0] * len(id_sets), []
  for i in order:
    sizes = [c[eligible[i]] for c in counts]
    if all(u + s <= budget for u, s in zip(used, sizes)):
      chosen.append(eligible[i])
      used = [u + s for u, s in zip(used, sizes)]
  if not chosen:
    smallest = min((max(c[n] for c in counts) for n in eligible), default=None)
    raise ValueError(
        f"no whole identity fits in {budget} images (smallest eligible "
        f"identity: {smallest} images, at least {min_images} per identity)")
  return [np.flatnonzero(np.isin(ids, chosen)).astype(np.int64)
          for ids in id_sets]


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
