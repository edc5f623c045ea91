"""Ground-truth face age synthesis: the truth renderer, the metrics and the grid."""

import jax
import numpy as np
import pytest
from PIL import Image

from configs import fas_tpami
from mtlface_jax import predict
from mtlface_jax import synthetic
from mtlface_jax.evaluation import datasets
from mtlface_jax.evaluation import fas as fas_lib
from mtlface_jax.evaluation import runner as runner_lib
from mtlface_jax.evaluation import synthetic_truth
from mtlface_jax.formats import images as images_lib
from mtlface_jax.models import spec as spec_lib


@pytest.fixture(scope="module")
def dataset():
  return synthetic.make_dataset(num_identities=24, images_per_identity=8, seed=3,
                                test_fraction=0.25, num_folds=2, pairs_per_fold=6)


# --------------------------------------------------------------------------- #
# The renderer's truth.
# --------------------------------------------------------------------------- #


def test_truth_at_own_age_reproduces_the_dataset(dataset):
  """Every image, redrawn alone or in other chunks, is the dataset's image."""
  for split in (dataset.test, dataset.train):
    indices = np.arange(0, len(split), 3)[::-1]  # Other chunks, other order.
    drawn = synthetic.render_truth(split, indices, split.ages[indices][:, None])
    assert drawn.images.shape == (len(indices), 1, 112, 112, 3)
    np.testing.assert_array_equal(drawn.images[:, 0], split.images[indices])
  alone = synthetic.render_truth(dataset.test, [5], [dataset.test.ages[5]])
  np.testing.assert_array_equal(alone.images[0, 0], dataset.test.images[5])


def test_truth_keeps_nuisance_and_changes_the_face(dataset):
  split = dataset.test
  drawn = synthetic.render_truth(split, [0, 9], [5.0, 70.0])
  face, hair = drawn.face, drawn.hair
  assert face.shape == hair.shape == (2, 2, 112, 112)
  assert 0 <= face.min() and face.max() == pytest.approx(1.0)
  assert 0 <= hair.min() and hair.max() <= 1.0
  # Above the ears and outside face and hair at both ages: background only,
  # which the age must not touch.
  background = (face.max(1) < 1e-3) & (hair.max(1) < 1e-3)
  background[:, 40:] = False
  young, old = drawn.images[:, 0], drawn.images[:, 1]
  assert background.sum() > 500
  np.testing.assert_array_equal(young[background], old[background])
  head = face.min(1) > 0.99
  assert np.abs(young[head].astype(int) - old[head]).mean() > 5


def test_truth_needs_factors_and_matching_ages(dataset):
  bare = synthetic.SplitArrays(dataset.test.images, dataset.test.ids, dataset.test.ages,
                               dataset.test.genders)
  with pytest.raises(ValueError, match="no render factors"):
    synthetic.render_truth(bare, [0], [10.0])
  with pytest.raises(ValueError, match="ages must be"):
    synthetic.render_truth(dataset.test, [0, 1], np.zeros((3, 2)))


def test_group_centre_ages():
  np.testing.assert_array_equal(synthetic.group_centre_ages(7, 80),
                                [5, 15, 25, 35, 45, 55, 70])
  np.testing.assert_array_equal(synthetic.group_centre_ages(4, 70), [15, 35, 45, 60])
  with pytest.raises(ValueError, match="empty"):
    synthetic.group_centre_ages(7, 60)


# --------------------------------------------------------------------------- #
# Metrics on hand-made arrays.
# --------------------------------------------------------------------------- #


def _case(n=3, g=4, size=6, seed=0):
  """Inputs, truths that differ from them, own groups, and masks."""
  rng = np.random.default_rng(seed)
  inputs = rng.uniform(-1, 1, (n, size, size, 3))
  truth = np.clip(inputs[:, None] + rng.uniform(0.2, 0.5, (n, g, 1, 1, 3)), -1, 1)
  face = np.zeros((n, size, size))
  face[:, 1:5, 1:5] = 1
  hair = np.zeros((n, size, size))
  hair[:, :2] = 1
  masks = fas_lib.comparison_masks(face, hair, np.repeat(face[:, None], g, 1),
                                   np.repeat(hair[:, None], g, 1))
  return inputs, truth, np.arange(n) % g, masks


def test_identity_synthesis_scores_zero_and_truth_scores_one():
  inputs, truth, groups, masks = _case()
  unchanged = np.repeat(inputs[:, None], truth.shape[1], 1)
  result = fas_lib.truth_fas_metrics(inputs, unchanged, truth, groups, masks)
  assert result.truth_gain_region == pytest.approx(0.0)
  assert result.truth_gain_image == pytest.approx(0.0)
  assert result.hair_colour_progress == pytest.approx(0.0)
  assert result.skin_colour_progress == pytest.approx(0.0)
  exact = fas_lib.truth_fas_metrics(inputs, truth, truth, groups, masks)
  assert exact.truth_gain_region == pytest.approx(1.0)
  assert exact.truth_gain_image == pytest.approx(1.0)
  assert exact.hair_colour_progress == pytest.approx(1.0)
  assert [g["truth_gain_region"] for g in exact.per_group] == pytest.approx([1.0] * 4)
  assert exact.num_samples == 3 * 3 and exact.num_inputs == 3


