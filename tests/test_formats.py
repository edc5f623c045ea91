"""Tests of the dataset format readers, on fixtures the tests write."""

import os
import pickle
from pathlib import Path
import struct

import numpy as np
import pytest

from mtlface_jax.formats import binset
from mtlface_jax.formats import images
from mtlface_jax.formats import lists
from mtlface_jax.formats import recordio
from mtlface_jax.formats import parse_report

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _image(seed: int, size: int = 112) -> np.ndarray:
  """A distinct smooth RGB image per seed (smooth so JPEG keeps it close)."""
  ys, xs = np.mgrid[0:size, 0:size]
  rng = np.random.default_rng(seed)
  a, b, c = rng.uniform(0.5, 2.0, 3)
  image = np.stack([xs * a, ys * b, (xs + ys) * c / 2], axis=-1)
  return (image % 256).astype(np.uint8)


def _write(path: Path, text: str) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  return path


# ----------------------------------------------------------------- RecordIO


@pytest.fixture
def rec_file(tmp_path):
  """An insightface-style .rec: 6 PNG images of identities 0, 0, 1, 2, 2, 2."""
  labels = [0, 0, 1, 2, 2, 2]
  pixels = [_image(i, 16) for i in range(len(labels))]
  rec_path = tmp_path / "train.rec"
  recordio.write_insightface_rec(rec_path, labels,
                                 [images.encode_png(p) for p in pixels])
  return rec_path, labels, pixels


def test_rec_roundtrip_insightface_layout(rec_file):
  rec_path, labels, pixels = rec_file
  idx_lines = rec_path.with_suffix(".idx").read_text().splitlines()
  assert len(idx_lines) == 1 + 6 + 3 and idx_lines[0] == "0\t0"
  with recordio.RecordIOReader(rec_path) as reader:
    assert len(reader) == 10
    assert reader.identity_range() == (7, 10)
    assert reader.image_indices() == [1, 2, 3, 4, 5, 6]
    for index in reader.image_indices():
      header, image = reader.read_image(index)
      assert recordio.image_label(header) == labels[index - 1]
      assert header.id == index
      np.testing.assert_array_equal(image, pixels[index - 1])
    # Identity header records: [first, end) of each identity's images.
    ranges = [tuple(reader.read(k)[0].labels) for k in range(7, 10)]
    assert ranges == [(1, 3), (3, 4), (4, 7)]
    for index in range(10):  # The header-only read agrees with a full read.
      quick, full = reader.read_header(index), reader.read(index)[0]
      assert (quick.flag, quick.id, quick.id2) == (full.flag, full.id, full.id2)
      np.testing.assert_array_equal(quick.labels, full.labels)
    assert [i for i, _, _ in reader] == list(range(10))


def test_multi_float_label_header_roundtrip(tmp_path):
  record = recordio.pack([3.0, 25.5, 1.0], b"payload!", record_id=7, id2=9)
  header, payload = recordio.unpack(record)
  assert header.flag == 3 and header.id == 7 and header.id2 == 9
  np.testing.assert_array_equal(header.labels, [3.0, 25.5, 1.0])
  assert payload == b"payload!"
  with recordio.RecordIOWriter(tmp_path / "x.rec") as writer:
    writer.write(5, record)
    writer.write(2, recordio.pack(4.0, b"abc"))
  with recordio.RecordIOReader(tmp_path / "x.rec") as reader:
    assert reader.keys == [2, 5]
    header, payload = reader.read(5)
    np.testing.assert_array_equal(header.labels, [3.0, 25.5, 1.0])
    np.testing.assert_array_equal(reader.read_header(5).labels,
                                  [3.0, 25.5, 1.0])
    assert payload == b"payload!"
    header, payload = reader.read(2)
    assert header.flag == 0 and header.label == 4.0 and payload == b"abc"
    assert reader.identity_range() is None  # Record 0 absent.


