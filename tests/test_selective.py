"""Selective fine-tuning (recipes/selective.py): selection, tau, and the three arms."""

import json

import numpy as np
import pytest

from configs import selective_ft
from mtlface_jax import input_pipeline
from mtlface_jax import synthetic
from mtlface_jax.evaluation import verification
from mtlface_jax.formats import images as images_lib
from mtlface_jax.recipes import selective
from mtlface_jax.recipes import stages
from tests import test_eval_cli


def test_select_keeps_group_matches_at_or_above_tau():
  target = np.array([0, 0, 1, 1, 1, 2])
  estimated = np.array([0, 1, 1, 1, 0, 2])
  cosine = np.array([0.9, 0.9, 0.5, 0.49, 0.99, 0.2])
  keep, report = selective.select(target, estimated, cosine, tau=0.5, num_groups=4)
  np.testing.assert_array_equal(keep, [True, False, True, False, False, False])
  assert report["kept"] == 2 and report["candidates"] == 6
  assert report["kept_fraction"] == pytest.approx(2 / 6)
  assert report["group_match_fraction"] == pytest.approx(4 / 6)
  assert report["identity_pass_fraction"] == pytest.approx(4 / 6)
  assert report["per_group"]["0"] == {"candidates": 2, "kept": 1, "kept_fraction": 0.5}
  assert report["per_group"]["1"]["kept_fraction"] == pytest.approx(1 / 3)
  assert report["per_group"]["2"]["kept_fraction"] == 0.0
  assert report["per_group"]["3"] == {"candidates": 0, "kept": 0, "kept_fraction": None}


def test_tau_at_far_is_just_above_the_highest_allowed_negative():
  # 1000 negatives at cosine 0..0.999 and 10 positives at 0.9995: at FAR 1e-3 one
  # negative may pass, so the threshold sits just above the second highest (0.998).
  rng = np.random.default_rng(0)
  neg = np.arange(1000) / 1000.0
  scores = np.concatenate([np.full(10, 0.9995), neg])
  issame = np.concatenate([np.ones(10, bool), np.zeros(1000, bool)])
  # Unit embeddings whose dot product is the score: e1 = x axis, e2 at angle acos(s).
  angle = np.arccos(scores)
  e1 = np.tile([[1.0, 0.0]], (len(scores), 1))
  e2 = np.stack([np.cos(angle), np.sin(angle)], axis=1)
  order = rng.permutation(len(scores))
  result = verification.evaluate_verification(issame[order], e1[order], e2[order],
                                              num_folds=2)
  tau = selective.tau_at_far(result, 1e-3)
  assert 0.998 < tau <= 0.9985
  with pytest.raises(ValueError, match="FAR 0.01 not evaluated"):
    selective.tau_at_far(result, 1e-2)


def test_group_mid_ages():
  np.testing.assert_allclose(selective.group_mid_ages(7), [5, 15, 25, 35, 45, 55, 65])


def tiny_run_configs():
  """AIFR and FAS configs of one tiny run whose data has held-out pairs."""
  fas = test_eval_cli.tiny_config()
  fas.data.synthetic_faces.test_fraction = 0.5
  fas.data.synthetic_faces.num_folds = 2
  fas.data.synthetic_faces.pairs_per_fold = 4
  aifr = fas.copy_and_resolve_references()
  aifr.train_fr, aifr.train_fas = True, False
  return aifr, fas


def _sources(split) -> selective.SourceFaces:
  return selective.SourceFaces(lambda idx: split.images[idx], split.ids, split.ages,
                               split.genders)


def test_training_source_appends_kept_faces_under_their_source():
  split = synthetic.make_dataset(3, 2, seed=0, test_fraction=0.0).train
  candidates = {"images": np.full((3, 16, 16, 3), 7, np.uint8), "source": np.array([0, 4, 5]),
                "target_group": np.array([6, 0, 2])}
  keep = np.array([True, False, True])
  real = input_pipeline.source_from_synthetic(split)
  source = selective.training_source(real, _sources(split), candidates, keep, image_size=16,
                                     num_groups=7)
  assert len(source) == len(split.ids) + 2 and source.images.shape[1:] == (16, 16, 3)
  np.testing.assert_array_equal(source.ids[-2:], split.ids[[0, 5]])
  np.testing.assert_array_equal(source.genders[-2:], split.genders[[0, 5]])
  np.testing.assert_allclose(source.ages[-2:], [65, 25])
  assert (source.images[-2:] == 7).all()


