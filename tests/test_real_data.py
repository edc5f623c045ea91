"""The real-data recipe: LFW/UTKFace splits, shards, and one tiny end-to-end run."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mtlface_jax import real_data
from mtlface_jax import data_sources
from mtlface_jax.formats import lists

# Fake LFW: folds k = 0..9 use people P{2k} (2 images, the matched pair) and
# P{2k+1} (1 image); people X0..X3 appear in no pair.
NUM_FOLDS = 10


def _photo(path: Path, size: int, seed: int) -> None:
  rng = np.random.default_rng(seed)
  colour = rng.integers(0, 256, 3)
  image = np.broadcast_to(colour, (size, size, 3)).astype(np.uint8).copy()
  image[size // 3:2 * size // 3, size // 3:2 * size // 3] = rng.integers(0, 256, 3)
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(image).save(path, quality=90)


def write_fake_lfw(root: Path) -> Path:
  """A tiny LFW folder (pairs.txt + images/) with disjoint people per fold."""
  people = {f"P{k:02d}": 2 if k % 2 == 0 else 1 for k in range(2 * NUM_FOLDS)}
  people.update({f"X{k}": 2 for k in range(4)})
  for n, (person, count) in enumerate(people.items()):
    for i in range(1, count + 1):
      _photo(root / "images" / person / f"{person}_{i:04d}.jpg", 250, 100 * n + i)
  lines = [f"{NUM_FOLDS}\t1"]
  for fold in range(NUM_FOLDS):
    a, b = f"P{2 * fold:02d}", f"P{2 * fold + 1:02d}"
    lines += [f"{a}\t1\t2", f"{a}\t1\t{b}\t1"]
  (root / "pairs.txt").write_text("\n".join(lines) + "\n")
  return root


def write_fake_utkface(root: Path, count: int = 10) -> Path:
  """UTKFace-named crops (ages 5, 9, 13, ...) plus one malformed name."""
  for i in range(count):
    _photo(root / f"{5 + 4 * i}_{i % 2}_{i % 5}_2017010{i}.jpg.chip.jpg", 200, 7_000 + i)
  _photo(root / "61_1_20170109142408075.jpg.chip.jpg", 200, 1)
  return root


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory) -> Path:
  base = tmp_path_factory.mktemp("real")
  lfw = write_fake_lfw(base / "lfw")
  utk = write_fake_utkface(base / "utkface")
  out = base / "shards"
  # A tiny piece limit forces several pNN/ folders.
  real_data.prepare(lfw, utk, out, max_piece_mb=0.01, workers=2, progress=False)
  return out


def test_splits_keep_folds_6_to_10_people_out_of_training(shards_dir):
  shards = real_data.ShardSet(shards_dir)
  manifest = shards.manifest
  heldout_people = {f"P{k:02d}" for k in range(10, 20)}
  classes = manifest["classes"]
  assert set(classes) == {f"P{k:02d}" for k in range(10)} | {f"X{k}" for k in range(4)}
  assert shards.num_classes == 14
  lfw = shards.select("lfw")
  for i in lfw:
    person = shards.names[i].split("/")[1]
    assert (shards.splits[i] == "heldout") == (person in heldout_people)
    assert shards.ids[i] == (-1 if person in heldout_people else classes.index(person))
    assert shards.ages[i] == -1 and shards.genders[i] == -1
  assert manifest["counts"] == {"lfw_train": 23, "lfw_heldout": 15,
                                "utkface_train": 8, "utkface_heldout": 2}
  utk = shards.select("utkface")
  assert (shards.ids[utk] == -1).all() and (shards.ages[utk] >= 5).all()
  assert [s["entry"].endswith("61_1_20170109142408075.jpg.chip.jpg")
          for s in manifest["utkface_skipped"]] == [True]


def test_utkface_split_is_seeded(tmp_path):
  utk = write_fake_utkface(tmp_path / "utk", count=20)
  first, _ = real_data.utkface_faces(utk, seed=3)
  again, _ = real_data.utkface_faces(utk, seed=3)
  other, _ = real_data.utkface_faces(utk, seed=4)
  split = lambda faces: [f.split for f in faces]
  assert split(first) == split(again) and split(first) != split(other)
  assert split(first).count("train") == 16


def test_pieces_sources_and_pairs(shards_dir):
  shards = real_data.ShardSet(shards_dir)
  files = [shards_dir / s["file"] for s in shards.manifest["shards"]]
  assert len(files) > 3 and all(f.is_file() for f in files)
  assert len({f.parent for f in files}) == len(files)  # one shard per folder
  source = data_sources.shard_train_source(shards)
  assert len(source) == 31 and source.kind == "encoded"
  assert sorted(set(source.ids.tolist())) == [-1] + list(range(14))
  images = shards.images(shards.select("utkface", "heldout"))
  assert images.shape == (2, 112, 112, 3) and images.dtype == np.uint8
  pairs = shards.heldout_pairs()
  assert sorted(set(pairs["fold"].tolist())) == list(real_data.HELDOUT_FOLDS)
  assert pairs["issame"].tolist() == [True, False] * 5
  for a, b, same in zip(pairs["index1"], pairs["index2"], pairs["issame"]):
    people = {shards.names[a].split("/")[1], shards.names[b].split("/")[1]}
    assert (len(people) == 1) == same and shards.splits[a] == "heldout"


def test_bad_shard_sets_are_named(shards_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="manifest.json not found"):
    real_data.ShardSet(tmp_path)
  manifest = json.loads((shards_dir / real_data.MANIFEST).read_text())
  manifest["faces"]["id"][0] += 1  # as if pieces of two preparations were mixed
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / real_data.MANIFEST).write_text(json.dumps(manifest))
  for shard in manifest["shards"]:
    target = broken / shard["file"]
    target.parent.mkdir(parents=True, exist_ok=True)
    for suffix in (".rec", ".idx"):
      target.with_suffix(suffix).symlink_to((shards_dir / shard["file"]).with_suffix(suffix))
  shards = real_data.ShardSet(broken)
  with pytest.raises(ValueError, match="disagree with the manifest"):
    shards.encoded([0])
  (broken / manifest["shards"][-1]["file"]).unlink()
  with pytest.raises(FileNotFoundError, match="every pNN/ folder"):
    shards.encoded([len(shards) - 1])


def test_people_in_seen_and_heldout_folds_are_refused():
  pairs = [lists.FacePair("r/A/A_0001.jpg", "r/A/A_0002.jpg", True, 0),
           lists.FacePair("r/A/A_0001.jpg", "r/B/B_0001.jpg", False, 7)]
  with pytest.raises(ValueError, match=r"folds 1-5 and 6-10.*'A'"):
    real_data.heldout_people(pairs)


def tiny_recipe_config(shards_dir: Path):
  """``configs/real_lfw_utkface.py:cpu`` with the tiny test model on the fake shards."""
  from configs import real_lfw_utkface
  from configs import tiny
  config = real_lfw_utkface.get_config("cpu")
  small = tiny.get_config()
  for key in ("dtype", "image_size", "batch_size"):
    config[key] = small[key]
  config.model.update(small.model)
  config.model.num_classes = 14
  config.data.face_shards.dir = str(shards_dir)
  config.num_iter, config.fas_num_iter = 2, 1
  config.optim.warmup, config.optim.milestone = 1, (1, 2)
  config.log_every, config.checkpoint_every = 1, 2
  return config


def test_recipe_end_to_end_on_a_tiny_model(shards_dir, tmp_path):
  """Shards -> AIFR -> FAS -> held-out report, with the tiny test model."""
  from mtlface_jax.recipes import lfw_utkface as real_recipe
  config = tiny_recipe_config(shards_dir)
  report = real_recipe.run(config, tmp_path / "run", progress=False)
  summary = report["summary"]
  assert 0 <= summary["lfw_heldout_accuracy"] <= 1
  assert report["verification"]["lfw_folds_6_10"]["fold_labels"] == [5, 6, 7, 8, 9]
  assert report["age"]["utkface_heldout"]["num_samples"] == 2
  assert np.isfinite(summary["utkface_heldout_mae"])
  assert 0 <= summary["fas_age_accuracy"] <= 1 and Path(summary["grid_png"]).is_file()
  assert set(report["timings"]) >= {"prepare_s", "aifr_s", "fas_s", "eval_s", "total_s"}
  saved = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())
  assert saved["summary"]["lfw_heldout_accuracy"] == summary["lfw_heldout_accuracy"]


def test_selective_ablation_on_the_real_recipe(shards_dir, tmp_path):
  """The three arms from a real-recipe workdir (untrained tiny runs), held-out LFW each."""
  from mtlface_jax.recipes import stages
  from tests import test_eval_cli
  fas = tiny_recipe_config(shards_dir)
  fas.train_fr, fas.train_fas = False, True
  aifr = fas.copy_and_resolve_references()
  aifr.train_fr, aifr.train_fas = True, False
  workdir = tmp_path / "real_run"
  test_eval_cli.write_untrained_checkpoint(aifr, workdir / "aifr")
  test_eval_cli.write_untrained_checkpoint(fas, workdir / "fas")
  s = fas.selective
  s.ft_num_iter, s.ft_warmup, s.ft_seeds, s.batch_size, s.chunk = 1, 0, (0,), 16, 16
  result = stages.selective_finetuning(fas, workdir)
  written = json.loads((workdir / "selective" / "ablation.json").read_text())
  assert written["data"] == "face_shards" and set(written["arms"]) == {
      "no_finetune", "plain_finetune", "selective_finetune"}
  selection = written["selection"]
  # The 23 LFW training faces (UTKFace has no identities), each into the 6 groups
  # other than the one the frozen estimator gives it.
  assert selection["num_sources"] == 23 and selection["candidates"] == 23 * 6
  assert selection["tau_source"] == "threshold at FAR 0.001 on the held-out LFW folds 6-10 pairs"
  assert "estimator" in selection["own_group"]
  per_group = selection["per_group"]
  assert len(per_group) == fas.age_group
  assert sum(g["candidates"] for g in per_group.values()) == 23 * 6
  assert all(g["kept_fraction"] is None or 0 <= g["kept_fraction"] <= 1
             for g in per_group.values())
  arms = written["arms"]
  assert arms["plain_finetune"]["num_synthetic"] == 23 * 6
  assert arms["selective_finetune"]["num_synthetic"] == selection["kept"]
  for entry in arms.values():
    assert entry["num_real"] == 31  # all of the recipe's training faces
    heldouts = [r["heldout"] for r in entry.get("runs", [])] or [entry["heldout"]]
    for summary in heldouts:
      assert np.isfinite(summary["lfw_heldout_accuracy"])
      assert summary["verification_accuracy"] == summary["lfw_heldout_accuracy"]
      assert np.isfinite(summary["utkface_heldout_mae"])
  assert [r["steps"] for r in arms["plain_finetune"]["runs"]] == [1]
  report = json.loads((workdir / "selective" / "no_finetune" / "eval" / "report.json").read_text())
  assert report["verification"]["lfw_folds_6_10"]["fold_labels"] == [5, 6, 7, 8, 9]
  assert result["selection"]["tau"] == selection["tau"]
