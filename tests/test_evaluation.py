"""Known-answer tests of the evaluation library (mtlface_jax.evaluation)."""

import json
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mtlface_jax import predict
from mtlface_jax.evaluation import age as age_lib
from mtlface_jax.evaluation import datasets
from mtlface_jax.evaluation import fas as fas_lib
from mtlface_jax.evaluation import identification as id_lib
from mtlface_jax.evaluation import protocols
from mtlface_jax.evaluation import report as report_lib
from mtlface_jax.evaluation import runner
from mtlface_jax.evaluation import verification as ver_lib
from mtlface_jax.formats import binset
from mtlface_jax.formats import images as images_lib
from mtlface_jax.formats import lists
from mtlface_jax.models import heads


def pairs_with_scores(scores):
  """Embedding pairs whose cosine similarities are exactly ``scores``."""
  scores = np.asarray(scores, np.float64)
  first = np.tile([1.0, 0.0], (scores.size, 1))
  second = np.stack([scores, np.sqrt(1.0 - scores**2)], axis=1)
  return first, second


def unit_vectors(degrees):
  radians = np.deg2rad(np.asarray(degrees, np.float64))
  return np.stack([np.cos(radians), np.sin(radians)], axis=1)


# Hand-computed 10-fold case: 10 contiguous folds (labels 0-9) of (positive,
# negative). Folds 0-6: (0.9, 0.1); fold 7: (0.9, 0.5); fold 8: (0.4, 0.1);
# fold 9: (0.6, 0.7).
HAND_POS = [0.9] * 8 + [0.4, 0.6]
HAND_NEG = [0.1] * 7 + [0.5, 0.1, 0.7]


def hand_case():
  scores = np.ravel(np.column_stack([HAND_POS, HAND_NEG]))  # pos, neg per fold.
  issame = np.tile([True, False], 10)
  return issame, *pairs_with_scores(scores)


# --------------------------------------------------------------------------- #
# Verification.
# --------------------------------------------------------------------------- #


def test_hand_computed_ten_folds():
  result = ver_lib.evaluate_verification(*hand_case())
  # Folds 0-6: training optimum ties at 0.25/0.55/0.8 -> lowest, 0.25; held-out
  # (0.9, 0.1) is right. Fold 7: threshold 0.25 accepts its 0.5 negative. Fold 8:
  # without it 0.55 wins and rejects its 0.4 positive. Fold 9: 0.25 accepts
  # its 0.7 negative.
  assert result.fold_labels == list(range(10))
  assert result.fold_accuracies == [1.0] * 7 + [0.5, 0.5, 0.5]
  np.testing.assert_allclose(result.fold_thresholds, [0.25] * 8 + [0.55, 0.25], atol=1e-9)
  assert result.accuracy_mean == pytest.approx(0.85)
  assert result.accuracy_std == pytest.approx(np.sqrt(0.0525))
  # All 20 pairs: 18/20 right at 0.25 (also at 0.55 and 0.8; lowest wins).
  assert result.best_threshold == pytest.approx(0.25)
  assert result.best_threshold_accuracy == pytest.approx(0.9)
  # Positive beats negative in 80 + 8 + 9 of the 100 (pos, neg) combinations.
  assert result.auc == pytest.approx(0.97)
  assert (result.num_pairs, result.num_positive, result.num_negative) == (20, 10, 10)


def test_eval_folds_choose_thresholds_on_other_evaluated_folds_only():
  issame, first, second = hand_case()
  result = ver_lib.evaluate_verification(issame, first, second, eval_folds=[9, 7, 8])
  # Fold 8 alone with folds 7 and 9: 0.55 and 0.8 tie at 3/4, 0.55 wins.
  assert result.fold_labels == [7, 8, 9]
  assert result.fold_accuracies == [0.5, 0.5, 0.5]
  np.testing.assert_allclose(result.fold_thresholds, [0.25, 0.55, 0.25], atol=1e-9)
  assert result.accuracy_std == 0.0
  assert result.num_pairs == 6


