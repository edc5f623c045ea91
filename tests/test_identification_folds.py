"""Known-answer tests of leave-one-person-out identification and of the
whole-identity thinning helpers (mtlface_jax.evaluation.identification)."""

import numpy as np
import pytest

from mtlface_jax.evaluation import identification as id_lib


def unit_vectors(degrees):
  radians = np.deg2rad(np.asarray(degrees, np.float64))
  return np.stack([np.cos(radians), np.sin(radians)], axis=1)


# Persons A (0, 20, 180 deg), B (90, 100) and C (270, alone). Probe ranks:
# A@0 -> 1 (A@20 beats everyone); A@20 -> 1; A@180 -> 4 (its best match,
# A@20 at 160 deg, is beaten by B@90, B@100 and C@270); B@90 and B@100 -> 1;
# C has no match (skipped).
HAND_DEGREES = [0, 20, 180, 90, 100, 270]
HAND_LABELS = np.array(["A", "A", "A", "B", "B", "C"])


@pytest.mark.parametrize("chunk_size", [1, 256])
def test_leave_one_person_out_identification_on_constructed_case(chunk_size):
  result = id_lib.leave_one_person_out_identification(
      unit_vectors(HAND_DEGREES), HAND_LABELS, ranks=(1, 3, 4),
      chunk_size=chunk_size)
  assert result.rank_accuracies == {"rank_1": pytest.approx(4 / 5),
                                    "rank_3": pytest.approx(4 / 5),
                                    "rank_4": 1.0}
  # Per person: A 2/3, B 1 at rank 1; averaged over the two scored persons.
  assert result.mean_person_accuracies == {"rank_1": pytest.approx(5 / 6),
                                           "rank_3": pytest.approx(5 / 6),
                                           "rank_4": 1.0}
  assert (result.num_probes, result.num_skipped) == (5, 1)
  assert (result.num_persons, result.num_persons_skipped) == (2, 1)
  # Without a fitted step the ranks are the leave-one-image-out ranks.
  loo = id_lib.leave_one_out_identification(unit_vectors(HAND_DEGREES),
                                            HAND_LABELS, ranks=(1, 3, 4))
  assert loo.rank_accuracies == result.rank_accuracies
  assert result.to_dict()["mean_person_accuracies"]["rank_1"] == pytest.approx(
      5 / 6)


def test_each_fold_fits_on_the_other_persons_only():
  seen = []

  def fit(train_embeddings, train_labels):
    seen.append((len(train_embeddings), sorted(set(train_labels.tolist()))))
    return lambda x: x

  result = id_lib.leave_one_person_out_identification(
      unit_vectors(HAND_DEGREES), HAND_LABELS, ranks=(1,), fit=fit)
  # One fit per person with a match (C has none): never on its own images.
  assert seen == [(3, ["B", "C"]), (4, ["A", "C"])]
  assert result.rank_accuracies == {"rank_1": pytest.approx(4 / 5)}


def test_a_fold_transform_changes_the_ranks_as_computed_by_hand():
  # A fit that drops the axis along which the training persons vary most
  # within a person (a one-step "remove the age direction").
  def drop_within_person_axis(train_embeddings, train_labels):
    spread = sum(np.ptp(train_embeddings[train_labels == name], axis=0)
                 for name in np.unique(train_labels))
    keep = np.arange(train_embeddings.shape[1]) != np.argmax(spread)
    return lambda x: x[:, keep]

  # Axis 0 separates persons, axis 1 is a nuisance that B and C vary along.
  embeddings = np.array([[2.0, 1.0], [2.0, -3.0],    # A
                         [-1.0, 3.0], [-1.0, -3.0],  # B
                         [0.5, 3.0], [0.5, -3.0]])   # C
  labels = np.array(["A", "A", "B", "B", "C", "C"])
  plain = id_lib.leave_one_person_out_identification(embeddings, labels,
                                                      ranks=(1,))
  fitted = id_lib.leave_one_person_out_identification(
      embeddings, labels, ranks=(1,), fit=drop_within_person_axis)
  # Every fold drops axis 1: persons become +1, -1, +1 on one axis, so A's
  # probes tie with C's images (ties count against the probe: rank 3) and
  # so do C's with A's; B's two images are alone at -1 (rank 1).
  assert fitted.rank_accuracies == {"rank_1": pytest.approx(2 / 6)}
  assert fitted.mean_person_accuracies == {"rank_1": pytest.approx(1 / 3)}
  # On the raw embeddings the nuisance axis wins: A@(2,1) is nearer C@(.5,3)
  # than A@(2,-3), so not every probe is at rank 1.
  assert plain.rank_accuracies["rank_1"] < 1.0


