"""Tests of the list, name and folder readers for new cross-age sets (issue 17)
and of the .idx count check and the shared age range (issue 12)."""

from pathlib import Path

import numpy as np
import pytest

from mtlface_jax import ages
from mtlface_jax import input_pipeline
from mtlface_jax.formats import images
from mtlface_jax.formats import lists
from mtlface_jax.formats import recordio
from mtlface_jax.formats import parse_report


def _write(path: Path, text: str) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  return path


# ------------------------------------------------------- names with spaces


def test_split_fields_quotes_and_tabs():
  assert lists.split_fields("a.jpg b.jpg 1") == ["a.jpg", "b.jpg", "1"]
  assert lists.split_fields('"a b.jpg" "c  d.jpg" 1 3') == [
      "a b.jpg", "c  d.jpg", "1", "3"]
  assert lists.split_fields("a b.jpg\tc d.jpg\t1\n") == ["a b.jpg", "c d.jpg",
                                                        "1"]
  # A quote inside a name is an ordinary character.
  assert lists.split_fields('O"Neil.jpg x.jpg 0') == ['O"Neil.jpg', "x.jpg",
                                                      "0"]
  # Tabs separate only when that gives an accepted count (LFW-style lines
  # with a stray space before a tab keep working).
  assert lists.split_fields("a.jpg b.jpg\t1", (3, 4)) == ["a.jpg", "b.jpg",
                                                          "1"]
  for bad in ('"a b.jpg c.jpg 1', '"a b"x.jpg c.jpg 1', '"" c.jpg 1'):
    with pytest.raises(ValueError, match="quote"):
      lists.split_fields(bad)


def test_pair_lists_with_spaces_in_names(tmp_path):
  path = _write(tmp_path / "pairs.txt",
                '"Ann Lee/1.jpg" "Ann Lee/2.jpg" 1\n'
                "Bo Ng/1.jpg\tCy Oh/3.jpg\t0\t2\n"
                "plain/1.jpg plain/2.jpg same\n")
  pairs, report = lists.parse_pair_list(path, "/r")
  assert report.num_ok == 3
  assert [(p.path1, p.path2, p.issame, p.fold) for p in pairs] == [
      ("/r/Ann Lee/1.jpg", "/r/Ann Lee/2.jpg", True, -1),
      ("/r/Bo Ng/1.jpg", "/r/Cy Oh/3.jpg", False, 2),
      ("/r/plain/1.jpg", "/r/plain/2.jpg", True, -1)]
  # Unquoted spaces: the error names the line and says how to write it.
  _write(path, "ok/1.jpg ok/2.jpg 1\nAnn Lee/1.jpg Ann Lee/2.jpg 1\n")
  with pytest.raises(ValueError, match=r'pairs\.txt:2: .*got 5 fields; a '
                     r'name with spaces must be quoted \("a b\.jpg"\)'):
    lists.parse_pair_list(path)
  numbered = _write(tmp_path / "cacd.txt",
                    '1 "A B/1.jpg" "A B/2.jpg" 1\n2\tC D/1.jpg\tE/1.jpg\t0\n')
  pairs, _ = lists.parse_numbered_pairs(numbered, num_folds=1)
  assert [(p.path1, p.path2, p.issame) for p in pairs] == [
      ("A B/1.jpg", "A B/2.jpg", True), ("C D/1.jpg", "E/1.jpg", False)]
  scaf = _write(tmp_path / "train.txt",
                '0 "x y/1.jpg" 30 1\n1\tz w.jpg\t40\t0\n')
  records, _ = lists.parse_mtlface_list(scaf)
  assert [(r.path, r.age) for r in records] == [("x y/1.jpg", 30.0),
                                                ("z w.jpg", 40.0)]


def test_lfw_pairs_still_parse_with_tabs_and_spaces(tmp_path):
  path = _write(tmp_path / "pairs.txt",
                "1 1\nAnn\t1\t2\nAnn 1 Bob 2\n")
  pairs, _ = lists.parse_lfw_pairs(path, "/lfw")
  assert [(p.path1, p.path2, p.issame) for p in pairs] == [
      ("/lfw/Ann/Ann_0001.jpg", "/lfw/Ann/Ann_0002.jpg", True),
      ("/lfw/Ann/Ann_0001.jpg", "/lfw/Bob/Bob_0002.jpg", False)]


# ------------------------------------------- errors that suggest the flag