def test_explicit_folds_match_contiguous_default():
  issame, first, second = hand_case()
  folds = np.repeat(np.arange(10), 2)
  explicit = ver_lib.evaluate_verification(issame, first, second, folds=folds)
  default = ver_lib.evaluate_verification(issame, first, second)
  assert explicit.to_dict() == default.to_dict()


def test_perfectly_separable_embeddings_score_100_percent():
  rng = np.random.default_rng(0)
  num_pairs = 600
  issame = np.tile(np.repeat([True, False], 30), 10)
  first = rng.normal(size=(num_pairs, 64))
  second = np.where(issame[:, None], first + 0.01 * rng.normal(size=first.shape),
                    rng.normal(size=first.shape))
  result = ver_lib.evaluate_verification(issame, first, second)
  assert result.accuracy_mean == 1.0
  assert result.accuracy_std == 0.0
  assert result.auc == 1.0
  assert result.eer == 0.0
  assert result.tar(1e-3) == 1.0 and result.tar(1e-4) == 1.0


def test_random_embeddings_score_about_50_percent():
  rng = np.random.default_rng(1)
  num_pairs = 6000
  issame = rng.random(num_pairs) < 0.5
  first = rng.normal(size=(num_pairs, 32))
  second = rng.normal(size=(num_pairs, 32))
  result = ver_lib.evaluate_verification(issame, first, second)
  assert abs(result.accuracy_mean - 0.5) < 0.03
  assert abs(result.auc - 0.5) < 0.03
  assert abs(result.eer - 0.5) < 0.03


def test_tar_at_far_on_constructed_scores():
  # 10000 negatives: 19 high ones at 0.95, 0.90, ..., 0.05, the rest at -0.5.
  # 100 positives at 0.005, 0.015, ..., 0.995.
  negatives = np.concatenate([1.0 - 0.05 * np.arange(1, 20), np.full(9981, -0.5)])
  positives = 0.005 + 0.01 * np.arange(100)
  scores = np.concatenate([positives, negatives])
  issame = np.arange(scores.size) < 100
  # FAR 1e-3 allows 10 false accepts: accept above the 11th negative (0.45),
  # i.e. 55 positives; FAR 1e-4 allows 1: above 0.90, i.e. 10 positives.
  tar, threshold = ver_lib.tar_at_far(scores, issame, 1e-3)
  assert tar == pytest.approx(0.55)
  assert np.sum(negatives >= threshold) == 10
  assert ver_lib.tar_at_far(scores, issame, 1e-4)[0] == pytest.approx(0.10)
  assert ver_lib.tar_at_far(scores, issame, 0.0)[0] == pytest.approx(0.05)
  result = ver_lib.evaluate_verification(issame, *pairs_with_scores(scores),
                                         folds=np.arange(scores.size) % 10)
  assert result.tar(1e-3) == pytest.approx(0.55)
  assert result.tar(1e-4) == pytest.approx(0.10)