def test_kept_faces_join_encoded_real_faces_losslessly():
  """Shard-like (JPEG) real faces stay as they are; synthetic faces become PNG."""
  rng = np.random.default_rng(0)
  real = input_pipeline.Source(ids=[3, -1], ages=[-1, 30], genders=[-1, 1],
                               encoded=np.array([b"jpeg0", b"jpeg1"], object),
                               names=np.array(["lfw/a", "utkface/b"], object))
  sources = selective.SourceFaces(None, np.array([3, 4]), np.array([-1.0, -1.0]),
                                  np.array([-1, -1]))
  faces = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
  candidates = {"images": faces, "source": np.array([1, 0]), "target_group": np.array([0, 3])}
  source = selective.training_source(real, sources, candidates, np.array([True, True]),
                                     image_size=8, num_groups=7)
  assert source.kind == "encoded" and len(source) == 4
  np.testing.assert_array_equal(source.ids, [3, -1, 4, 3])
  np.testing.assert_allclose(source.ages, [-1, 30, 5, 35])
  np.testing.assert_array_equal(source.genders, [-1, 1, -1, -1])
  assert source.encoded[:2].tolist() == [b"jpeg0", b"jpeg1"]
  for k in (0, 1):
    np.testing.assert_array_equal(images_lib.decode_image_bytes(source.encoded[2 + k]), faces[k])
  assert source.names[2] == "synthetic: source 1 -> group 0"
  with pytest.raises(ValueError, match="cannot join"):
    input_pipeline.concatenate([real, input_pipeline.Source(ids=[0], ages=[1], genders=[0],
                                                            paths=np.array(["x.jpg"]))])


def test_own_group_is_the_age_label_else_the_estimator():
  groups = selective.own_groups(np.array([-1.0, 35.0, -1.0, 5.0]), np.array([2, 0, 5, 6]), 7)
  np.testing.assert_array_equal(groups, [2, 3, 5, 0])


class _FakeRunner:
  """Estimator group = a face's mean value bucket; synthesis paints the group number."""
  image_size, num_groups = 8, 4

  def estimate_ages(self, faces, progress=False):
    del progress
    level = np.asarray(faces).mean(axis=(1, 2, 3))  # in [-1, 1]
    group = np.clip(((level + 1) / 2 * self.num_groups).astype(int), 0, self.num_groups - 1)
    return {"group": group, "embedding": np.ones((len(group), 2)) / np.sqrt(2)}

  def synthesize(self, faces, progress=False):
    del progress
    levels = (np.arange(self.num_groups) + 0.5) / self.num_groups * 2 - 1
    return np.broadcast_to(levels[None, :, None, None, None],
                           (len(faces), self.num_groups, 8, 8, 3)).astype(np.float32)


def test_candidates_skip_the_own_group_by_label_or_by_the_estimator():
  # Face 0: age unknown, mid-grey (estimator group 2); face 1: age 70 (group 3 of 4).
  images = np.stack([np.full((8, 8, 3), 160, np.uint8), np.full((8, 8, 3), 0, np.uint8)])
  sources = selective.SourceFaces(lambda idx: images[idx], np.array([0, 1]),
                                  np.array([-1.0, 70.0]), np.array([-1, 0]))
  candidates = selective.synthesize_candidates(_FakeRunner(), sources, chunk=1)
  np.testing.assert_array_equal(candidates["source"], [0, 0, 0, 1, 1, 1])
  np.testing.assert_array_equal(candidates["target_group"], [0, 1, 3, 0, 1, 2])
  np.testing.assert_array_equal(candidates["estimated_group"], candidates["target_group"])
  np.testing.assert_allclose(candidates["cosine"], 1.0)
  assert candidates["images"].dtype == np.uint8


def test_unknown_recipe_data_is_refused():
  config = selective_ft.get_config()
  config.data.name = "tfds"
  with pytest.raises(ValueError, match="knows synthetic_faces"):
    selective.recipe_data(config)


def test_arms_end_to_end(tmp_path):
  """No fine-tuning and selective fine-tuning (plain differs only in `keep`)."""
  aifr, fas = tiny_run_configs()
  source = tmp_path / "demo"
  test_eval_cli.write_untrained_checkpoint(aifr, source / "aifr")
  test_eval_cli.write_untrained_checkpoint(fas, source / "fas")
  config = selective_ft.get_config()
  s = config.selective
  s.ft_num_iter, s.ft_warmup, s.batch_size, s.chunk = 1, 0, 8, 16
  s.arms = ("no_finetune", "selective_finetune")  # One train-step compile (CPU time).
  result = stages.selective_finetuning(config, source)  # The recipe's third stage.
  out = source / "selective"
  written = json.loads((out / "ablation.json").read_text())
  assert set(written["arms"]) == {"no_finetune", "selective_finetune"}
  selection = written["selection"]
  # 5 training identities x 8 faces, each into the 6 groups that are not its own.
  assert selection["candidates"] == 40 * 6
  assert selection["kept"] == sum(g["kept"] for g in selection["per_group"].values())
  assert selection["tau_source"].startswith("threshold at FAR 0.001")
  arms = written["arms"]
  assert arms["selective_finetune"]["num_synthetic"] == selection["kept"]
  assert arms["selective_finetune"]["num_real"] == 40
  (run,) = arms["selective_finetune"]["runs"]
  assert run["seed"] == 0 and run["steps"] == 1
  assert arms["selective_finetune"]["verification_accuracy_mean"] == (
      run["heldout"]["verification_accuracy"])
  assert (out / "selective_finetune" / "seed0" / "checkpoints").is_dir()
  for entry in arms.values():
    assert 0.0 <= entry["verification_accuracy_mean"] <= 1.0
  assert result["selection"]["tau"] == selection["tau"]