def test_wrong_pair_format_suggests_the_flag(tmp_path):
  numbered = _write(tmp_path / "cacd_vs.txt",
                    "0000 0000_1.jpg 0000_2.jpg 1\n"
                    "0001 0001_1.jpg 0002_1.jpg 0\n")
  with pytest.raises(ValueError, match=r"cacd_vs\.txt:1: same/different label "
                     r"'0000_2\.jpg'.*use --pair_format=numbered"):
    lists.parse_pair_list(numbered)
  # Skipping bad lines does not hide a list in another format.
  with pytest.raises(ValueError, match="--pair_format=numbered"):
    lists.parse_pair_list(numbered, skip_bad_examples=True)
  generic = _write(tmp_path / "agedb.txt", "a.jpg b.jpg 1\nc.jpg d.jpg 0 2\n")
  with pytest.raises(ValueError,
                     match=r"agedb\.txt:1: .*use --pair_format=generic"):
    lists.parse_numbered_pairs(generic)
  with pytest.raises(ValueError,
                     match=r"agedb\.txt:1: expected a header.*generic"):
    lists.parse_lfw_pairs(generic)
  lfw = _write(tmp_path / "pairs.txt", "1\t1\nAnn\t1\t2\nAnn\t1\tBob\t2\n")
  with pytest.raises(ValueError, match=r"pairs\.txt:1: .*--pair_format=lfw"):
    lists.parse_pair_list(lfw)
  with pytest.raises(ValueError, match=r"pairs\.txt:1: .*--pair_format=lfw"):
    lists.parse_numbered_pairs(lfw)
  # One bad line in a list of the right format keeps its plain message and
  # is skipped as before.
  _write(generic, "a.jpg b.jpg 1\nc.jpg d.jpg maybe\n")
  pairs, report = lists.parse_pair_list(generic, skip_bad_examples=True)
  assert len(pairs) == 1 and report.num_skipped == 1
  assert "--pair_format" not in report.skipped[0][1]


def test_guess_pair_format():
  guess = lists.guess_pair_format
  assert guess(["10", "300"]) == "lfw"
  assert guess(["Abel_Pacheco", "1", "4"]) == "lfw"
  assert guess(["Ann", "1", "Bob", "2"]) == "lfw"
  assert guess(["12", "a.jpg", "b.jpg", "1"]) == "numbered"
  assert guess(["a.jpg", "b.jpg", "-1"]) == "generic"
  assert guess(["a.jpg", "b.jpg", "true", "3"]) == "generic"
  assert guess(["a.jpg", "b.jpg"]) is None


def test_fgnet_and_utkface_names_suggest_each_other(tmp_path):
  with pytest.raises(ValueError, match=r"malformed UTKFace name '001A02\.JPG'"
                     r".*use --folder_format=fgnet"):
    lists.parse_utkface_name("001A02.JPG")
  with pytest.raises(ValueError, match=r"malformed FG-NET name.*"
                     r"use --folder_format=utkface"):
    lists.parse_fgnet_name("26_0_2_20170116174525125.jpg.chip.jpg")
  with pytest.raises(ValueError) as info:
    lists.parse_utkface_name("holiday.jpg")
  assert "--folder_format" not in str(info.value)
  for name in ("001A02.JPG", "001A05.JPG"):
    _write(tmp_path / "fgnet" / name, "x")
  with pytest.raises(ValueError,
                     match=r"001A02\.JPG: malformed UTKFace.*fgnet"):
    lists.parse_utkface_folder(tmp_path / "fgnet")
  # A folder of person folders given to a names parser.
  _write(tmp_path / "people" / "ann" / "1.jpg", "x")
  for parse in (lists.parse_utkface_folder, lists.parse_fgnet_folder):
    with pytest.raises(ValueError, match="use --folder_format=identity"):
      parse(tmp_path / "people")


# ------------------------------------------------- nested identity folders


def _nested_set(root: Path) -> None:
  for name in ("bob/1.jpg", "bob/y/2.jpg", "bob/y/3.png", "bob/y/old/4.jpg",
               "ann/1.jpg", "ann/y/2.jpg", "ann/notes.txt",
               "ann/.ipynb_checkpoints/1.jpg", "cid/y/1.jpg", ".trash/x.jpg"):
    _write(root / name, "x")