def test_tar_at_far_counts_tied_negatives_as_accepted():
  # Two negatives tie at the top: allowing one false accept must reject both.
  scores = np.array([0.9, 0.7, 0.8, 0.8, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
  issame = np.array([True, True] + [False] * 8)
  tar, _ = ver_lib.tar_at_far(scores, issame, 0.125)  # 1 of 8 negatives.
  assert tar == 0.5


def test_equal_error_rate_on_roc_point():
  # 8 positives at 0.9 and 2 at 0.3; 8 negatives at 0.1 and 2 at 0.7: accepting
  # >= 0.7 gives FPR = FNR = 0.2 exactly.
  scores = np.array([0.9] * 8 + [0.3] * 2 + [0.1] * 8 + [0.7] * 2)
  issame = np.arange(20) < 10
  eer, threshold = ver_lib.equal_error_rate(*ver_lib.roc_curve(scores, issame))
  assert eer == pytest.approx(0.2)
  assert threshold == pytest.approx(0.7)


def test_equal_error_rate_interpolates_across_a_tie():
  # ROC: (0,0) -> (0,.5) at 0.9 -> (.5,1) at the 0.5 tie -> (1,1). FNR - FPR
  # goes 0.5 -> -0.5 on the middle segment: EER 0.25 halfway, threshold 0.7.
  scores = np.array([0.9, 0.5, 0.5, 0.1])
  issame = np.array([True, True, False, False])
  eer, threshold = ver_lib.equal_error_rate(*ver_lib.roc_curve(scores, issame))
  assert eer == pytest.approx(0.25)
  assert threshold == pytest.approx(0.7)


def test_auc_matches_brute_force_pairwise_count():
  rng = np.random.default_rng(2)
  scores = np.round(rng.normal(size=300), 1)  # Rounded: many ties.
  issame = rng.random(300) < 0.4
  positives, negatives = scores[issame], scores[~issame]
  wins = (positives[:, None] > negatives[None, :]).sum()
  ties = (positives[:, None] == negatives[None, :]).sum()
  expected = (wins + 0.5 * ties) / (positives.size * negatives.size)
  fpr, tpr, _ = ver_lib.roc_curve(scores, issame)
  assert ver_lib.roc_auc(fpr, tpr) == pytest.approx(expected, abs=1e-12)


def test_accuracy_sweep_with_grid_matches_direct_count():
  rng = np.random.default_rng(3)
  scores = rng.uniform(-1, 1, 200)
  issame = rng.random(200) < 0.5
  grid = np.linspace(-1, 1, 41)
  _, accuracies = ver_lib.accuracy_sweep(scores, issame, grid)
  direct = [np.mean((scores >= t) == issame) for t in grid]
  np.testing.assert_allclose(accuracies, direct)


def test_unequal_lengths_raise():
  issame, first, second = hand_case()
  with pytest.raises(ValueError, match="unequal lengths"):
    ver_lib.evaluate_verification(issame[:-1], first, second)
  with pytest.raises(ValueError, match="unequal lengths"):
    ver_lib.evaluate_verification(issame, first, second, folds=np.ones(3, int))


def test_fold_without_positive_or_negative_raises_naming_it():
  issame, first, second = hand_case()
  folds = np.repeat(np.arange(10), 2)
  issame = issame.copy()
  issame[4] = False  # Fold 2 now holds two negatives.
  with pytest.raises(ValueError, match="fold 2 has no positive"):
    ver_lib.evaluate_verification(issame, first, second, folds=folds)
  issame[4], issame[5] = True, True
  with pytest.raises(ValueError, match="fold 2 has no negative"):
    ver_lib.evaluate_verification(issame, first, second, folds=folds)


def test_nan_embedding_and_bad_fold_selection_raise():
  issame, first, second = hand_case()
  second = second.copy()
  second[7, 1] = np.nan
  with pytest.raises(ValueError, match="embeddings2 has NaN/inf.*row 7"):
    ver_lib.evaluate_verification(issame, first, second)
  issame, first, second = hand_case()
  with pytest.raises(ValueError, match=r"eval_folds \[10\] not present"):
    ver_lib.evaluate_verification(issame, first, second, eval_folds=[9, 10])
  with pytest.raises(ValueError, match="at least 2 folds"):
    ver_lib.evaluate_verification(issame, first, second, eval_folds=[4])
  with pytest.raises(ValueError, match="fold labels must be >= 0"):
    ver_lib.evaluate_verification(issame, first, second, folds=np.full(20, -1))


# --------------------------------------------------------------------------- #
# Identification.
# --------------------------------------------------------------------------- #


def test_gallery_probe_ranks_on_constructed_case():
  gallery = unit_vectors([0, 90, 180, 270])
  gallery_labels = np.array(["A", "B", "C", "D"])
  # Probe A near A (rank 1); probe C at 80 deg: B, A, C, D (rank 3); probe D on
  # top of B: D is last (rank 4); probe E has no gallery identity (skipped).
  probes = unit_vectors([10, 80, 90, 45])
  probe_labels = np.array(["A", "C", "D", "E"])
  result = id_lib.gallery_probe_identification(gallery, gallery_labels, probes,
                                               probe_labels, ranks=(1, 3, 4))
  assert result.rank_accuracies == {"rank_1": pytest.approx(1 / 3),
                                    "rank_3": pytest.approx(2 / 3), "rank_4": 1.0}
  assert (result.num_probes, result.num_skipped) == (3, 1)


def test_gallery_probe_ties_count_against_the_probe():
  gallery = unit_vectors([0, 90])
  probes = unit_vectors([45])
  result = id_lib.gallery_probe_identification(gallery, [1, 2], probes, [1], ranks=(1, 2))
  assert result.rank_accuracies == {"rank_1": 0.0, "rank_2": 1.0}


@pytest.mark.parametrize("chunk_size", [1, 2, 256])
def test_leave_one_out_ranks_on_constructed_case(chunk_size):
  # Probe ranks: 0 deg -> 1 (its mate at 20 beats 30); 20 -> 2 (30 is closer);
  # 30 -> 3 (20 and 0 beat its mate at 90); 90 -> 1; 180 is alone (skipped).
  embeddings = unit_vectors([0, 20, 30, 90, 180])
  labels = np.array([1, 1, 2, 2, 3])
  result = id_lib.leave_one_out_identification(embeddings, labels, ranks=(1, 2, 5),
                                               chunk_size=chunk_size)
  assert result.rank_accuracies == {"rank_1": 0.5, "rank_2": 0.75, "rank_5": 1.0}
  assert (result.num_probes, result.num_skipped) == (4, 1)


def test_identification_bad_input_raises():
  with pytest.raises(ValueError, match="one label per embedding"):
    id_lib.leave_one_out_identification(unit_vectors([0, 1, 2]), [1, 1])
  with pytest.raises(ValueError, match="no rank can be computed"):
    id_lib.leave_one_out_identification(unit_vectors([0, 1, 2]), [1, 2, 3])


# --------------------------------------------------------------------------- #
# Age estimation.
# --------------------------------------------------------------------------- #


def test_age_metrics_hand_case():
  predicted = [10, 28, 33, 70, 5]
  true = [12, 29, 33, -1, 30]  # The -1 sample is ignored.
  result = age_lib.age_metrics(predicted, true, num_groups=7)
  # Errors 2, 1, 0, 25. Groups (7 groups, thresholds 10..60): predicted 0, 2,
  # 3, 0 against true 1, 2, 3, 2.
  assert result.mae == pytest.approx(7.0)
  assert result.cs == pytest.approx(0.75)
  assert result.group_accuracy == pytest.approx(0.5)
  assert (result.num_samples, result.num_ignored) == (4, 1)
  with_head = age_lib.age_metrics(predicted, true, predicted_groups=[1, 2, 3, 0, 2])
  assert with_head.group_accuracy == 1.0


def test_age_metrics_errors_and_expected_age():
  with pytest.raises(ValueError, match="unequal lengths"):
    age_lib.age_metrics([1, 2], [1])
  with pytest.raises(ValueError, match="index 1"):
    age_lib.age_metrics([1, np.nan], [1, 2])
  logits = np.full((2, 101), -1e9)
  logits[0, 30] = 0.0
  logits[1, [20, 40]] = 0.0
  # The one DEX expectation is the model's (evaluation reads it off the model).
  np.testing.assert_allclose(heads.expected_age(jnp.asarray(logits, jnp.float32)), [30.0, 30.0],
                             rtol=1e-6)


# --------------------------------------------------------------------------- #
# Face age synthesis.
# --------------------------------------------------------------------------- #


def test_fas_metrics_hand_case():
  targets = [0, 1, 1, 2]
  estimated = [0, 1, 2, 0]
  inputs = unit_vectors([0, 0, 0, 0])
  synthesized = unit_vectors([0, 60, 90, 180])  # Cosines 1, 0.5, 0, -1.
  result = fas_lib.fas_metrics(targets, estimated, inputs, synthesized, num_groups=4,
                               estimated_ages=[20, 33, 35, 70])
  assert result.age_accuracy == 0.5
  assert result.identity_preservation == pytest.approx(0.125)
  group1 = result.per_group[1]
  assert (group1["label"], group1["count"]) == ("31-40", 2)
  assert group1["age_accuracy"] == 0.5
  assert group1["identity_preservation"] == pytest.approx(0.25)
  assert group1["mean_estimated_age"] == pytest.approx(34.0)
  assert result.per_group[3]["count"] == 0 and result.per_group[3]["age_accuracy"] is None
  with pytest.raises(ValueError, match="outside"):
    fas_lib.fas_metrics([4], [0], inputs[:1], inputs[:1], num_groups=4)


def test_fas_metrics_all_groups_flattens_consistently():
  rng = np.random.default_rng(4)
  inputs = rng.normal(size=(3, 8))
  synthesized = rng.normal(size=(3, 4, 8))
  estimated = rng.integers(0, 4, size=(3, 4))
  result = fas_lib.fas_metrics_all_groups(estimated, inputs, synthesized)
  expected_accuracy = np.mean(estimated == np.arange(4)[None, :])
  assert result.age_accuracy == pytest.approx(expected_accuracy)
  assert [g["count"] for g in result.per_group] == [3, 3, 3, 3]


def test_age_progression_grid_png(tmp_path):
  inputs = np.full((2, 8, 6, 3), -1.0, np.float32)
  synthesized = np.ones((2, 3, 8, 6, 3), np.float32)
  synthesized[1, 2] = 0.0
  path = fas_lib.save_age_progression_grid(inputs, synthesized, tmp_path / "g" / "grid.png")
  grid = np.asarray(Image.open(path))
  assert grid.shape == (16, 24, 3)
  assert grid[0, 0].tolist() == [0, 0, 0]  # Input column: -1 -> 0.
  assert grid[0, 6].tolist() == [255, 255, 255]  # Synthesized 1 -> 255.
  assert grid[8, 18].tolist() == [128, 128, 128]  # Row 2, group 2: 0 -> 128.
  labelled = fas_lib.save_age_progression_grid(inputs, synthesized, tmp_path / "l.png",
                                               group_labels=["a", "b", "c"])
  assert np.asarray(Image.open(labelled)).shape == (16 + fas_lib.HEADER_HEIGHT, 24, 3)
  with pytest.raises(ValueError, match="2 group labels for 3 groups"):
    fas_lib.save_age_progression_grid(inputs, synthesized, tmp_path / "x.png", ["a", "b"])


# --------------------------------------------------------------------------- #
# Reports and embedding extraction.
# --------------------------------------------------------------------------- #


def test_json_report_round_trip(tmp_path):
  result = ver_lib.evaluate_verification(*hand_case())
  report = {"lfw": result, "count": np.int64(3), "values": np.arange(3, dtype=np.float32),
            "nan": float("nan"), "nested": {1: (np.float32(0.5), tmp_path)}}
  path = report_lib.write_json_report(report, tmp_path / "out" / "report.json")
  loaded = report_lib.read_json_report(path)
  assert loaded["lfw"] == json.loads(json.dumps(result.to_dict()))
  assert loaded["lfw"]["fold_accuracies"] == [1.0] * 7 + [0.5] * 3
  assert "roc_fpr" not in loaded["lfw"]
  assert loaded["count"] == 3 and loaded["values"] == [0.0, 1.0, 2.0]
  assert loaded["nan"] is None
  assert loaded["nested"] == {"1": [0.5, str(tmp_path)]}
  table = report_lib.verification_table({"lfw": result})
  assert "85.00 +- 22.91" in table and "TAR@FAR=0.001" in table


def test_roc_plot_writes_png(tmp_path):
  result = ver_lib.evaluate_verification(*hand_case())
  path = report_lib.plot_roc_curves({"hand": result, "diag": ([0, 0.5, 1], [0, 0.5, 1])},
                                    tmp_path / "roc.png")
  with Image.open(path) as image:
    assert image.format == "PNG" and image.width > 100


def test_extract_embeddings_pads_and_compiles_once():
  traces = []

  @jax.jit
  def embed(batch):
    traces.append(batch.shape)  # Runs only when tracing.
    return batch.sum(axis=(1, 2)), batch[:, 0, 0, 0]

  images = np.arange(10 * 2 * 2 * 3, dtype=np.float32).reshape(10, 2, 2, 3)
  sums, corners = runner.extract_embeddings(embed, images, batch_size=4, progress=False)
  assert traces == [(4, 2, 2, 3)]
  np.testing.assert_allclose(sums, images.sum(axis=(1, 2)))
  np.testing.assert_allclose(corners, images[:, 0, 0, 0])
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  sharded, _ = runner.extract_embeddings(embed, iter(images), 4, sharding=sharding,
                                             progress=False)
  np.testing.assert_allclose(sharded, sums)


def test_extract_embeddings_bad_input():
  with pytest.raises(ValueError, match="image 2 has shape"):
    runner.extract_embeddings(lambda x: x, [np.zeros((2, 2, 3))] * 2 + [np.zeros((3, 2, 3))],
                                  2, progress=False)
  with pytest.raises(ValueError, match="no images"):
    runner.extract_embeddings(lambda x: x, [], 2, progress=False)


def test_extract_embeddings_data_parallel_over_devices():
  # conftest.py simulates 4 CPU devices; the batch of 5 rounds up to 8 there.
  num_devices = jax.device_count()
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  placed = []
  mean = jax.jit(lambda batch: batch.mean(axis=(1, 2)))

  def embed(batch):  # Not jitted itself, so it sees the placed batch.
    placed.append((batch.shape[0], len(batch.sharding.device_set)))
    return mean(batch)

  images = np.random.default_rng(0).normal(size=(11, 4, 4, 3)).astype(np.float32)
  out = runner.extract_embeddings(embed, images, num_devices + 1, sharding=sharding,
                                      progress=False)
  np.testing.assert_allclose(out, images.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
  padded = 2 * num_devices if num_devices > 1 else 2
  assert set(placed) == {(padded, num_devices)}


def test_flip_sum_embeddings_known_answer():
  # predict.embed: the embedding of each image plus its mirror's, L2-normalised.
  images = np.zeros((1, 2, 3, 1), np.float32)
  images[0, 0, :, 0] = [1.0, 2.0, 5.0]
  first_row = FirstRow()
  expected = np.array([[6, 4, 6]]) / np.linalg.norm([6, 4, 6])
  np.testing.assert_allclose(predict.embed(first_row, {}, images), expected, rtol=1e-6)
  summed = jax.jit(lambda x: predict.embed(first_row, {}, x))(jnp.asarray(images))
  np.testing.assert_allclose(summed, expected, rtol=1e-6)
  unflipped = predict.embed(first_row, {}, images, flip=False)
  np.testing.assert_allclose(unflipped, np.array([[1, 2, 5]]) / np.linalg.norm([1, 2, 5]),
                             rtol=1e-6)


class FirstRow(nn.Module):
  """Parameter-free "encoder": the first pixel row's first channel."""

  @nn.compact
  def __call__(self, images, train=False):
    del train
    return EmbeddingOnly(images[:, 0, :, 0])


# --------------------------------------------------------------------------- #
# Runner: Flax module + variables -> verification report.
# --------------------------------------------------------------------------- #


class PooledPixels(nn.Module):
  """Parameter-free "encoder": 4x4 average-pooled pixels, centred."""

  @nn.compact
  def __call__(self, images, train=False):
    del train
    n, h, w, c = images.shape
    pooled = images.reshape(n, 4, h // 4, 4, w // 4, c).mean(axis=(2, 4)).reshape(n, -1)
    return EmbeddingOnly(pooled - pooled.mean(axis=1, keepdims=True))


class EmbeddingOnly(NamedTuple):
  embedding: jax.Array


def write_identity_images(root, num_identities=4, per_identity=2, size=112):
  """Blocky random faces: one pattern per identity, light noise per image."""
  rng = np.random.default_rng(5)
  paths = {}
  for identity in range(num_identities):
    pattern = rng.uniform(30, 225, size=(4, 4, 3))
    name = f"Person_{identity}"
    (root / name).mkdir(parents=True)
    for number in range(1, per_identity + 1):
      image = np.kron(pattern, np.ones((size // 4, size // 4, 1)))
      image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
      path = root / name / f"{name}_{number:04d}.png"
      Image.fromarray(image).save(path)
      paths[(identity, number)] = path
  return paths


def pair_plan():
  """(identity1, number1, identity2, number2, fold): 2 folds of 2 + 2 pairs."""
  return [(0, 1, 0, 2, 0), (1, 1, 1, 2, 0), (0, 1, 1, 2, 0), (2, 1, 3, 1, 0),
          (2, 1, 2, 2, 1), (3, 1, 3, 2, 1), (0, 2, 3, 2, 1), (1, 1, 2, 2, 1)]


def test_runner_pair_list_and_bin_agree_with_direct_scoring(tmp_path):
  paths = write_identity_images(tmp_path / "faces")
  lines, encoded = [], []
  for id1, n1, id2, n2, fold in pair_plan():
    p1, p2 = paths[(id1, n1)], paths[(id2, n2)]
    lines.append(f"{p1} {p2} {int(id1 == id2)} {fold}")
    encoded += [p1.read_bytes(), p2.read_bytes()]
  (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
  binset.write_bin(tmp_path / "set.bin", encoded, [id1 == id2 for id1, _, id2, _, _ in pair_plan()])
  pairs, _ = lists.parse_pair_list(tmp_path / "pairs.txt")
  embed_fn = runner.embed_fn(PooledPixels(), {}, flip=True,
                             sharding=runner.data_parallel_sharding())
  from_list = protocols.score_pair_list(embed_fn, pairs, batch_size=3, progress=False,
                                        sharding=runner.data_parallel_sharding())
  from_bin = protocols.score_bin(embed_fn, tmp_path / "set.bin", batch_size=5, num_folds=2,
                                 progress=False)
  assert from_list.accuracy_mean == 1.0 and from_list.fold_labels == [0, 1]
  # Direct: flip-sum of the pooled pixels of each decoded image.
  def direct(path):
    x = datasets.to_model_input(images_lib.load_image(path))[None]
    pooled = lambda im: PooledPixels().apply({}, im).embedding
    return np.asarray(pooled(x) + pooled(x[:, :, ::-1]))[0]
  first = np.stack([direct(p.path1) for p in pairs])
  second = np.stack([direct(p.path2) for p in pairs])
  expected = ver_lib.evaluate_verification([p.issame for p in pairs], first, second,
                                           folds=[p.fold for p in pairs])
  for got in (from_list, from_bin):
    assert got.fold_accuracies == expected.fold_accuracies
    np.testing.assert_allclose(got.fold_thresholds, expected.fold_thresholds, atol=1e-5)
    assert got.auc == pytest.approx(expected.auc)
  report = report_lib.new_report("verification", {"checkpoint": "none"}, {})
  report_lib.add_result(report, "verification", "list", from_list)
  report_lib.add_result(report, "verification", "bin", from_bin)
  written = report_lib.write_report(report, tmp_path / "out")
  loaded = report_lib.read_json_report(written["json"])
  assert loaded["checkpoint"]["checkpoint"] == "none"
  assert loaded["verification"]["bin"]["num_pairs"] == 8
  assert "list" in open(written["table"], encoding="utf-8").read()


def test_runner_missing_image_names_file_and_line(tmp_path):
  root = tmp_path / "lfw"
  write_identity_images(root, num_identities=2, per_identity=1, size=16)
  for name in ("Person_0", "Person_1"):  # parse_lfw_pairs expects .jpg names.
    (root / name / f"{name}_0001.png").rename(root / name / f"{name}_0001.jpg")
  (tmp_path / "pairs.txt").write_text("2 1\nPerson_0 1 1\nPerson_0 1 Person_1 1\n"
                                      "Person_1 1 3\nPerson_0 1 Person_1 1\n")
  pairs, _ = lists.parse_lfw_pairs(tmp_path / "pairs.txt", root)
  with pytest.raises(FileNotFoundError, match=r"Person_1_0003.jpg \(pair at .*pairs.txt:4\)"):
    protocols.score_pair_list(runner.embed_fn(PooledPixels(), {}), pairs, progress=False)