def test_payload_containing_magic_is_split_and_rejoined(tmp_path):
  magic = struct.pack("<I", recordio.MAGIC)
  payload = magic + b"abcd" + magic + b"xyz" + magic[:2]
  with recordio.RecordIOWriter(tmp_path / "m.rec") as writer:
    writer.write(0, payload)
    writer.write(1, b"next")
  raw = (tmp_path / "m.rec").read_bytes()
  first_flag = struct.unpack_from("<I", raw, 4)[0] >> 29
  assert first_flag == 1  # Written as a multi-part record.
  assert len(raw) % 4 == 0
  for idx_present in (True, False):
    if not idx_present:
      (tmp_path / "m.idx").unlink()  # Forces a scan of the .rec.
    with recordio.RecordIOReader(tmp_path / "m.rec") as reader:
      assert reader.read_raw(0) == payload
      assert reader.read_raw(1) == b"next"


def test_unreadable_records_name_file_and_index(rec_file):
  rec_path, _, _ = rec_file
  with recordio.RecordIOReader(rec_path) as reader:
    offset3 = reader._offsets[3]  # pylint: disable=protected-access
    offset4 = reader._offsets[4]  # pylint: disable=protected-access
  raw = bytearray(rec_path.read_bytes())
  raw[offset3:offset3 + 4] = b"\0\0\0\0"  # Bad magic in record 3.
  raw[offset4 + 8 + 24:offset4 + 8 + 40] = b"\x00" * 16  # Garble image 4.
  rec_path.write_bytes(bytes(raw))
  with recordio.RecordIOReader(rec_path) as reader:
    with pytest.raises(recordio.RecordIOError,
                       match=r"train\.rec.*record 3.*magic"):
      reader.read(3)
    with pytest.raises(recordio.RecordIOError, match=r"train\.rec.*record 4"):
      reader.read_image(4)
    with pytest.raises(KeyError, match="no record with index 42"):
      reader.read(42)
    report = parse_report.ParseReport()
    got = list(recordio.iter_images(reader, skip_bad_examples=True,
                                    report=report))
    assert [index for index, _, _ in got] == [1, 2, 5, 6]
    assert report.num_ok == 4 and report.num_skipped == 2
    with pytest.raises(ValueError, match="record 3"):
      list(recordio.iter_images(reader))
  rec_path.write_bytes(bytes(raw[:offset4 + 20]))  # Truncated file.
  with recordio.RecordIOReader(rec_path) as reader:
    with pytest.raises(recordio.RecordIOError, match="record 4.*truncated"):
      reader.read(4)


def test_malformed_idx_names_line(rec_file):
  rec_path, _, _ = rec_file
  idx = rec_path.with_suffix(".idx")
  lines = idx.read_text().splitlines()
  lines[2] = "2 notanumber"
  idx.write_text("\n".join(lines))
  with pytest.raises(recordio.RecordIOError, match=r"train\.idx:3"):
    recordio.RecordIOReader(rec_path)


def test_scaf_list_join(rec_file, tmp_path):
  rec_path, _, _ = rec_file
  assert recordio.scaf_name(2, 5) == "000002/00000005.jpg"
  assert recordio.parse_scaf_name("000002/00000005.jpg") == (2, 5)
  list_path = _write(tmp_path / "scaf.txt",
                     "0 000000/00000001.jpg 23 1\n"
                     "1 000002/00000006.jpg 61.5 0\n"
                     "7 000001/00000005.jpg 30 1\n"  # Record 5 has label 2.
                     "8 000002/00000099.jpg 30 1\n"  # No such record.
                     "9 badname.jpg 30 0\n")
  entries, _ = lists.parse_mtlface_list(list_path)
  with recordio.RecordIOReader(rec_path) as reader:
    with pytest.raises(ValueError, match=r"scaf\.txt:3: .*label 2"):
      recordio.join_scaf_list(reader, entries)
    joined, report = recordio.join_scaf_list(reader, entries,
                                             skip_bad_examples=True)
    assert [(e.index, e.id, e.age, e.gender) for e in joined] == [
        (1, 0, 23.0, 1), (6, 1, 61.5, 0)]
    assert report.num_skipped == 3
    assert [loc.rsplit(":", 1)[1] for loc, _ in report.skipped] == ["3", "4",
                                                                    "5"]


