"""eval.py and its library glue (predict.load, runner, protocols, CLI) end to end.

One tiny untrained checkpoint is built per module and shared: XLA CPU compiles
dominate the run time, and every test below uses the same batch size so the
embedding, age and synthesis programs compile once (they are cached per
module configuration). The checkpoint is written exactly as the training loop
writes it (a ``TrainState`` and the ``{'step', 'data_position', 'task',
'config'}`` meta) without running a train step, whose compile alone takes
minutes on CPU.
"""

import io
import json
import os
from pathlib import Path
import pickle
import shutil
import subprocess
import sys

from absl import flags
import jax
import numpy as np
from PIL import Image
import pytest

from configs import tiny
from mtlface_jax import align
from mtlface_jax import predict
from mtlface_jax import synthetic
from mtlface_jax.evaluation import cli
from mtlface_jax.evaluation import datasets
from mtlface_jax.evaluation import runner
from mtlface_jax.evaluation import report as report_lib
from mtlface_jax.formats import binset
from mtlface_jax.formats import images as images_lib
from mtlface_jax.formats import lists
from mtlface_jax.models import spec as spec_lib
from mtlface_jax.recipes import heldout
from mtlface_jax.training import checkpoint as checkpoint_lib
from mtlface_jax.training import optim
from mtlface_jax.training import sharding
from mtlface_jax.training import state as state_lib

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BATCH = 8  # One batch shape for every program (a multiple of the 4 test devices).
SYNTHETIC_FLAGS = {"synthetic_identities": 24, "synthetic_images_per_identity": 6,
                   "synthetic_test_fraction": 0.5, "synthetic_num_folds": 2,
                   "synthetic_pairs_per_fold": 4}


def tiny_config():
  config = tiny.get_config()
  config.train_fr, config.train_fas = False, True  # A FAS run: encoder, age, G and D.
  return config


