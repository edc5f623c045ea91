"""eval.py's set handling without a model: names, crops, subsets, caching, ages.

Everything here runs on the host (a fake runner stands in for the model), so
nothing is compiled; the end-to-end runs on the tiny checkpoint are in
tests/test_eval_cli.py.
"""

import numpy as np
import pytest
from PIL import Image

from mtlface_jax import ages as ages_lib
from mtlface_jax.evaluation import cli
from mtlface_jax.evaluation import datasets
from mtlface_jax.evaluation import protocols
from mtlface_jax.formats import images as images_lib


def save(path, array):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.asarray(array, np.uint8)).save(path)
  return str(path)


def options(**kwargs) -> cli.EvalOptions:
  return cli.EvalOptions(checkpoint="unused", protocol="verification", **kwargs)


# --------------------------------------------------------------------------- #
# Option helpers.
# --------------------------------------------------------------------------- #


def test_protocol_names_accept_commas_repeats_and_sequences():
  assert cli.protocol_names("age") == ("age",)
  assert cli.protocol_names("verification, age") == ("verification", "age")
  assert cli.protocol_names(("verification,age", "identification", "age")) == (
      "verification", "age", "identification")
  with pytest.raises(ValueError, match=r"\['ages'\] given; use one or more of"):
    cli.protocol_names("verification,ages")
  with pytest.raises(ValueError, match="nothing"):
    cli.protocol_names(())


def test_split_name_names_a_set_unless_the_path_exists(tmp_path):
  assert cli.split_name("cacd=lists/pairs.txt") == ("cacd", "lists/pairs.txt")
  assert cli.split_name("lists/pairs.txt") == (None, "lists/pairs.txt")
  assert cli.split_name("a/b=c.txt") == (None, "a/b=c.txt")  # '/' before '=': a path.
  odd = tmp_path / "x=y.txt"
  odd.write_text("")
  assert cli.split_name(str(odd)) == (None, str(odd))  # An existing path is never split.
  with pytest.raises(ValueError, match="name=path"):
    cli.split_name("=pairs.txt")
  assert cli.as_paths("a.txt") == ["a.txt"] and cli.as_paths(("a", "", "b")) == ["a", "b"]
  assert cli.as_paths("") == [] and cli.as_paths(None) == []


def test_crop_flags():
  assert cli.face_preparation(options()) == (False, None)
  assert cli.face_preparation(options(lfw_crop=True)) == (True, None)
  assert cli.face_preparation(options(crop="lfw")) == (True, None)  # == --lfw_crop.
  lfw_style, box = cli.face_preparation(options(crop="10, 20,60,70"))
  assert not lfw_style and (box.x0, box.y0, box.x1, box.y1, box.frame) == (10, 20, 60, 70, None)
  with pytest.raises(ValueError, match=r"--crop: crop 'face' is not 'x0,y0,x1,y1'.*'lfw'"):
    cli.face_preparation(options(crop="face"))
  with pytest.raises(ValueError, match="--crop=1,1,9,9 and --lfw_crop both crop"):
    cli.face_preparation(options(crop="1,1,9,9", lfw_crop=True))
  assert datasets.crop_key(False, box) == "10,20,60,70"
  assert datasets.crop_key(True, None) == "lfw" and datasets.crop_key(False, None) == ""


def test_subset_selection_and_option_checks():
  assert cli.subset_selection(None) is None
  assert cli.subset_selection("") == [""] and cli.subset_selection("y, o") == ["y", "o"]
  with pytest.raises(ValueError, match="needs both --gallery and --probe"):
    cli.check_options(options(gallery="g"), ["identification"])
  with pytest.raises(ValueError, match="--probe_subset selects subfolders.*give --gallery"):
    cli.check_options(options(probe_subset="y"), ["identification"])
  with pytest.raises(ValueError, match="read by identification, age.*give --folder_format"):
    cli.check_options(options(folder="f"), ["identification", "age"])
  cli.check_options(options(folder="f", folder_format="fgnet"), ["identification", "age"])
  with pytest.raises(ValueError, match="--identification must be one of"):
    cli.check_options(options(identification="kfold"), ["identification"])


def test_lfw_crop_preset_cuts_like_lfw_crop(tmp_path):
  image = np.random.default_rng(0).integers(0, 256, (250, 250, 3), np.uint8)
  path = save(tmp_path / "lfw.png", image)
  preset = datasets.load_face(path, crop=images_lib.parse_crop("lfw"))
  np.testing.assert_array_equal(preset, datasets.load_face(path, lfw_style=True))


# --------------------------------------------------------------------------- #
# Face sets.
# --------------------------------------------------------------------------- #