# ------------------------------------------------------------ .bin sets


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_bin_roundtrip(tmp_path, protocol):
  encoded = [images.encode_png(_image(i, 8)) for i in range(6)]
  path = tmp_path / "agedb_30.bin"
  binset.write_bin(path, encoded, [True, False, True], protocol=protocol)
  got_images, issame = binset.read_bin(path)
  assert got_images == encoded and issame == [True, False, True]
  pairs = list(binset.iter_bin_pairs(path, num_folds=3))
  assert [(k, same, fold) for k, _, _, same, fold in pairs] == [
      (0, True, 0), (1, False, 1), (2, True, 2)]
  np.testing.assert_array_equal(pairs[1][1], _image(2, 8))


def test_bin_with_numpy_contents(tmp_path):
  # Some converters store bytes as uint8 arrays and issame as a bool array.
  encoded = [np.frombuffer(images.encode_png(_image(i, 8)), np.uint8)
             for i in range(4)]
  path = tmp_path / "cfp_fp.bin"
  path.write_bytes(pickle.dumps((encoded, np.array([False, True]))))
  got_images, issame = binset.read_bin(path)
  assert got_images[3] == encoded[3].tobytes() and issame == [False, True]


class _EvilSystem:

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return (os.system, (self.command,))


class _EvilEval:

  def __init__(self, code):
    self.code = code

  def __reduce__(self):
    return (eval, (self.code,))


class _PlainObject:
  pass


def test_malicious_bin_is_refused_without_running(tmp_path):
  marker = tmp_path / "pwned"
  payloads = {
      "system": _EvilSystem(f"touch {marker}"),
      "eval": _EvilEval(f"open({str(marker)!r}, 'w').close()"),
  }
  for name, evil in payloads.items():
    path = tmp_path / f"{name}.bin"
    path.write_bytes(pickle.dumps(([b"x", b"y"], [evil]), protocol=2))
    with pytest.raises(binset.UnsafePickleError,
                       match=rf"{name}\.bin: refused to load global "
                       r"'(posix|nt|os|builtins|__builtin__)\.(system|eval)'"):
      binset.read_bin(path)
    assert not marker.exists()
  # A hand-written protocol-0 pickle calling os.system directly.
  path = tmp_path / "proto0.bin"
  path.write_bytes(f"cos\nsystem\n(S'touch {marker}'\ntR.".encode())
  with pytest.raises(binset.UnsafePickleError, match="'os.system'"):
    binset.read_bin(path)
  assert not marker.exists()
  # Instances of arbitrary classes are refused too.
  path = tmp_path / "object.bin"
  path.write_bytes(pickle.dumps(([_PlainObject()], []), protocol=2))
  with pytest.raises(binset.UnsafePickleError, match="_PlainObject"):
    binset.read_bin(path)


def test_bad_bin_files(tmp_path):
  path = tmp_path / "garbage.bin"
  path.write_bytes(b"\x80\x04not a pickle at all")
  with pytest.raises(ValueError, match=r"garbage\.bin: not a readable pickle"):
    binset.read_bin(path)
  path.write_bytes(pickle.dumps(([b"a", b"b", b"c"], [True])))
  with pytest.raises(ValueError, match="3 images for 1 pairs"):
    binset.read_bin(path)
  path.write_bytes(pickle.dumps(([b"a", 5], [True])))
  with pytest.raises(ValueError, match="image 1 is a int"):
    binset.read_bin(path)
  with pytest.raises(FileNotFoundError, match="missing.bin"):
    binset.read_bin(tmp_path / "missing.bin")


# ------------------------------------------------------ annotation lists


def test_mtlface_list_parses_and_names_bad_lines(tmp_path):
  good = "3 a/1.jpg 25 1\n\n17 b/2.jpg 61.5 0\n4 c/3.jpg -1 -1\n"
  path = _write(tmp_path / "train.txt", good)
  records, report = lists.parse_mtlface_list(path, "/root", num_ids=18)
  assert [(r.path, r.id, r.age, r.gender) for r in records] == [
      ("/root/a/1.jpg", 3, 25.0, 1), ("/root/b/2.jpg", 17, 61.5, 0),
      ("/root/c/3.jpg", 4, -1.0, -1)]
  assert report.num_ok == 3 and records[1].source.endswith("train.txt:3")
  arrays = lists.records_to_arrays(records)
  assert arrays["id"].dtype == np.int32 and arrays["age"].dtype == np.float32
  bad_lines = {
      "5 x.jpg 30\n": "expected 4 fields",
      "5 x.jpg 150 1\n": "age 150 is outside",
      "5 x.jpg 30 2\n": "gender 2",
      "five x.jpg 30 1\n": "id 'five' is not an integer",
      "99 x.jpg 30 1\n": r"id 99 is out of range \[0, 18\)",
      "5 x.jpg old 1\n": "age 'old' is not a number",
  }
  for bad, message in bad_lines.items():
    _write(path, good + bad)
    with pytest.raises(ValueError, match=rf"train\.txt:5: {message}"):
      lists.parse_mtlface_list(path, num_ids=18)
  _write(path, good + "".join(bad_lines))
  records, report = lists.parse_mtlface_list(path, num_ids=18,
                                             skip_bad_examples=True)
  assert len(records) == 3 and report.num_skipped == len(bad_lines)
  assert [loc.rsplit(":", 1)[1] for loc, _ in report.skipped] == [
      "5", "6", "7", "8", "9", "10"]
  assert "6 skipped" in report.summary()