def write_untrained_checkpoint(config, workdir: Path) -> Path:
  """Saves a freshly initialised state like ``training.loop`` saves it."""
  models = spec_lib.build_from_config(config)
  # Replicated over all (4 test) devices, as the loop's state is.
  mesh = sharding.make_mesh()
  variables = jax.jit(lambda rng: state_lib.init_variables(models, config, rng),
                      out_shardings=sharding.replicated(mesh))(jax.random.PRNGKey(0))
  state = state_lib.init_state(variables, config, *optim.optimizers_from_config(config))
  saver = checkpoint_lib.Checkpointer(workdir / "checkpoints", async_save=False)
  saver.save(1, state, {"step": 1, "data_position": 1, "task": "fas",
                        "config": config.to_json()})
  saver.wait()
  saver.close()
  return workdir


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
  return write_untrained_checkpoint(tiny_config(), tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def loaded(workdir) -> predict.LoadedModel:
  return predict.load(workdir)


@pytest.fixture(scope="module")
def data() -> synthetic.SyntheticFaces:
  return synthetic.make_dataset(24, 6, seed=0, test_fraction=0.5, num_folds=2,
                                pairs_per_fold=4)


def options(workdir, out, protocol, **kwargs) -> cli.EvalOptions:
  return cli.EvalOptions(checkpoint=str(workdir), protocol=protocol, output_dir=str(out),
                         batch_size=BATCH, progress=False, **kwargs)


# --------------------------------------------------------------------------- #
# Loading.
# --------------------------------------------------------------------------- #


def test_load_training_checkpoint(loaded, workdir):
  assert loaded.info["kind"] == "training"
  assert loaded.info["image_size"] == 48 and loaded.info["age_group"] == 7
  assert loaded.info["modules"] == ["age", "discriminator", "encoder", "generator"]
  assert loaded.info["step"] == 1 and loaded.info["task"] == "fas"
  models, variables, info = loaded  # Unpacks as (models, variables, info).
  assert models.encoder.units == (1, 1, 1, 1) and info["dtype"] == "float32"
  assert isinstance(jax.tree_util.tree_leaves(variables)[0], np.ndarray)
  # Both a workdir and its checkpoints/ folder are accepted.
  again = predict.load(workdir / "checkpoints", dtype="bfloat16", validate=False)
  assert again.models.encoder.dtype == spec_lib.compute_dtype("bfloat16")


def test_check_variables_names_a_misshaped_parameter(loaded):
  variables = jax.tree_util.tree_map(lambda x: x, loaded.variables)
  kernel = variables["encoder"]["params"]["output_layer"]["fc"]["kernel"]
  variables["encoder"]["params"]["output_layer"]["fc"]["kernel"] = kernel[:-1]
  with pytest.raises(ValueError, match=r"encoder/params/output_layer/fc/kernel has shape"):
    predict.check_variables(loaded._replace(variables=variables))


def test_converted_checkpoint_meta(tmp_path, loaded):
  meta = {"converted_from": "pytorch", "layout": "tpami", "age_group": 7,
          "modules": ["age"], "backbone": "ir50", "num_layers": 50, "attention_version": 2,
          "dropout_rate": 0.4, "normalize_embedding": True}
  saver = checkpoint_lib.Checkpointer(tmp_path, keep=1, async_save=False)
  # The tiny model's age estimator stands in for converted weights.
  saver.save(0, {"variables": {"age": loaded.variables["age"]}}, meta)
  saver.wait()
  saver.close()
  converted = predict.load(tmp_path, validate=False)
  encoder = converted.models.encoder
  assert (encoder.num_layers, encoder.attention_version, encoder.normalize_embedding) == (
      50, 2, True)
  assert converted.models.head is None
  assert converted.info["kind"] == "converted" and converted.info["image_size"] == 112
  assert converted.info["layout"] == "tpami" and converted.info["modules"] == ["age"]
  # Validation compares with the reference-size estimator (7x7x512 features).
  with pytest.raises(ValueError, match=r"age/\S+ has shape"):
    predict.check_variables(converted)
  with pytest.raises(ValueError, match=r"needs module\(s\) \['encoder'\]"):
    predict.require_modules(converted, ("encoder", "age"), "age estimation")


def test_missing_checkpoint_and_missing_generator(tmp_path, loaded):
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    predict.load(tmp_path)
  no_generator = loaded._replace(variables={k: v for k, v in loaded.variables.items()
                                            if k != "generator"})
  model = runner.ModelRunner(no_generator, batch_size=BATCH, progress=False)
  with pytest.raises(ValueError, match=r"face age synthesis needs module\(s\) \['generator'\]"):
    model.synthesize(np.zeros((1, 48, 48, 3), np.float32))


# --------------------------------------------------------------------------- #
# Small pure helpers.
# --------------------------------------------------------------------------- #


def test_fold_selection_is_one_based_over_sorted_labels():
  assert datasets.parse_fold_ordinals("6-10") == [6, 7, 8, 9, 10]
  assert datasets.parse_fold_ordinals("1, 3,5-6,3") == [1, 3, 5, 6]
  assert datasets.parse_fold_ordinals("") == []
  assert datasets.resolve_eval_folds([6, 7, 8, 9, 10], range(10)) == [5, 6, 7, 8, 9]
  assert datasets.resolve_eval_folds([1, 2], [10, 3, 3, 7]) == [3, 7]
  assert datasets.resolve_eval_folds([], range(10)) is None
  with pytest.raises(ValueError, match=r"eval fold\(s\) \[11\] do not exist"):
    datasets.resolve_eval_folds([11], range(10))
  for bad in ("0-3", "5-2", "a"):
    with pytest.raises(ValueError, match="fold"):
      datasets.parse_fold_ordinals(bad)


def test_limit_pairs_per_fold_keeps_both_kinds():
  pairs = [lists.FacePair(f"a{i}", f"b{i}", same, fold)
           for fold in (0, 1) for same in (True, False) for i in range(3)]
  kept = datasets.limit_pairs_per_fold(pairs, 2)
  assert len(kept) == 8
  assert {(p.fold, p.issame) for p in kept} == {(0, True), (0, False), (1, True), (1, False)}
  rows = np.array([[i, i + 1, same, fold] for fold in (0, 1) for same in (1, 0)
                   for i in range(3)])
  assert len(datasets.limit_pair_rows(rows, 1)) == 4
  assert datasets.limit_pairs_per_fold(pairs, 0) == pairs


def test_lists_without_folds_get_contiguous_folds():
  pairs = [lists.FacePair(f"a{i}", f"b{i}", i % 2 == 0, source=f"l:{i}") for i in range(5)]
  assert [p.fold for p in datasets.with_contiguous_folds(pairs, 2)] == [0, 0, 0, 1, 1]
  assert datasets.with_contiguous_folds(pairs[:0], 2) == []
  mixed = [lists.FacePair("a", "b", True, 0, "l:0"), pairs[1]]
  with pytest.raises(ValueError, match="l:1: pair has no fold while others do"):
    datasets.with_contiguous_folds(mixed, 2)


# --------------------------------------------------------------------------- #
# Protocols end to end on the tiny checkpoint.
# --------------------------------------------------------------------------- #


def test_evaluate_synthetic_in_process_and_from_path(loaded, workdir, data, tmp_path):
  config = tiny_config()
  report = heldout.evaluate_synthetic(None, loaded.variables, config, data=data,
                                      output_dir=tmp_path / "mem", batch_size=BATCH,
                                        num_fas_inputs=3, grid_rows=2)
  summary = report["summary"]
  assert 0.0 <= summary["verification_accuracy"] <= 1.0
  assert summary["age_mae"] >= 0.0 and 0.0 <= summary["age_group_accuracy"] <= 1.0
  assert 0.0 <= summary["fas_age_accuracy"] <= 1.0
  assert -1.0 <= summary["fas_identity_preservation"] <= 1.0
  grid = Image.open(summary["grid_png"])
  assert grid.size == (8 * 48, 2 * 48 + 16)  # input + 7 groups; 2 rows + header.
  assert report["verification"]["synthetic"]["num_pairs"] == len(data.pairs)
  assert report["age"]["synthetic_test"]["num_samples"] == len(data.test)
  assert report["fas"]["synthetic_test"]["num_samples"] == 3 * 7
  # The procedural faces' truth: scored and drawn (synthesized rows over truth rows).
  truth = report["fas_truth"]["synthetic_test"]
  assert truth["num_samples"] > 0 and np.isfinite(summary["fas_truth_gain_region"])
  assert summary["fas_truth_gain_region"] == truth["truth_gain_region"]
  assert Path(summary["truth_grid_png"]).is_file()
  on_disk = report_lib.read_json_report(tmp_path / "mem" / "report.json")
  assert on_disk["summary"] == summary
  assert (tmp_path / "mem" / "roc.png").is_file()
  # The path variant loads the same variables: the same numbers.
  from_path = heldout.evaluate_synthetic(str(workdir), data=data,
                                           output_dir=tmp_path / "path", batch_size=BATCH,
                                           num_fas_inputs=0)
  assert from_path["summary"]["verification_accuracy"] == summary["verification_accuracy"]
  np.testing.assert_allclose(from_path["summary"]["age_mae"], summary["age_mae"], rtol=1e-5)
  assert "fas" not in from_path


@pytest.mark.skipif(not (SHARED_DATA / "lfw" / "pairs.txt").is_file(),
                    reason="../shared/data/lfw is not present")
def test_lfw_verification_end_to_end(workdir, tmp_path):
  out = tmp_path / "lfw"
  report = cli.run(options(workdir, out, "verification",
                           pairs=str(SHARED_DATA / "lfw" / "pairs.txt"), lfw_crop=True,
                           eval_folds="6-10", max_pairs_per_fold=2))
  written = json.loads((out / "report.json").read_text())
  lfw = written["verification"]["lfw"]
  assert lfw["fold_labels"] == [5, 6, 7, 8, 9]  # LFW folds 6-10.
  assert lfw["num_pairs"] == 20 and lfw["num_positive"] == 10
  assert len(lfw["fold_accuracies"]) == 5 and 0.0 <= lfw["accuracy_mean"] <= 1.0
  assert [t["far"] for t in lfw["tar_at_far"]] == [1e-3, 1e-4]
  assert written["datasets"]["lfw"]["num_pairs_listed"] == 6000
  assert written["datasets"]["lfw"]["images_root"].endswith("lfw/images")
  assert written["devices"]["count"] == len(jax.devices())
  assert (out / "roc.png").is_file() and "lfw" in (out / "report.txt").read_text()
  assert report["files"]["roc"] == str(out / "roc.png")


def test_fas_report_and_grids_on_synthetic_faces(workdir, tmp_path):
  out = tmp_path / "fas"
  cli.run(options(workdir, out, "fas", synthetic=True, num_inputs=4, grid_rows=2,
                  grid_faces=3, id_checkpoint=str(workdir), **SYNTHETIC_FLAGS))
  entry = report_lib.read_json_report(out / "report.json")["fas"]["synthetic_test"]
  assert entry["num_samples"] == 4 * 7
  assert [g["count"] for g in entry["per_group"]] == [4] * 7
  assert [g["label"] for g in entry["per_group"]][0] == "0-10"
  for group in entry["per_group"]:
    assert 0.0 <= group["age_accuracy"] <= 1.0 and group["mean_estimated_age"] >= 0.0
  assert entry["age_estimator"] == "checkpoint"
  assert entry["identity_model"].endswith("checkpoints")  # The separately given one.
  assert [Path(p).name for p in entry["grids"]] == ["fas_grid_synthetic_test_00.png",
                                                   "fas_grid_synthetic_test_01.png"]
  assert Image.open(entry["grids"][1]).size == (8 * 48, 1 * 48 + 16)  # 3 faces: 2 + 1.
  assert "per target group" in (out / "report.txt").read_text()


def test_identification_gallery_probe_matches_folders_by_name(workdir, data, tmp_path):
  faces = data.test.images
  for kind, names in (("gallery", ["alice", "bob", "carol"]), ("probe", ["bob", "dave"])):
    for index, name in enumerate(names):
      (tmp_path / kind / name).mkdir(parents=True)
      Image.fromarray(faces[index + (kind == "probe")]).save(tmp_path / kind / name / "0.png")
  report = cli.run(options(workdir, tmp_path / "out", "identification",
                           gallery=str(tmp_path / "gallery"), probe=str(tmp_path / "probe"),
                           synthetic=True, **SYNTHETIC_FLAGS))
  result = report["identification"]["gallery->probe"]
  # Labels are folder NAMES: "dave" has no gallery image, "bob" has one.
  assert (result.num_probes, result.num_skipped) == (1, 1)
  loo = report["identification"]["synthetic_test"]
  assert loo.num_probes == len(data.test) and set(loo.rank_accuracies) == {"rank_1", "rank_5"}


@pytest.mark.skipif(not (SHARED_DATA / "utkface" / "images").is_dir(),
                    reason="../shared/data/utkface is not present")
def test_age_on_utkface_names_counts_malformed_names(workdir, tmp_path):
  folder = str(SHARED_DATA / "utkface" / "images")
  with pytest.raises(ValueError, match=r"61_1_20170109142408075\.jpg\.chip\.jpg: malformed"):
    cli.run(options(workdir, tmp_path, "age", folder=folder, max_images=8))
  report = cli.run(options(workdir, tmp_path, "age", folder=folder, max_images=8,
                           skip_bad_examples=True))
  result = report["age"]["utkface"]
  assert result.num_samples == 8 and result.cs_years == 5.0
  assert report["datasets"]["utkface"]["num_skipped"] == 2


def test_bad_inputs_name_the_entry(workdir, tmp_path, data):
  with pytest.raises(FileNotFoundError, match="--pairs: .*nope.txt does not exist"):
    cli.run(options(workdir, tmp_path, "verification", pairs=str(tmp_path / "nope.txt")))
  with pytest.raises(ValueError, match="verification needs a source"):
    cli.run(options(workdir, tmp_path, "verification"))
  image = tmp_path / "a.png"
  Image.fromarray(data.test.images[0]).save(image)
  listing = tmp_path / "pairs.txt"
  listing.write_text(f"{image} {image} 1 0\n{image} {tmp_path}/gone.png 0 0\n"
                     f"{image} {image} 0 1\n")
  with pytest.raises(FileNotFoundError, match=r"gone.png \(pair at .*pairs.txt:2\)"):
    cli.run(options(workdir, tmp_path, "verification", pair_list=str(listing)))
  listing.write_text(f"{image} {image} 1 0\n{image} {image} 0 0\n{image} {image} 0 1\n")
  with pytest.raises(ValueError, match="fold 1 has no positive"):
    cli.run(options(workdir, tmp_path, "verification", pair_list=str(listing)))


def test_bfloat16_embeddings_agree_with_float32(loaded, workdir, data):
  half = runner.ModelRunner(predict.load(workdir, dtype="bfloat16"), BATCH, progress=False)
  full = runner.ModelRunner(loaded, BATCH, progress=False)
  assert full.num_devices == len(jax.devices())
  faces = np.stack(list(datasets.array_faces(data.test.images[:4], 48)))
  a, b = full.embed(faces), half.embed(faces)
  cosine = np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
  assert a.shape == b.shape and np.all(cosine > 0.98)


def test_eval_py_command_line(workdir, tmp_path):
  out = tmp_path / "cli"
  command = [sys.executable, "eval.py", f"--checkpoint={workdir}", "--protocol=age",
             "--synthetic", f"--batch_size={BATCH}", "--noprogress", f"--output_dir={out}"]
  command += [f"--{name}={value}" for name, value in SYNTHETIC_FLAGS.items()]
  # One device, while the checkpoint was saved from 4: restoring must not
  # depend on the saving run's device topology.
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "Age estimation" in done.stdout and "synthetic_test" in done.stdout
  written = json.loads((out / "report.json").read_text())
  assert written["age"]["synthetic_test"]["mae"] >= 0 and written["devices"]["count"] == 1
  failed = subprocess.run(command + ["--list=/no/such/list.txt"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
  assert failed.returncode == 1
  assert "eval.py: error: --list: /no/such/list.txt does not exist" in failed.stderr


def test_several_verification_sources_in_one_report(workdir, data, tmp_path):
  test = data.test
  same = [(i, i + 1) for i in range(0, 24, 6)]           # 4 same-identity pairs.
  diff = [(i, i + 6) for i in range(0, 24, 6)]           # 4 different-identity pairs.
  ordered = [pair for both in zip(same, diff) for pair in both]  # Both kinds in each half.
  encoded = [images_lib.encode_png(test.images[k]) for pair in ordered for k in pair]
  binset.write_bin(tmp_path / "set.bin", encoded, [p in same for p in ordered])
  lines = []
  for index, (a, b) in enumerate(ordered):
    for k in (a, b):
      Image.fromarray(test.images[k]).save(tmp_path / f"{k}.png")
    lines.append(f"{a}.png {b}.png {int((a, b) in same)} {index // 4 + 1}")  # As the .bin.
  (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
  out = tmp_path / "out"
  report = cli.run(options(workdir, out, "verification", bins=(str(tmp_path / "set.bin"),),
                           num_folds=2, pair_list=str(tmp_path / "list.txt"),
                           images_root=str(tmp_path), synthetic=True, eval_folds="1-2",
                           **SYNTHETIC_FLAGS))
  assert set(report["verification"]) == {"set", "list", "synthetic"}
  assert report["verification"]["set"].fold_labels == [0, 1]
  assert report["verification"]["list"].fold_labels == [1, 2]  # The list's own labels.
  assert report["verification"]["list"].num_pairs == 8
  # The same faces through the list and the .bin: the same accuracy.
  assert (report["verification"]["list"].fold_accuracies
          == report["verification"]["set"].fold_accuracies)
  table = (out / "report.txt").read_text()
  assert all(name in table for name in ("set", "list", "synthetic"))
  assert (out / "roc.png").is_file()


def test_age_from_an_mtlface_list(workdir, data, tmp_path):
  lines = []
  for k in range(5):
    Image.fromarray(data.test.images[k]).save(tmp_path / f"{k}.jpg")
    lines.append(f"{data.test.ids[k]} {k}.jpg {int(data.test.ages[k])} 1")
  lines.append("3 4.jpg -1 0")  # Unknown age: ignored and counted.
  (tmp_path / "scaf.txt").write_text("\n".join(lines) + "\n")
  report = cli.run(options(workdir, tmp_path / "out", "age", list=str(tmp_path / "scaf.txt"),
                           images_root=str(tmp_path), group_from="age", cs_years=10))
  result = report["age"]["scaf"]
  assert (result.num_samples, result.num_ignored, result.cs_years) == (5, 1, 10.0)
  (tmp_path / "scaf.txt").write_text("1 0.jpg 30\n")
  with pytest.raises(ValueError, match=r"scaf.txt:1: expected 4 fields"):
    cli.run(options(workdir, tmp_path / "out", "age", list=str(tmp_path / "scaf.txt")))


# --------------------------------------------------------------------------- #
# New datasets in one run (issue 17) and per-set errors (issue 12).
# --------------------------------------------------------------------------- #


def raw_photo(face: np.ndarray, canvas: tuple[int, int], offset: tuple[int, int],
              scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
  """An aligned 112x112 face pasted into a larger grey photo, and its 5 landmarks."""
  side = int(round(112 * scale))
  photo = np.full((*canvas, 3), 90, np.uint8)
  x, y = offset
  photo[y:y + side, x:x + side] = images_lib.resize_image(face, side)
  return photo, align.ARCFACE_TEMPLATE * (side / 112.0) + np.asarray(offset, np.float64)


def pts_text(five: np.ndarray) -> str:
  """An iBUG 68-point .pts file whose eye contours, nose tip and mouth corners are ``five``."""
  points = np.tile(five.mean(0), (68, 1))
  points[36:42], points[42:48] = five[0], five[1]
  points[30], points[48], points[54] = five[2], five[3], five[4]
  body = "\n".join(f"{x:.3f} {y:.3f}" for x, y in points)
  return f"version: 1\nn_points: 68\n{{\n{body}\n}}\n"


def run_eval_py(argv: list[str]) -> tuple[int, str, str]:
  """eval.py's flags parsed and executed in this process (compiled programs shared)."""
  flag_values = flags.FlagValues()
  cli.define_flags(flag_values)
  flag_values(["eval.py", *argv])
  out, err = io.StringIO(), io.StringIO()
  status = cli.execute(cli.options_from_flags(flag_values), out, err)
  return status, out.getvalue(), err.getvalue()


def test_three_new_sets_take_one_align_each_and_one_eval_run(workdir, data, tmp_path):
  faces, ids = data.test.images, data.test.ids
  people = [np.flatnonzero(ids == i) for i in np.unique(ids)[:4]]  # 4 identities x 6.
  # 1. A CACD-VS-style pair set: raw photos in folders whose names hold spaces,
  #    5-point landmarks, a numbered pair list with quoted names.
  marks, lines = [], []
  for p, person in enumerate(people):
    for k in range(2):
      name = f"Person {p}/{p}_Person {p}_{k:04d}.jpg"
      photo, five = raw_photo(faces[person[k]], (150, 130), (10 + 3 * k, 20))
      save_image(tmp_path / "cacd_raw" / name, photo)
      marks.append(name + " " + " ".join(f"{v:.3f}" for v in five.ravel()))
  (tmp_path / "cacd_landmarks.txt").write_text("\n".join(marks) + "\n")
  number = 0
  for p in range(4):
    number += 1
    lines.append(f'{number} "Person {p}/{p}_Person {p}_0000.jpg" '
                 f'"Person {p}/{p}_Person {p}_0001.jpg" 1')
    number += 1
    q = (p + 1) % 4
    lines.append(f'{number}\tPerson {p}/{p}_Person {p}_0000.jpg\t'
                 f'Person {q}/{q}_Person {q}_0001.jpg\t0')  # The tab form.
  (tmp_path / "cacd_pairs.txt").write_text("\n".join(lines) + "\n")
  # 2. An FG-NET-style folder: 001A02.JPG names, 68-point .pts files named in
  #    lower case beside the images.
  for p, person in enumerate(people):
    for k in range(3):
      photo, five = raw_photo(faces[person[k]], (140, 160), (20, 15), scale=1.1)
      save_image(tmp_path / "fgnet_raw" / f"{p + 1:03d}A{10 * k + 5:02d}.JPG", photo)
      (tmp_path / "fgnet_raw" / f"{p + 1:03d}a{10 * k + 5:02d}.pts").write_text(pts_text(five))
  # 3. A large-age-gap set: <person>/ (old) and <person>/y/ (young), landmarks listed.
  marks = []
  for p, person in enumerate(people):
    for sub, k in (("", 3), ("y/", 4), ("y/", 5)):
      name = f"gap person {p}/{sub}{k}.png"
      photo, five = raw_photo(faces[person[k]], (120, 120), (4, 4))
      save_image(tmp_path / "gap_raw" / name, photo)
      marks.append(name + " " + " ".join(f"{v:.3f}" for v in five.ravel()))
  (tmp_path / "gap_landmarks.txt").write_text("\n".join(marks) + "\n")
  # One align command per set.
  assert align.main(["--input", str(tmp_path / "cacd_raw"), "--output", str(tmp_path / "cacd"),
                     "--landmarks", str(tmp_path / "cacd_landmarks.txt"), "--no-progress"]) == 0
  assert align.main(["--input", str(tmp_path / "fgnet_raw"), "--output",
                     str(tmp_path / "fgnet"), "--no-progress"]) == 0  # .pts found beside.
  assert align.main(["--input", str(tmp_path / "gap_raw"), "--output", str(tmp_path / "gap"),
                     "--landmarks", str(tmp_path / "gap_landmarks.txt"), "--no-progress"]) == 0
  # One eval.py run.
  out = tmp_path / "out"
  status, stdout, stderr = run_eval_py([
      f"--checkpoint={workdir}", "--protocol=verification,identification",
      "--protocol=age", f"--output_dir={out}", f"--batch_size={BATCH}", "--noprogress",
      f"--pair_list=cacd={tmp_path / 'cacd_pairs.txt'}", f"--images_root={tmp_path / 'cacd'}",
      "--num_folds=2", f"--folder={tmp_path / 'fgnet'}", "--folder_format=fgnet",
      "--name=fgnet_tiny", f"--gallery={tmp_path / 'gap'}", "--gallery_subset=",
      f"--probe={tmp_path / 'gap'}", "--probe_subset=y"])
  assert status == 0, stderr
  assert "warning" not in stderr  # Aligned: square 112x112, nothing squashed.
  written = json.loads((out / "report.json").read_text())
  assert written["protocol"] == "verification,identification,age"
  cacd = written["verification"]["cacd"]
  assert cacd["num_pairs"] == 8 and cacd["fold_labels"] == [0, 1]
  entry = written["datasets"]["cacd"]
  assert entry["pair_format"] == "numbered" and entry["num_skipped"] == 0
  assert entry["shapes"] == {"num_images": 8, "num_not_square": 0, "num_resized": 0,
                             "examples": []}
  fgnet = written["identification"]["fgnet_tiny"]
  assert fgnet["num_probes"] == 12 and written["age"]["fgnet_tiny"]["num_samples"] == 12
  assert written["datasets"]["fgnet_tiny"]["identification"] == "leave-one-image-out"
  gap = written["identification"]["gap->gap/y"]
  assert (gap["num_probes"], gap["num_skipped"]) == (8, 0)
  assert written["datasets"]["gap->gap/y"]["probe"]["subsets"]["images"] == {"y": 8}
  assert written["datasets"]["gap->gap/y"]["gallery"]["num_identities"] == 4
  # 8 pair images + 12 FG-NET faces (identification AND age) + 12 gap faces,
  # each decoded and embedded once.
  assert written["embedding_cache"] == {"images_embedded": 32, "images_requested": 16 + 24 + 12}
  assert all(name in stdout for name in ("cacd", "fgnet_tiny", "gap->gap/y"))


def save_image(path: Path, image: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(image).save(path)


def test_crop_box_and_shape_warning_in_the_report(workdir, data, tmp_path):
  faces = data.test.images
  names = ["a b.png", "c.png", "d e.png", "f.png"]
  for k, name in enumerate(names):  # 112x112 faces at (30, 10) in 170x130 photos.
    photo, _ = raw_photo(faces[[0, 1, 6, 7][k]], (130, 170), (30, 10))
    save_image(tmp_path / "photos" / name, photo)
  (tmp_path / "pairs.txt").write_text('"a b.png" c.png 1 1\n"a b.png" "d e.png" 0 1\n'
                                      'd e.png\tf.png\t1\t2\nc.png\tf.png\t0\t2\n')
  common = {"pair_list": (f"photos={tmp_path / 'pairs.txt'}",),
            "images_root": str(tmp_path / "photos")}
  squashed = tmp_path / "squashed"
  err = io.StringIO()
  assert cli.execute(options(workdir, squashed, "verification", **common), io.StringIO(),
                     err) == 0
  entry = json.loads((squashed / "report.json").read_text())["datasets"]["photos"]
  assert entry["shapes"]["num_not_square"] == 4 and entry["crop"] == "none"
  assert "eval.py: warning: photos: 4 of 4 images are not square" in err.getvalue()
  assert "(170x130)" in err.getvalue() and "python -m mtlface_jax.align" in err.getvalue()
  cropped = cli.run(options(workdir, tmp_path / "cropped", "verification",
                            crop="30,10,142,122", **common))
  entry = cropped["datasets"]["photos"]
  assert entry["crop"] == "30,10,142,122" and entry["shapes"]["num_not_square"] == 0
  assert entry["shapes"]["num_resized"] == 0 and "warnings" not in cropped
  with pytest.raises(ValueError, match="crop 0,0,200,200 does not fit the 170x130 image"):
    cli.run(options(workdir, tmp_path / "bad", "verification", crop="0,0,200,200", **common))


def test_each_bin_set_is_scored_on_its_own(workdir, data, tmp_path):
  test = data.test
  ordered = [(0, 1), (0, 6), (6, 7), (1, 7)]
  encoded = [images_lib.encode_png(test.images[k]) for pair in ordered for k in pair]
  binset.write_bin(tmp_path / "good.bin", encoded, [True, False, True, False])

  class Evil:
    def __reduce__(self):
      return (os.system, ("echo pwned",))

  (tmp_path / "evil.bin").write_bytes(pickle.dumps(([Evil()], [True])))
  (tmp_path / "cut.bin").write_bytes((tmp_path / "good.bin").read_bytes()[:40])
  out, err = tmp_path / "out", io.StringIO()
  status = cli.execute(options(workdir, out, "verification", num_folds=2,
                               bins=(str(tmp_path / "evil.bin"), f"agedb={tmp_path / 'good.bin'}",
                                     str(tmp_path / "cut.bin"))), io.StringIO(), err)
  assert status == 1
  written = json.loads((out / "report.json").read_text())
  assert set(written["verification"]) == {"agedb"}  # The good set's result is kept.
  assert [e["dataset"] for e in written["errors"]] == ["evil", "cut"]
  lines = err.getvalue().splitlines()
  assert len(lines) == 2 and all(line.startswith("eval.py: error: verification set ")
                                 for line in lines)
  assert "posix.system" in lines[0] or "os.system" in lines[0] or "system" in lines[0]
  assert "not a readable pickle" in lines[1]
  # Only bad sets: the report still says why, the exit status is 1.
  assert cli.execute(options(workdir, tmp_path / "none", "verification",
                             bins=(str(tmp_path / "evil.bin"),)), io.StringIO(),
                     io.StringIO()) == 1


def test_input_errors_are_one_line_that_names_the_fix(workdir, data, tmp_path):
  for k in range(2):
    save_image(tmp_path / "fgnet" / f"001A{k + 2:02d}.JPG", data.test.images[k])
  (tmp_path / "numbered.txt").write_text("1 001A02.JPG 001A03.JPG 1\n")
  cases = [
      ({"protocol": "age", "folder": str(tmp_path / "fgnet")}, "--folder_format=fgnet"),
      ({"protocol": "verification", "pair_list": str(tmp_path / "numbered.txt"),
        "pair_format": "generic"}, "--pair_format=numbered"),
      ({"protocol": "identification,age", "folder": str(tmp_path / "fgnet")},
       "give --folder_format"),
      ({"protocol": "identification", "gallery": str(tmp_path / "numbered.txt"),
        "probe": str(tmp_path / "numbered.txt"), "gallery_subset": ""},
       "--gallery_subset selects subfolders of an identity folder, but --gallery="),
  ]
  for kwargs, hint in cases:
    protocol = kwargs.pop("protocol")
    err = io.StringIO()
    assert cli.execute(options(workdir, tmp_path / "out", protocol, **kwargs), io.StringIO(),
                       err) == 1
    lines = err.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eval.py: error: "), lines
    assert hint in lines[0], lines[0]


@pytest.mark.parametrize("removed", ["_METADATA", "meta"])
def test_checkpoint_without_metadata_is_one_line(workdir, tmp_path, removed):
  broken = tmp_path / "broken"
  shutil.copytree(workdir, broken)
  doomed = list((broken / "checkpoints" / "1").rglob(removed))
  assert doomed, sorted(str(p) for p in (broken / "checkpoints").rglob("*"))
  for path in doomed:
    if path.is_dir():
      shutil.rmtree(path)
    else:
      path.unlink()
  err = io.StringIO()
  assert cli.execute(options(broken, tmp_path / "out", "age", synthetic=True,
                             **SYNTHETIC_FLAGS), io.StringIO(), err) == 1
  lines = err.getvalue().splitlines()
  assert len(lines) == 1 and lines[0].startswith("eval.py: error: "), err.getvalue()[-2000:]
  assert "checkpoint" in lines[0]


def test_leave_one_person_out_and_whole_identity_thinning(workdir, data, tmp_path):
  people = [np.flatnonzero(data.test.ids == i) for i in np.unique(data.test.ids)[:4]]
  for p, person in enumerate(people):
    for k in range(p + 2):  # 2, 3, 4 and 5 images.
      save_image(tmp_path / "fgnet" / f"{p + 1:03d}A{k + 10:02d}.JPG",
                 data.test.images[person[k]])
  folder = str(tmp_path / "fgnet")
  loio = cli.run(options(workdir, tmp_path / "loio", "identification", folder=folder))
  lopo = cli.run(options(workdir, tmp_path / "lopo", "identification", folder=folder,
                         identification="lopo"))
  by_image, by_person = loio["identification"]["fgnet"], lopo["identification"]["fgnet"]
  assert by_person.rank_accuracies == by_image.rank_accuracies  # A fixed model: same ranks.
  assert by_person.num_probes == 14 and by_person.num_persons == 4
  assert set(by_person.mean_person_accuracies) == {"rank_1", "rank_5"}
  assert lopo["datasets"]["fgnet"]["identification"] == "leave-one-person-out"
  # 7 faces: whole identities only (2 + 5 or 3 + 4), every probe keeps a match.
  thinned = cli.run(options(workdir, tmp_path / "thin", "identification", folder=folder,
                            max_images=7))
  result, entry = thinned["identification"]["fgnet"], thinned["datasets"]["fgnet"]
  assert result.num_skipped == 0 and result.num_probes == entry["num_faces"] <= 7
  assert entry["num_identities"] == 2  # Any first identity leaves room for one more.