def test_patches_score_negative_and_halfway_scores_half():
  inputs, truth, groups, masks = _case()
  patched = np.repeat(inputs[:, None], truth.shape[1], 1)
  patched[:, :, 2:4, 2:4] = [1.0, -1.0, 1.0]  # A magenta blotch on the face.
  result = fas_lib.truth_fas_metrics(inputs, patched, truth, groups, masks)
  assert result.truth_gain_region < 0 and result.truth_gain_image < 0
  # Halfway from input to truth: half of every L1 distance and colour change.
  halfway = (inputs[:, None] + truth) / 2
  result = fas_lib.truth_fas_metrics(inputs, halfway, truth, groups, masks)
  assert result.truth_gain_region == pytest.approx(0.5)
  assert result.truth_gain_image == pytest.approx(0.5)
  assert result.hair_colour_progress == pytest.approx(0.5)
  assert result.skin_colour_progress == pytest.approx(0.5)


def test_own_group_is_not_scored_and_ratio_of_sums():
  inputs = np.zeros((2, 1, 1, 3))
  truth = np.zeros((2, 4, 1, 1, 3))  # Group 3: the truth is the input (L1 0).
  truth[0, 1] = 1.0   # Input 0 is 1.0 from the truth at group 1 ...
  truth[1, 1] = 0.5   # ... input 1 only 0.5.
  truth[:, 2] = 0.2
  synthesized = np.zeros_like(truth)
  synthesized[:, 0] = 9.0            # Own group of both inputs: ignored.
  synthesized[0, 1] = 1.0            # Input 0 reaches its truth exactly,
  synthesized[1, 1] = 0.0            # input 1 stays put: (0 + 0.5) / 1.5.
  result = fas_lib.truth_fas_metrics(inputs, synthesized, truth, [0, 0])
  group1 = result.per_group[1]
  assert group1["truth_gain_image"] == pytest.approx(1 - 0.5 / 1.5)
  assert result.per_group[0]["count"] == 0
  assert result.per_group[0]["truth_gain_image"] is None
  assert result.per_group[2]["truth_gain_image"] == pytest.approx(0.0)
  assert result.truth_gain_image == pytest.approx(1 - 0.9 / 1.9)
  assert result.truth_gain_region is None and result.hair_colour_progress is None
  assert set(result.to_dict()) >= {"truth_gain_region", "per_group", "identity_to_truth"}


def test_identity_to_truth_uses_the_embeddings():
  inputs, truth, groups, masks = _case(n=2, g=4)
  synthesized = truth.copy()
  axis = np.eye(3)
  embeddings = {"synthesized_embeddings": np.broadcast_to(axis[0], (2, 4, 3)),
                "truth_embeddings": np.broadcast_to(axis[0] + axis[1], (2, 4, 3)),
                "input_embeddings": np.broadcast_to(axis[1], (2, 3))}
  result = fas_lib.truth_fas_metrics(inputs, synthesized, truth, groups, masks, **embeddings)
  assert result.identity_to_truth == pytest.approx(np.sqrt(0.5))
  assert result.identity_input_to_truth == pytest.approx(np.sqrt(0.5))
  plain = fas_lib.truth_fas_metrics(inputs, synthesized, truth, groups, masks)
  assert plain.identity_to_truth is None


def test_metrics_reject_bad_shapes():
  inputs, truth, groups, masks = _case()
  with pytest.raises(ValueError, match="alike"):
    fas_lib.truth_fas_metrics(inputs, truth[:, :2], truth, groups, masks)
  with pytest.raises(ValueError, match="input_groups"):
    fas_lib.truth_fas_metrics(inputs, truth, truth, [0, 1, 4], masks)
  with pytest.raises(ValueError, match="mask 'region'"):
    fas_lib.truth_fas_metrics(inputs, truth, truth, groups,
                              {**masks, "region": masks["region"][:, :, :3]})


# --------------------------------------------------------------------------- #
# The truth set and the grid.
# --------------------------------------------------------------------------- #


def test_truth_set_matches_the_evaluation_inputs(dataset):
  split = dataset.test
  indices = datasets.spread_indices(len(split), 5)
  assert len(indices) == 5 and indices[0] == 0 and indices[-1] == len(split) - 1
  truth = synthetic_truth.build_truth_set(split, indices, image_size=48)
  assert truth.inputs.shape == (5, 48, 48, 3) and truth.truth.shape == (5, 7, 48, 48, 3)
  expected = np.stack([images_lib.resize_image(split.images[i], 48) for i in indices])
  np.testing.assert_allclose(truth.inputs, expected / 127.5 - 1, atol=1e-6)
  np.testing.assert_array_equal(truth.input_groups,
                                np.searchsorted([10, 20, 30, 40, 50, 60], split.ages[indices]))
  assert truth.masks["region"].shape == (5, 7, 48, 48)
  # Synthesizing the truth itself scores 1; returning the input scores 0.
  assert synthetic_truth.score(truth, truth.truth).truth_gain_region == pytest.approx(1.0)
  unchanged = np.repeat(truth.inputs[:, None], 7, 1)
  assert synthetic_truth.score(truth, unchanged).truth_gain_region == pytest.approx(0.0)