def test_mtlface_list_check_files(tmp_path):
  (tmp_path / "img").mkdir()
  (tmp_path / "img" / "there.jpg").write_bytes(b"x")
  path = _write(tmp_path / "l.txt", "0 there.jpg 20 1\n1 gone.jpg 20 1\n")
  with pytest.raises(ValueError, match=r"l\.txt:2: image file .*gone\.jpg"):
    lists.parse_mtlface_list(path, tmp_path / "img", check_files=True)


def test_lfw_pairs(tmp_path):
  text = ("2\t2\n"
          "Ann\t1\t2\nBob\t1\t3\nAnn\t1\tBob\t2\nCid\t4\tAnn\t2\n"
          "Dee\t1\t2\nDee\t2\t3\nDee\t1\tEve\t1\nEve\t1\tAnn\t1\n")
  path = _write(tmp_path / "pairs.txt", text)
  pairs, report = lists.parse_lfw_pairs(path, "/lfw")
  assert report.num_ok == 8
  assert [(p.issame, p.fold) for p in pairs] == [
      (True, 0), (True, 0), (False, 0), (False, 0),
      (True, 1), (True, 1), (False, 1), (False, 1)]
  assert pairs[0].path1 == "/lfw/Ann/Ann_0001.jpg"
  assert pairs[3].path1 == "/lfw/Cid/Cid_0004.jpg"
  assert pairs[3].path2 == "/lfw/Ann/Ann_0002.jpg"
  # A mismatched line where a matched one belongs names its line.
  _write(path, text.replace("Bob\t1\t3", "Bob\t1\tAnn\t3"))
  with pytest.raises(ValueError, match=r"pairs\.txt:3: expected a matched"):
    lists.parse_lfw_pairs(path, "/lfw")
  _write(path, text + "Ann\t1\t2\n")
  with pytest.raises(ValueError, match="found 9 lines"):
    lists.parse_lfw_pairs(path, "/lfw")
  _write(path, "ten 300\n")
  with pytest.raises(ValueError, match=r"pairs\.txt:1: expected a header"):
    lists.parse_lfw_pairs(path, "/lfw")


def test_generic_and_numbered_pair_lists(tmp_path):
  path = _write(tmp_path / "agedb.txt",
                "00001.jpg 00002.jpg 1\n00003.jpg 00004.jpg -1\n"
                "a.jpg b.jpg same 3\nc.jpg d.jpg false\n")
  pairs, _ = lists.parse_pair_list(path, "/r")
  assert [(p.issame, p.fold) for p in pairs] == [(True, -1), (False, -1),
                                                  (True, 3), (False, -1)]
  assert pairs[0].path2 == "/r/00002.jpg"
  _write(path, "a.jpg b.jpg maybe\n")
  with pytest.raises(ValueError, match=r"agedb\.txt:1: same/different"):
    lists.parse_pair_list(path)
  lines = [f"{n} {n}_0.jpg {n}_1.jpg {int(n < 20)}" for n in range(40)]
  path = _write(tmp_path / "cacd_vs.txt", "\n".join(reversed(lines)))
  pairs, report = lists.parse_numbered_pairs(path, num_folds=10)
  assert report.num_ok == 40 and pairs[0].path1 == "0_0.jpg"
  folds = lists.pairs_to_arrays(pairs)["fold"]
  issame = lists.pairs_to_arrays(pairs)["issame"]
  for fold in range(10):
    in_fold = folds == fold
    assert issame[in_fold].sum() == 2 and (~issame[in_fold]).sum() == 2
  _write(path, "1 a b 1\n1 c d 0\n")
  with pytest.raises(ValueError,
                     match=r"cacd_vs\.txt:2: pair number 1 repeats"):
    lists.parse_numbered_pairs(path)