def test_nested_identity_folders_by_subset(tmp_path):
  rng = np.random.default_rng(0)
  for person in ("ann", "bob lee"):
    save(tmp_path / "gap" / person / "old.png", rng.integers(0, 255, (8, 8, 3)))
    save(tmp_path / "gap" / person / "y" / "young.png", rng.integers(0, 255, (8, 8, 3)))
  save(tmp_path / "gap" / "bob lee" / "y" / "young2.png", rng.integers(0, 255, (8, 8, 3)))
  everything = datasets.from_folder(tmp_path / "gap", "identity")
  assert len(everything) == 5 and everything.name == "gap"
  summary = everything.summary()
  assert summary["subsets"] == {"images": {"": 2, "y": 3}, "identities": {"": 2, "y": 2}}
  assert summary["num_identities"] == 2 and summary["crop"] == "none"
  young = datasets.from_folder(tmp_path / "gap", "identity", subsets=["y"], name="gap/y")
  old = datasets.from_folder(tmp_path / "gap", "identity", subsets=[""])
  assert sorted(young.ids.tolist()) == ["ann", "bob lee", "bob lee"]
  assert old.ids.tolist() == ["ann", "bob lee"] and young.name == "gap/y"
  assert young.subset([0]).subsets.tolist() == ["y"]
  with pytest.raises(ValueError, match=r"no images in subfolder\(s\) \['o'\].*\['', 'y'\]"):
    datasets.from_folder(tmp_path / "gap", "identity", subsets=["o"])
  with pytest.raises(ValueError, match="subfolder 'y' of identity folder 'ann'.*refused"):
    datasets.from_folder(tmp_path / "gap", "identity", nested="refuse")
  refused = datasets.from_folder(tmp_path / "gap", "identity", nested="refuse",
                                 skip_bad_examples=True)
  assert len(refused) == 2 and refused.summary()["num_skipped"] == 3
  with pytest.raises(ValueError, match="subfolder selection needs an identity folder"):
    datasets.from_folder(tmp_path / "gap", "fgnet", subsets=["y"])


def test_ages_outside_the_training_range_are_refused(tmp_path):
  save(tmp_path / "fgnet" / "001A121.JPG", np.zeros((8, 8, 3)))
  with pytest.raises(ValueError, match=rf"1 age\(s\) outside \[0, {ages_lib.MAX_AGE}\].*"
                     r"121 for .*001A121.JPG; training refuses them too"):
    datasets.from_folder(tmp_path / "fgnet", "fgnet")
  with pytest.raises(ValueError, match="outside"):
    datasets.FaceSet("s", "s", [0, 1], [30, -2], images=np.zeros((2, 4, 4, 3), np.uint8))
  ok = datasets.FaceSet("s", "s", [0, 1], [ages_lib.MAX_AGE, -1],
                        images=np.zeros((2, 4, 4, 3), np.uint8))
  assert len(ok) == 2


def test_guess_pair_format_reads_the_first_line(tmp_path):
  cases = {"1 \"a b.jpg\" c.jpg 1\n": "numbered", "a.jpg\tb c.jpg\t0\n": "generic",
           "10 300\n": "lfw", "a.jpg b.jpg same 3\n": "generic", "\nx\n": "generic",
           "\"unbalanced a.jpg b.jpg 1\n": "generic"}
  for index, (text, expected) in enumerate(cases.items()):
    path = tmp_path / f"{index}.txt"
    path.write_text(text)
    assert datasets.guess_pair_format(path) == expected, text


# --------------------------------------------------------------------------- #
# The embedding cache.
# --------------------------------------------------------------------------- #


class FakeRunner:
  """Embeds a face as its mean colour; counts the faces it sees."""

  image_size = 16

  def __init__(self):
    self.seen = 0

  def embed(self, faces, total=None, description="", progress=None):
    out = np.stack([face.mean(axis=(0, 1)) for face in faces])
    self.seen += len(out)
    return out

  def estimate_ages(self, faces, total=None, description="", progress=None):
    embedding = self.embed(faces)
    return {"embedding": embedding, "age": embedding[:, 0] * 10 + 30,
            "group": np.zeros(len(embedding), np.int32)}


def test_cache_embeds_each_file_and_crop_once(tmp_path):
  colours = [(10, 20, 30), (200, 100, 0), (0, 0, 255)]
  paths = [save(tmp_path / f"{i}.png", np.full((20, 30, 3), c)) for i, c in enumerate(colours)]
  model = FakeRunner()
  cache = protocols.EmbeddingCache(model)
  first = cache.encode([paths[0], paths[1], paths[0]])["embedding"]
  np.testing.assert_array_equal(first[0], first[2])
  assert model.seen == 2
  again = cache.encode(paths[::-1])["embedding"]  # Only the third file is new.
  assert model.seen == 3
  np.testing.assert_array_equal(again[2], first[0])
  box = images_lib.parse_crop("0,0,20,20")
  cache.encode(paths[:1], crop=box)  # Another crop: another entry.
  assert model.seen == 4
  assert cache.stats() == {"images_embedded": 4, "images_requested": 7}
  # 20x30 photos are squashed; the 20x20 crop is square but not 112x112.
  tally = cache.shape_tally(paths)
  assert (tally.num_images, tally.num_not_square, tally.num_resized) == (3, 3, 0)
  assert "3 of 3 images are not square" in tally.warning()
  cropped = cache.shape_tally(paths[:1], crop=box)
  assert (cropped.num_not_square, cropped.num_resized) == (0, 1)
  with pytest.raises(ValueError, match="keeps no ages"):
    cache.encode(paths, need_age=True)


def test_cache_with_ages_serves_embeddings_and_ages(tmp_path):
  paths = [save(tmp_path / f"{i}.png", np.full((112, 112, 3), 50 * i)) for i in range(3)]
  model = FakeRunner()
  cache = protocols.EmbeddingCache(model, with_age=True)
  embeddings = cache.encode(paths[:2])
  assert set(embeddings) == {"embedding"}
  both = cache.encode(paths, need_age=True)
  assert model.seen == 3 and set(both) == {"embedding", "age", "group"}
  np.testing.assert_allclose(both["age"], both["embedding"][:, 0] * 10 + 30)
  assert cache.shape_tally(paths).warning() is None