def test_identity_folders_include_nested_images(tmp_path):
  _nested_set(tmp_path / "set")
  records, names, report = lists.parse_identity_folders(tmp_path / "set")
  assert names == ["ann", "bob", "cid"]
  got = [(names[r.id], r.subset, Path(r.path).name) for r in records]
  assert got == [("ann", "", "1.jpg"), ("ann", "y", "2.jpg"),
                 ("bob", "", "1.jpg"), ("bob", "y", "2.jpg"),
                 ("bob", "y", "3.png"), ("bob", "y/old", "4.jpg"),
                 ("cid", "y", "1.jpg")]
  assert report.num_ok == 7 and report.num_skipped == 0
  assert lists.subset_counts(records) == {
      "images": {"": 2, "y": 4, "y/old": 1},
      "identities": {"": 2, "y": 3, "y/old": 1}}
  old = lists.select_subsets(records, [""])
  young = lists.select_subsets(records, ["y", "y/old"])
  assert len(old) == 2 and len(young) == 5
  with pytest.raises(ValueError, match=r"\['x'\].*\['', 'y', 'y/old'\]"):
    lists.select_subsets(records, ["x"])
  assert lists.records_to_arrays(records)["subset"].tolist()[1] == "y"


def test_identity_folders_can_refuse_nested_images(tmp_path):
  _nested_set(tmp_path / "set")
  with pytest.raises(ValueError, match=r"2\.jpg: image is in subfolder 'y' of "
                     r"identity folder 'ann'"):
    lists.parse_identity_folders(tmp_path / "set", nested="refuse")
  records, _, report = lists.parse_identity_folders(
      tmp_path / "set", nested="refuse", skip_bad_examples=True)
  assert len(records) == 2 and report.num_skipped == 5
  with pytest.raises(ValueError, match="nested must be one of"):
    lists.parse_identity_folders(tmp_path / "set", nested="ignore")


# ------------------------------------------------------- .idx vs header


@pytest.fixture
def rec_file(tmp_path):
  """An insightface .rec: images of identities 0, 0, 1, 2 (records 1-4)."""
  labels = [0, 0, 1, 2]
  encoded = [images.encode_png(np.full((8, 8, 3), 40 * i, np.uint8))
             for i in range(len(labels))]
  rec_path = tmp_path / "train.rec"
  recordio.write_insightface_rec(rec_path, labels, encoded)
  return rec_path


def _drop_idx_lines(rec_path: Path, indices) -> None:
  idx = rec_path.with_suffix(".idx")
  lines = [l for l in idx.read_text().splitlines()
           if int(l.split("\t")[0]) not in indices]
  idx.write_text("\n".join(lines) + "\n")


def test_complete_idx_passes_the_header_check(rec_file):
  with recordio.RecordIOReader(rec_file) as reader:
    assert reader.missing_records() == []
    assert reader.image_indices() == [1, 2, 3, 4]


@pytest.mark.parametrize("dropped", [{7}, {3}])
def test_shortened_idx_is_an_error_or_a_counted_skip(rec_file, dropped):
  # {7}: the last line (an identity record) cut; {3}: an image's line.
  _drop_idx_lines(rec_file, dropped)
  with recordio.RecordIOReader(rec_file) as reader:
    with pytest.raises(recordio.RecordIOError,
                       match=r"train\.idx indexes 7 records but record 0 of "
                       r".*train\.rec says there are 8.*missing: "
                       + str(min(dropped))):
      reader.image_indices()
    with pytest.raises(ValueError, match="train.idx indexes 7"):
      list(recordio.iter_images(reader))
    report = parse_report.ParseReport()
    got = [i for i, _, _ in recordio.iter_images(reader, skip_bad_examples=True,
                                                 report=report)]
  assert got == [i for i in (1, 2, 3, 4) if i not in dropped]
  assert report.num_ok == len(got) and report.num_skipped == 1
  where, why = report.skipped[0]
  assert where.endswith(f"train.rec: record {min(dropped)}")
  assert "not in" in why and "train.idx" in why


def test_header_check_ignores_recs_without_an_insightface_header(tmp_path):
  # Record 0 is an image with [id, age, gender] labels (real_data shards).
  with recordio.RecordIOWriter(tmp_path / "s.rec") as writer:
    for i in range(3):
      writer.write(i, recordio.pack([i, 30.0, 1.0], b"jpegbytes", i))
  with recordio.RecordIOReader(tmp_path / "s.rec") as reader:
    assert reader.identity_range() is None
    assert reader.missing_records() == []
    assert reader.image_indices() == [0, 1, 2]


# --------------------------------------------------------- one age range