def test_fold_transform_output_is_validated():
  with pytest.raises(ValueError, match="fold of person 'A'.*all-zero"):
    id_lib.leave_one_person_out_identification(
        unit_vectors(HAND_DEGREES), HAND_LABELS,
        fit=lambda e, l: (lambda x: np.zeros_like(x)))


# --------------------------------------------------------------- thinning


def test_thin_by_identity_keeps_whole_identities():
  ids = np.array(list("aaabbcdddd"))
  for seed in range(12):
    kept = id_lib.thin_by_identity(ids, 5, seed=seed)
    assert kept.dtype == np.int64 and np.all(np.diff(kept) > 0)
    names = set(ids[kept].tolist())
    # Whole identities only, never the single-image "c", within budget...
    assert all(np.sum(ids[kept] == n) == np.sum(ids == n) for n in names)
    assert "c" not in names and 0 < kept.size <= 5
    # ... and no left-out identity would still fit.
    for name in {"a", "b", "d"} - names:
      assert kept.size + np.sum(ids == name) > 5
  np.testing.assert_array_equal(id_lib.thin_by_identity(ids, 5, seed=3),
                                id_lib.thin_by_identity(ids, 5, seed=3))
  np.testing.assert_array_equal(id_lib.thin_by_identity(ids, 0), np.arange(10))
  np.testing.assert_array_equal(id_lib.thin_by_identity(ids, None),
                                np.arange(10))
  np.testing.assert_array_equal(id_lib.thin_by_identity(ids, 10),
                                np.arange(10))
  with pytest.raises(ValueError, match="smallest eligible identity: 2"):
    id_lib.thin_by_identity(ids, 1)


def test_thinned_leave_one_out_keeps_every_probe_matched():
  rng = np.random.default_rng(0)
  ids = np.repeat(np.arange(20), 3)  # Sorted by identity, as folders are.
  embeddings = rng.normal(size=(60, 8))
  # Every 3rd face (even spacing) leaves one face per identity: no match.
  even = np.unique(np.linspace(0, 59, 20).round().astype(int))
  with pytest.raises(ValueError, match="no rank can be computed"):
    id_lib.leave_one_out_identification(embeddings[even], ids[even])
  kept = id_lib.thin_by_identity(ids, 20)
  assert kept.size == 18  # Six whole identities of three.
  result = id_lib.leave_one_out_identification(embeddings[kept], ids[kept])
  assert result.num_skipped == 0 and result.num_probes == 18


def test_thin_gallery_probe_keeps_the_probes_matches():
  gallery = np.array(list("aabccc"))
  probe = np.array(list("abbd"))
  g, p = id_lib.thin_gallery_probe(gallery, probe, 3)
  # Only a and b are in both sets; together they fill 3 + 3.
  np.testing.assert_array_equal(g, [0, 1, 2])
  np.testing.assert_array_equal(p, [0, 1, 2])
  g, p = id_lib.thin_gallery_probe(gallery, probe, 2)
  assert set(gallery[g]) == set(probe[p]) and len(set(gallery[g])) == 1
  g, p = id_lib.thin_gallery_probe(gallery, probe, 6)
  assert g.size == 6 and p.size == 4
  with pytest.raises(ValueError, match="no whole identity fits in 1"):
    id_lib.thin_gallery_probe(gallery, probe, 1)