# ---------------------------------------------------- names and folders


def test_fgnet_and_utkface_names():
  assert lists.parse_fgnet_name("001A02.JPG") == (1, 2)
  assert lists.parse_fgnet_name("082A43a.JPG") == (82, 43)
  assert lists.parse_fgnet_name("/x/010a05b.jpg") == (10, 5)
  for bad in ("001B02.JPG", "A02.JPG", "001A.JPG", "001A02ab.JPG"):
    with pytest.raises(ValueError, match="malformed FG-NET name"):
      lists.parse_fgnet_name(bad)
  # UTKFace gender 0 = male -> SCAF 1; 1 = female -> 0.
  assert lists.parse_utkface_name(
      "26_0_2_20170116174525125.jpg.chip.jpg") == (26, 1, 2)
  assert lists.parse_utkface_name("9_1_0_20170109204617613.jpg") == (9, 0, 0)
  with pytest.raises(ValueError, match="malformed UTKFace name"):
    lists.parse_utkface_name("61_1_20170109142408075.jpg.chip.jpg")
  with pytest.raises(ValueError, match="gender 3"):
    lists.parse_utkface_name("26_3_2_20170116174525125.jpg.chip.jpg")
  with pytest.raises(ValueError, match="age 130"):
    lists.parse_utkface_name("130_0_2_20170116174525125.jpg.chip.jpg")


def test_label_folders(tmp_path):
  for name in ("bob/1.jpg", "bob/2.png", "ann/1.jpg", "ann/notes.txt"):
    _write(tmp_path / "ids" / name, "x")
  records, names, _ = lists.parse_identity_folders(tmp_path / "ids")
  assert names == ["ann", "bob"]
  assert [(Path(r.path).name, r.id) for r in records] == [
      ("1.jpg", 0), ("1.jpg", 1), ("2.png", 1)]
  _write(tmp_path / "ids" / "loose.jpg", "x")
  with pytest.raises(ValueError, match=r"loose\.jpg: image is not inside"):
    lists.parse_identity_folders(tmp_path / "ids")
  for name in ("7/a.jpg", "7/b.jpg", "35/c.jpg", "old/d.jpg", "200/e.jpg"):
    _write(tmp_path / "ages" / name, "x")
  with pytest.raises(ValueError, match=r"200[/\\]e\.jpg: bad age folder"):
    lists.parse_age_folders(tmp_path / "ages")
  records, report = lists.parse_age_folders(tmp_path / "ages",
                                            skip_bad_examples=True)
  assert sorted(r.age for r in records) == [7, 7, 35]
  assert report.num_skipped == 2 and report.reasons() == {"bad age folder": 2}
  for name in ("001A02.JPG", "001A10a.JPG", "002A05.JPG", "readme.jpg"):
    _write(tmp_path / "fgnet" / name, "x")
  records, report = lists.parse_fgnet_folder(tmp_path / "fgnet",
                                             skip_bad_examples=True)
  assert [(r.id, r.age) for r in records] == [(1, 2), (1, 10), (2, 5)]
  assert report.num_skipped == 1


# ---------------------------------------------------------------- images


