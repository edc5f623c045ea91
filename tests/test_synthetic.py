"""Tests of the procedural face renderer and the synthetic dataset."""

import numpy as np
import pytest

from mtlface_jax import synthetic


@pytest.fixture(scope="module")
def small_dataset():
  return synthetic.make_dataset(num_identities=30, images_per_identity=6,
                                seed=7, test_fraction=0.2, num_folds=2,
                                pairs_per_fold=8, min_age_gap=20)


def _render(seed, num_threads=None):
  rng = np.random.default_rng(seed)
  identities = synthetic.sample_identities(5, rng)
  ids = np.repeat(np.arange(5), 12)
  ages = np.tile(np.linspace(0, 80, 12), 5)
  return synthetic.render_faces(identities.take(ids), ages, rng, num_threads)


def test_renderer_is_deterministic_and_thread_independent():
  first = _render(3)
  assert first.shape == (60, 112, 112, 3) and first.dtype == np.uint8
  np.testing.assert_array_equal(first, _render(3))
  np.testing.assert_array_equal(first, _render(3, num_threads=1))
  assert np.mean(first != _render(4)) > 0.5
  # Not degenerate: the images vary and use the intensity range.
  assert first.std() > 30 and first.min() < 30 and first.max() > 220


def test_render_rejects_mismatched_inputs():
  rng = np.random.default_rng(0)
  identities = synthetic.sample_identities(2, rng)
  with pytest.raises(ValueError, match="one row per image"):
    synthetic.render_faces(identities, [10.0, 20.0, 30.0], rng)
  with pytest.raises(ValueError, match="ages must lie"):
    synthetic.render_faces(identities, [10.0, 130.0], rng)


def test_make_dataset_is_deterministic(small_dataset):
  again = synthetic.make_dataset(num_identities=30, images_per_identity=6,
                                 seed=7, test_fraction=0.2, num_folds=2,
                                 pairs_per_fold=8, min_age_gap=20)
  np.testing.assert_array_equal(again.train.images, small_dataset.train.images)
  np.testing.assert_array_equal(again.pairs, small_dataset.pairs)


def test_splits_have_disjoint_identities_and_valid_labels(small_dataset):
  train, test = small_dataset.train, small_dataset.test
  num_train = small_dataset.num_train_identities
  assert num_train == 24 and len(train) == 24 * 6 and len(test) == 6 * 6
  assert set(train.ids) == set(range(num_train))
  assert set(test.ids) == set(range(num_train, 30))
  for split in (train, test):
    assert split.images.shape[1:] == (112, 112, 3)
    assert split.ages.min() >= 0 and split.ages.max() <= 80
    np.testing.assert_array_equal(split.ages, np.round(split.ages))
    for identity in np.unique(split.ids):
      member = split.ids == identity
      assert len(set(split.genders[member])) == 1  # Gender is per identity.
      # Stratified ages: every identity spans childhood to old age.
      assert split.ages[member].min() < 14 and split.ages[member].max() > 66


def test_pairs_are_valid_cross_age_and_fold_disjoint(small_dataset):
  pairs, test = small_dataset.pairs, small_dataset.test
  assert pairs.shape == (2 * 2 * 8, 4)
  a, b, same, fold = pairs.T
  assert a.min() >= 0 and max(a.max(), b.max()) < len(test)
  np.testing.assert_array_equal(same, test.ids[a] == test.ids[b])
  assert np.all(np.abs(test.ages[a] - test.ages[b]) >= 20)
  assert len({(min(x, y), max(x, y)) for x, y in zip(a, b)}) == len(pairs)
  for f in (0, 1):
    in_fold = fold == f
    assert same[in_fold].sum() == 8 and (~same[in_fold].astype(bool)).sum() == 8
    others = set(test.ids[np.r_[a[~in_fold], b[~in_fold]]])
    assert not set(test.ids[np.r_[a[in_fold], b[in_fold]]]) & others


def test_impossible_pair_requests_raise():
  with pytest.raises(ValueError, match="matched pairs"):
    synthetic.make_pairs(np.repeat([0, 1, 2, 3], 2), np.tile([0, 5], 4),
                         np.zeros(8, int), 2, 1, 20, np.random.default_rng(0))
  with pytest.raises(ValueError, match="leave none for training"):
    synthetic.make_dataset(num_identities=10, images_per_identity=2)


def test_train_only_dataset():
  data = synthetic.make_dataset(num_identities=10, images_per_identity=3,
                                test_fraction=0)
  assert len(data.train) == 30 and len(data.test) == 0
  assert data.pairs.shape == (0, 4) and data.num_train_identities == 10


def _pooled(images, top, bottom, left, right):
  """8x8-pooled crop standardised per image: a 'simple feature'."""
  crop = images[:, top:bottom, left:right].astype(np.float32)
  h, w = (bottom - top) // 8, (right - left) // 8
  pooled = crop.reshape(len(crop), h, 8, w, 8, 3).mean((2, 4))
  flat = pooled.reshape(len(crop), -1)
  return (flat - flat.mean(1, keepdims=True)) / flat.std(1, keepdims=True)


def test_identity_recognisable_across_ages_and_age_visible():
  rng = np.random.default_rng(0)
  num_ids, per_id = 40, 10
  identities = synthetic.sample_identities(num_ids, rng)
  ages = synthetic.stratified_ages(num_ids, per_id, 80, rng).reshape(-1)
  ids = np.repeat(np.arange(num_ids), per_id)
  images = synthetic.render_faces(identities.take(ids), ages, rng)
  features = _pooled(images, 30, 94, 24, 88)  # Inner face.
  # Nearest centroid, gallery and probes from different halves of life.
  accuracies = []
  for gallery, probe in ((ages < 40, ages >= 40), (ages >= 40, ages < 40)):
    centroids = np.stack([features[gallery & (ids == i)].mean(0)
                          for i in range(num_ids)])
    distances = ((features[probe, None] - centroids[None]) ** 2).sum(-1)
    accuracies.append(np.mean(distances.argmin(1) == ids[probe]))
  print("cross-age accuracy", accuracies)
  assert np.mean(accuracies) > 6 / num_ids, accuracies  # Chance: 1/40.
  # Age: ridge regression on identities it never saw (head and hair too).
  train = ids < 30
  x = np.c_[_pooled(images, 8, 104, 16, 96), np.ones(len(images))]
  weights = np.linalg.solve(x[train].T @ x[train] + 10 * np.eye(x.shape[1]),
                            x[train].T @ ages[train])
  correlation = np.corrcoef(x[~train] @ weights, ages[~train])[0, 1]
  print("age correlation", correlation)
  assert correlation > 0.6, correlation


def test_growth_and_senescence_curves():
  ages = np.array([0, 10, 20, 30, 55, 80])
  np.testing.assert_allclose(synthetic.growth(ages)[[0, 2, 3]], [0, 1, 1])
  assert 0.6 < synthetic.growth(10) < 0.9
  np.testing.assert_allclose(synthetic.senescence(ages), [0, 0, 0, 0, 0.5, 1])