def test_grid_with_truth_rows(tmp_path):
  inputs = np.full((2, 8, 6, 3), -1.0, np.float32)
  synthesized = np.ones((2, 3, 8, 6, 3), np.float32)
  truth = np.zeros((2, 3, 8, 6, 3), np.float32)
  path = fas_lib.save_age_progression_grid(inputs, synthesized, tmp_path / "grid.png",
                                           ["a", "b", "c"], truth=truth)
  grid = np.asarray(Image.open(path))[fas_lib.HEADER_HEIGHT:]
  assert grid.shape == (32, 24, 3)
  assert grid[0, 0].tolist() == [0, 0, 0]            # Row 1: the input,
  assert grid[0, 6].tolist() == [255, 255, 255]      # its synthesis,
  assert grid[8, 6].tolist() == [128, 128, 128]      # the truth below it,
  assert grid[15, 5].tolist() == [255, 255, 255]     # under a white "truth" cell.
  assert grid[16, 0].tolist() == [0, 0, 0]           # Row 2's input.
  with pytest.raises(ValueError, match="truth"):
    fas_lib.save_age_progression_grid(inputs, synthesized, tmp_path / "x.png",
                                      truth=truth[:, :2])


class _Unchanged:
  """A stand-in model runner whose 'synthesis' returns the input at every group."""
  image_size, num_groups = 48, 7

  def synthesize(self, images):
    return np.repeat(np.asarray(images)[:, None], self.num_groups, axis=1)

  def embed(self, images):
    return np.asarray(images).reshape(len(images), -1)[:, :16] + 2.0


def test_evaluate_truth_protocol(dataset, tmp_path):
  outcome = synthetic_truth.evaluate_truth(_Unchanged(), dataset.test, tmp_path,
                                           num_inputs=6, grid_rows=3)
  result = outcome["result"]
  assert result.num_inputs == 6 and result.truth_gain_region == pytest.approx(0.0)
  assert result.identity_to_truth == pytest.approx(result.identity_input_to_truth)
  grid = np.asarray(Image.open(outcome["grid"]))
  assert grid.shape == (fas_lib.HEADER_HEIGHT + 2 * 3 * 48, 8 * 48, 3)


def _random_variables(models, image_size: int, modules, seed: int = 0) -> dict:
  """Random variables of ``modules`` from their shapes alone (no init compile).

  Flax's init of the StyleGAN2 decoder compiles a forward pass, a minute on a
  busy 2-core CPU; ``eval_shape`` only traces it. Weights ~ N(0, 0.05), batch
  norm variances 1, buffers (noise maps, ``latent_avg``) 0.
  """
  shapes = spec_lib.abstract_variables(models, image_size, modules)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    keys = [getattr(k, "key", None) for k in path]
    if "buffers" in keys:
      return np.zeros(leaf.shape, leaf.dtype)
    if keys[-1] == "var":
      return np.ones(leaf.shape, leaf.dtype)
    return (0.05 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def test_evaluate_truth_scores_a_tpami_model(dataset):
  """The protocol runs on the TPAMI family (style path + StyleGAN2 decoder, 112 px):
  a ModelRunner over configs/fas_tpami.py:tiny with random weights (forward only).

  Four age groups instead of seven: the runner's synthesis unrolls the
  generator once per group, and its compile is this test's cost."""
  config = fas_tpami.get_config("tiny")
  config.age_group = 4
  models = spec_lib.build(spec_lib.from_config(config))
  variables = _random_variables(models, config.image_size, ("encoder", "generator"))
  model = runner_lib.ModelRunner(predict.from_variables(variables, config), batch_size=4,
                                 progress=False)
  assert (model.image_size, model.num_groups) == (112, 4)
  assert type(model.loaded.models.generator).__name__ == "TPAMIGenerator"
  outcome = synthetic_truth.evaluate_truth(model, dataset.test, None, num_inputs=4)
  result = outcome["result"]
  assert result.num_inputs == 4 and outcome["grid"] is None
  overall = [result.truth_gain_region, result.truth_gain_image, result.hair_colour_progress,
             result.identity_to_truth, result.identity_input_to_truth]
  assert np.isfinite(overall).all()
  scored = [g for g in result.per_group if g["count"]]
  assert sum(g["count"] for g in scored) == 4 * 3  # Every group but each input's own.
  assert np.isfinite([[g["truth_gain_region"], g["truth_gain_image"]] for g in scored]).all()