def test_image_decoding_errors_and_conversions(tmp_path):
  jpeg = images.encode_jpeg(_image(0, 64))
  (tmp_path / "ok.jpg").write_bytes(jpeg)
  assert images.load_image(tmp_path / "ok.jpg").shape == (64, 64, 3)
  (tmp_path / "cut.jpg").write_bytes(jpeg[:len(jpeg) // 2])
  with pytest.raises(images.ImageDecodeError, match=r"cut\.jpg: cannot decode"):
    images.load_image(tmp_path / "cut.jpg")
  (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
  with pytest.raises(images.ImageDecodeError, match=r"junk\.jpg"):
    images.load_image(tmp_path / "junk.jpg")
  with pytest.raises(images.ImageDecodeError,
                     match=r"nope\.jpg: image file not"):
    images.load_image(tmp_path / "nope.jpg")
  gray = (np.arange(64 * 64) % 251).astype(np.uint8).reshape(64, 64)
  (tmp_path / "gray.png").write_bytes(images.encode_png(gray))
  rgb = images.load_image(tmp_path / "gray.png")
  assert rgb.shape == (64, 64, 3)
  np.testing.assert_array_equal(rgb[..., 0], gray)
  np.testing.assert_array_equal(rgb[..., 2], gray)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.fromarray((gray.astype(np.uint16) * 257)).save(tmp_path / "g16.png")
  np.testing.assert_array_equal(images.load_image(tmp_path / "g16.png")[..., 1],
                                gray)
  Image.fromarray(_image(1, 8)).convert("RGBA").save(tmp_path / "a.png")
  np.testing.assert_array_equal(images.load_image(tmp_path / "a.png"),
                                _image(1, 8))
  report = parse_report.ParseReport()
  assert images.load_image_or_skip(tmp_path / "cut.jpg", report) is None
  assert images.load_image_or_skip(tmp_path / "ok.jpg", report) is not None
  assert report.num_ok == 1 and report.num_skipped == 1


def test_lfw_crop_and_resize():
  image = np.zeros((250, 250, 3), np.uint8)
  image[61:189, 61:189] = 200  # The central 128x128 square.
  face = images.lfw_crop(image)
  assert face.shape == (112, 112, 3) and face.dtype == np.uint8
  assert face.min() == 200  # Exactly the central square, nothing outside.
  assert images.to_face(_image(0, 200)).shape == (112, 112, 3)
  with pytest.raises(ValueError, match="smaller than the crop"):
    images.center_crop_resize(image[:50, :50], 128)


# ------------------------------------------------ real data (../shared)


@pytest.mark.skipif(not (SHARED_DATA / "lfw" / "pairs.txt").is_file(),
                    reason="../shared/data/lfw not present")
def test_all_lfw_pairs_resolve_to_images():
  lfw = SHARED_DATA / "lfw"
  pairs, report = lists.parse_lfw_pairs(lfw / "pairs.txt", lfw / "images",
                                        check_files=True)
  assert len(pairs) == 6000 and report.num_skipped == 0
  arrays = lists.pairs_to_arrays(pairs)
  assert arrays["issame"].sum() == 3000
  assert np.bincount(arrays["fold"]).tolist() == [600] * 10
  face = images.lfw_crop(images.load_image(pairs[0].path1))
  assert face.shape == (112, 112, 3)


@pytest.mark.skipif(not (SHARED_DATA / "utkface" / "images").is_dir(),
                    reason="../shared/data/utkface not present")
def test_utkface_labels_and_malformed_names():
  folder = SHARED_DATA / "utkface" / "images"
  with pytest.raises(ValueError, match="malformed UTKFace name"):
    lists.parse_utkface_folder(folder)
  records, report = lists.parse_utkface_folder(folder, skip_bad_examples=True)
  assert len(records) == 9778 and report.num_ok == 9778
  assert report.num_skipped == 2
  assert sorted(Path(loc).name for loc, _ in report.skipped) == [
      "61_1_20170109142408075.jpg.chip.jpg",
      "61_3_20170109150557335.jpg.chip.jpg"]
  assert all("malformed UTKFace name" in r for _, r in report.skipped)
  arrays = lists.records_to_arrays(records)
  assert set(arrays["gender"].tolist()) == {0, 1}
  assert (arrays["id"] == -1).all() and arrays["age"].max() <= 116
  first = Path(records[0].path).name.split("_")
  assert arrays["gender"][0] == 1 - int(first[1])


# -------------------------------------------------- TFDS builders (tiny)


def _build(builder_cls, tmp_path, manual_dir, **kwargs):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = builder_cls(data_dir=tmp_path / "tfds", **kwargs)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  splits = {name: list(tfds.as_numpy(builder.as_dataset(split=name)))
            for name in builder.info.splits}
  return builder, splits


def _builders():
  """Imports the builders in ``data/`` (the repository root is no package)."""
  # tensorflow-datasets 4.9.x imports importlib_resources without declaring
  # it for Python >= 3.9 (tensorflow/datasets#11212).
  pytest.importorskip("importlib_resources")
  import sys  # pylint: disable=g-import-not-at-top
  repo = str(Path(__file__).resolve().parents[1])
  if repo not in sys.path:
    sys.path.insert(0, repo)
  from data import face_folder  # pylint: disable=g-import-not-at-top
  from data import face_pairs  # pylint: disable=g-import-not-at-top
  from data import insightface_rec  # pylint: disable=g-import-not-at-top
  from data import mtlface_list  # pylint: disable=g-import-not-at-top
  return mtlface_list, insightface_rec, face_folder, face_pairs


def test_tfds_builders_on_tiny_fixtures(tmp_path):
  mtlface_list, insightface_rec, face_folder, face_pairs = _builders()
  # mtlface_list: 3 good lines, a malformed one and a corrupt image.
  manual = tmp_path / "scaf"
  for i in range(4):
    _write(manual / "images" / "p" / f"{i}.jpg", "")
    (manual / "images" / "p" / f"{i}.jpg").write_bytes(
        images.encode_jpeg(_image(i, 112 if i else 140)))
  (manual / "images" / "p" / "3.jpg").write_bytes(b"\xff\xd8 corrupt")
  _write(manual / "train.txt", "4 p/0.jpg 20 1\n5 p/1.jpg 33 0\nbad line\n"
         "6 p/2.jpg 71 1\n7 p/3.jpg 40 0\n")
  with pytest.raises(ValueError, match=r"train\.txt:3: expected 4 fields"):
    _build(mtlface_list.Builder, tmp_path / "strict", manual)
  builder, splits = _build(mtlface_list.Builder, tmp_path, manual,
                           skip_bad_examples=True)
  train = splits["train"]
  assert sorted((e["id"], e["age"], e["gender"]) for e in train) == [
      (4, 20.0, 1), (5, 33.0, 0), (6, 71.0, 1)]
  assert all(e["image"].shape == (112, 112, 3) for e in train)
  assert builder.reports["train"].num_ok == 3
  assert builder.reports["train"].num_skipped == 2

  # insightface_rec joined with a SCAF list.
  rec_dir = tmp_path / "rec"
  rec_dir.mkdir()
  encoded = [images.encode_png(_image(i)) for i in range(3)]
  recordio.write_insightface_rec(rec_dir / "train.rec", [0, 0, 1], encoded)
  _write(rec_dir / "list.txt", "10 000000/00000002.jpg 44 0\n"
         "11 000001/00000003.jpg 9 1\n")
  _, splits = _build(insightface_rec.Builder, tmp_path, rec_dir)
  got = sorted((e["id"], e["age"], e["gender"], e["filename"])
               for e in splits["train"])
  assert got == [(10, 44.0, 0, b"000000/00000002.jpg"),
                 (11, 9.0, 1, b"000001/00000003.jpg")]
  by_id = {e["id"]: e["image"] for e in splits["train"]}
  assert np.abs(by_id[11].astype(int) - _image(2)).mean() < 3  # JPEG-close.

  # face_pairs from a .bin, one split per file.
  bin_dir = tmp_path / "bins"
  bin_dir.mkdir()
  binset.write_bin(bin_dir / "agedb_30.bin",
                   [images.encode_jpeg(_image(i)) for i in range(4)],
                   [True, False])
  _, splits = _build(face_pairs.Builder, tmp_path, bin_dir, config="bin")
  assert sorted(e["issame"] for e in splits["agedb_30"]) == [False, True]

  # face_folder, UTKFace names (gender flipped to 1 = male).
  utk = tmp_path / "utk"
  for name in ("30_0_1_2017.jpg.chip.jpg", "8_1_2_2017.jpg.chip.jpg",
               "61_1_2017.jpg.chip.jpg"):
    _write(utk / name, "")
    (utk / name).write_bytes(images.encode_jpeg(_image(1, 200)))
  builder, splits = _build(face_folder.Builder, tmp_path, utk,
                           config="utkface", skip_bad_examples=True)
  assert sorted((e["age"], e["gender"], e["id"]) for e in splits["train"]) == [
      (8.0, 0, -1), (30.0, 1, -1)]
  assert builder.reports["train"].num_skipped == 1