def test_training_and_evaluation_accept_the_same_ages(tmp_path):
  assert lists.MAX_AGE == ages.MAX_AGE == 120
  # Evaluation: UTKFace names and lists up to MAX_AGE, refused above.
  assert lists.parse_utkface_name(
      "116_0_0_20170120134921760.jpg.chip.jpg")[0] == 116
  with pytest.raises(ValueError, match="above 120"):
    lists.parse_utkface_name("121_0_0_20170120134921760.jpg.chip.jpg")
  path = _write(tmp_path / "train.txt", "0 a.jpg 110 1\n1 b.jpg 120 0\n")
  records, _ = lists.parse_mtlface_list(path, num_ids=2)
  assert [r.age for r in records] == [110.0, 120.0]
  # Training: the pipeline's label check takes the same records.
  source = input_pipeline.source_from_records(records)
  np.testing.assert_array_equal(source.ages, [110.0, 120.0])
  np.testing.assert_array_equal(ages.groups_of(source.ages), [6, 6])
  with pytest.raises(input_pipeline.BadExampleError,
                     match=r"c\.jpg: age must be -1 \(unknown\) or in "
                     r"\[0, 120\]"):
    input_pipeline.source_from_records([("c.jpg", 0, 121.0, 1)])
  _write(path, "0 a.jpg 121 1\n")
  with pytest.raises(ValueError, match=r"train\.txt:1: age 121 is outside"):
    lists.parse_mtlface_list(path)


def test_training_config_list_uses_the_shared_range(tmp_path):
  from mtlface_jax import data_sources  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  path = _write(tmp_path / "train.txt", "0 a.jpg 105 1\n1 b.jpg 30 0\n")
  config = ml_collections.ConfigDict({
      "model": {"num_classes": 2},
      "data": {"name": "mtlface_list",
               "mtlface_list": {"file": str(path), "image_root": str(tmp_path)},
               "skip_bad_examples": False,
               # The images are not written: only the labels are under test.
               "verify_images": "off"}})
  source = data_sources.train_source(config)
  np.testing.assert_array_equal(source.ages, [105.0, 30.0])


# ------------------------------------------------- crops and image shapes


def test_parse_crop_and_presets():
  assert images.parse_crop("40, 60,210,230") == images.CropBox(40, 60, 210, 230)
  assert images.parse_crop("lfw").frame == (250, 250)
  for bad in ("40,60,210", "a,b,c,d", "10,10,5,20", "centre"):
    with pytest.raises(ValueError, match="crop"):
      images.parse_crop(bad)
  # The lfw preset frames a 250x250 image exactly like the fixed LFW crop.
  photo = np.random.default_rng(0).integers(0, 256, (250, 250, 3), np.uint8)
  np.testing.assert_array_equal(
      images.to_face(photo, crop=images.parse_crop("lfw")),
      images.lfw_crop(photo))


def test_crop_box_cuts_the_face_out():
  photo = np.zeros((386, 321, 3), np.uint8)
  photo[60:230, 40:210] = 200  # The face, away from the centre.
  face = images.to_face(photo, crop=images.parse_crop("40,60,210,230"))
  assert face.shape == (112, 112, 3) and face.min() == 200
  # A preset box scales with the image: half-size photo, same framing.
  box = images.CropBox(40, 60, 210, 230, frame=(321, 386))
  small = photo[::2, ::2]
  assert images.to_face(small, crop=box).min() == 200
  with pytest.raises(ValueError, match=r"p\.jpg: crop 300,60,400,230 does "
                     r"not fit the 321x386 image"):
    images.crop_image(photo, images.CropBox(300, 60, 400, 230), "p.jpg")
  with pytest.raises(ValueError, match="not both"):
    images.to_face(photo, lfw_style=True, crop=box)


def test_shape_tally_warns_about_squashed_images():
  tally = images.ShapeTally()
  assert tally.warning() is None
  images.to_face(np.zeros((112, 112, 3), np.uint8), tally=tally, source="a")
  assert tally.warning() is None
  images.to_face(np.zeros((386, 321, 3), np.uint8), tally=tally, source="b.jpg")
  images.to_face(np.zeros((250, 250, 3), np.uint8), tally=tally, source="c")
  counts = (tally.num_images, tally.num_not_square, tally.num_resized)
  assert counts == (3, 1, 1)
  warning = tally.warning()
  assert "1 of 3 images are not square" in warning
  assert "b.jpg (321x386)" in warning
  assert "1 square images were not 112x112" in warning
  # A crop that makes the face square leaves nothing to warn about.
  tally = images.ShapeTally()
  images.to_face(np.zeros((386, 321, 3), np.uint8), tally=tally,
                 crop=images.parse_crop("0,0,112,112"))
  assert tally.warning() is None
