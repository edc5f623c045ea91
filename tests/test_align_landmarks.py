"""Tests of 68-point landmarks, .pts files, name matching, the padded
detector retry and skipped.txt of mtlface_jax.align (issue 17)."""

from pathlib import Path
import tomllib

import numpy as np
import pytest
from PIL import Image

from mtlface_jax import align
from mtlface_jax.formats import images


def _similarity(angle: float, scale: float, shift) -> np.ndarray:
  cos, sin = np.cos(angle), np.sin(angle)
  return np.array([[scale * cos, -scale * sin, shift[0]],
                   [scale * sin, scale * cos, shift[1]], [0, 0, 1]])


def _blob_photo(size: int, points: np.ndarray, sigma: float = 3.0):
  """A black photo with a red Gaussian blob at each of ``points``."""
  ys, xs = np.mgrid[0:size, 0:size]
  red = np.zeros((size, size))
  for x, y in points:
    red = np.maximum(red, np.exp(-((xs - x)**2 + (ys - y)**2) / (2 * sigma**2)))
  image = np.zeros((size, size, 3), np.uint8)
  image[..., 0] = np.rint(255 * red)
  return image


def _blob_centres(face: np.ndarray, near: np.ndarray, radius: int = 8):
  red = face[..., 0].astype(np.float64)
  centres = []
  for x, y in np.rint(near).astype(int):
    window = red[y - radius:y + radius + 1, x - radius:x + radius + 1]
    ys, xs = np.mgrid[y - radius:y + radius + 1, x - radius:x + radius + 1]
    centres.append([(window * xs).sum() / window.sum(),
                    (window * ys).sum() / window.sum()])
  return np.array(centres)


def _five_points() -> np.ndarray:
  """Photo landmarks that a known similarity maps onto the template."""
  transform = _similarity(-0.2, 0.8, (5.0, -10.0))
  return align.apply_transform(np.linalg.inv(transform),
                               align.ARCFACE_TEMPLATE) + 30


def _sixty_eight(five: np.ndarray) -> np.ndarray:
  """68 iBUG points whose eye contours average to the eye centres."""
  points = np.tile(five.mean(0), (68, 1)) + np.arange(68)[:, None] * [0.1, 0]
  ring = np.array([[-3, 0], [-1, -1.5], [1, -1.5], [3, 0], [1, 1.5],
                   [-1, 1.5]])
  points[36:42] = five[0] + ring
  points[42:48] = five[1] + ring
  points[30], points[48], points[54] = five[2], five[3], five[4]
  return points


def _pts_text(points: np.ndarray) -> str:
  body = "\n".join(f"{x:.3f} {y:.3f}" for x, y in points)
  return f"version: 1\nn_points: {len(points)}\n{{\n{body}\n}}\n"


def test_reduce_68_to_5_uses_ibug_indices():
  five = _five_points()
  points = _sixty_eight(five)
  np.testing.assert_allclose(align.reduce_68_to_5(points), five, atol=1e-12)
  # A mirrored face (eyes listed right to left) is put back in image order.
  mirrored = points.copy()
  mirrored[36:42], mirrored[42:48] = points[42:48], points[36:42]
  mirrored[[48, 54]] = points[[54, 48]]
  np.testing.assert_allclose(align.reduce_68_to_5(mirrored), five, atol=1e-12)
  with pytest.raises(ValueError, match="68 finite"):
    align.reduce_68_to_5(points[:67])
  np.testing.assert_array_equal(align.to_five_points(five), five)
  with pytest.raises(ValueError, match="5 or 68"):
    align.to_five_points(points[:39])


def test_parse_pts_file(tmp_path):
  points = _sixty_eight(_five_points())
  path = tmp_path / "001a02.pts"
  path.write_text(_pts_text(points))
  np.testing.assert_allclose(align.parse_pts_file(path), points, atol=1e-3)
  lines = _pts_text(points).splitlines()
  lines[5] = "12.5 oops"
  path.write_text("\n".join(lines))
  with pytest.raises(ValueError, match=r"001a02\.pts:6: expected 'x y'"):
    align.parse_pts_file(path)
  path.write_text("\n".join(_pts_text(points).splitlines()[:-1]))
  with pytest.raises(ValueError, match=r"001a02\.pts: expected '\{', 68"):
    align.parse_pts_file(path)
  path.write_text("version: 1\n{\n1 2\n}\n")
  with pytest.raises(ValueError, match="n_points"):
    align.parse_pts_file(path)
  path.write_text("version 1\n")
  with pytest.raises(ValueError, match=r"001a02\.pts:1: expected 'key: value'"):
    align.parse_pts_file(path)


def test_landmark_file_with_68_points(tmp_path):
  five = _five_points()
  coords = " ".join(f"{v:.4f}" for v in _sixty_eight(five).ravel())
  path = tmp_path / "landmarks.txt"
  path.write_text(f"dir/with space.jpg {coords}\nb.jpg "
                  + " ".join(f"{v:.4f}" for v in five.ravel()) + "\n")
  landmarks = align.parse_landmark_file(path)
  np.testing.assert_allclose(landmarks["dir/with space.jpg"], five, atol=1e-4)
  np.testing.assert_allclose(landmarks["b.jpg"], five, atol=1e-4)


def _fgnet_folder(tmp_path: Path, pts_beside: bool = True):
  """FG-NET-like photos: upper-case images, lower-case 68-point .pts."""
  raw = tmp_path / "fgnet" / "images"
  raw.mkdir(parents=True)
  five = _five_points()
  pts_dir = raw if pts_beside else tmp_path / "fgnet" / "points"
  pts_dir.mkdir(parents=True, exist_ok=True)
  for name in ("001A02", "001A10a"):
    Image.fromarray(_blob_photo(220, five)).save(raw / f"{name}.JPG",
                                                 quality=95)
    (pts_dir / f"{name.lower()}.pts").write_text(_pts_text(_sixty_eight(five)))
  Image.fromarray(_blob_photo(220, five)).save(raw / "002A05.JPG", quality=95)
  return raw, pts_dir


def _assert_aligned(path: Path):
  face = images.load_image(path)
  assert face.shape == (112, 112, 3)
  np.testing.assert_allclose(_blob_centres(face, align.ARCFACE_TEMPLATE),
                             align.ARCFACE_TEMPLATE, atol=0.3)


def test_cli_finds_pts_beside_images(tmp_path, capsys):
  raw, _ = _fgnet_folder(tmp_path)
  out = tmp_path / "aligned"
  argv = ["--input", str(raw), "--output", str(out), "--no-progress"]
  assert align.main(argv) == 1  # 002A05.JPG has no .pts: a strict run stops.
  assert "002A05.JPG: no .pts landmark file" in capsys.readouterr().err
  assert align.main(argv + ["--skip-bad-examples"]) == 0
  printed = capsys.readouterr().out
  assert "using the .pts landmark files" in printed
  assert "2 ok, 1 skipped" in printed
  _assert_aligned(out / "001A02.JPG")
  _assert_aligned(out / "001A10a.JPG")
  assert (out / "skipped.txt").read_text() == (
      "002A05.JPG\tno .pts landmark file for it\n")


def test_cli_landmarks_dir_flag(tmp_path):
  raw, pts_dir = _fgnet_folder(tmp_path, pts_beside=False)
  out = tmp_path / "aligned"
  (out).mkdir()
  (out / "skipped.txt").write_text("stale\n")
  (raw / "002A05.JPG").unlink()
  assert align.main(["--input", str(raw), "--output", str(out),
                     "--landmarks_dir", str(pts_dir), "--no-progress"]) == 0
  _assert_aligned(out / "001A10a.JPG")
  assert not (out / "skipped.txt").exists()  # Nothing skipped this time.


def test_landmark_list_names_match_ignoring_case(tmp_path):
  raw = tmp_path / "raw"
  (raw / "Sub").mkdir(parents=True)
  five = _five_points()
  for name in ("A.png", "b.jpg"):
    Image.fromarray(_blob_photo(220, five)).save(raw / "Sub" / name)
  landmarks = {"sub/a.PNG": five, "SUB/B": five, "sub/missing.jpg": five}
  out = tmp_path / "out"
  with pytest.raises(ValueError, match=r"missing\.jpg: no image file"):
    align.align_directory(raw, out, landmarks=landmarks, progress=False)
  report = align.align_directory(raw, out, landmarks=landmarks, progress=False,
                                 skip_bad_examples=True)
  assert report.num_ok == 2 and report.num_skipped == 1
  _assert_aligned(out / "Sub" / "A.png")  # Written under the file's own name.
  _assert_aligned(out / "Sub" / "b.jpg")
  assert (out / "skipped.txt").read_text().startswith("sub/missing.jpg\t")
  # Two spellings of one image are refused rather than aligned twice.
  with pytest.raises(ValueError, match="names the same image"):
    align.align_directory(raw, out, landmarks={"Sub/A.png": five,
                                               "sub/a.png": five},
                          progress=False)
  index = align.NameIndex(["x/A.jpg", "x/a.JPG"])
  assert index.find("x/A.jpg") == "x/A.jpg"
  with pytest.raises(ValueError, match="several files"):
    index.find("X/A.JPG")


# ------------------------------------------------- detectors and retries


def _square_detector(image: np.ndarray) -> np.ndarray:
  """A stand-in detector: the bright square is the face.

  Like real detectors on tight crops, it finds nothing when the face
  touches the image border. Landmarks are fixed fractions of the square's
  extent (pixel-centre convention).
  """
  bright = image[..., 1] > 135  # Half way between face and background.
  if not bright.any():
    raise align.NoFaceError("no face detected")
  rows, cols = np.flatnonzero(bright.any(1)), np.flatnonzero(bright.any(0))
  if (rows[0] == 0 or cols[0] == 0 or rows[-1] == image.shape[0] - 1 or
      cols[-1] == image.shape[1] - 1):
    raise align.NoFaceError("no face detected")
  return _square_landmarks(cols[0] - 0.5, rows[0] - 0.5,
                           cols[-1] + 0.5, rows[-1] + 0.5)


def _square_landmarks(x0, y0, x1, y1) -> np.ndarray:
  fractions = align.ARCFACE_TEMPLATE / 112.0
  return np.stack([x0 + fractions[:, 0] * (x1 - x0),
                   y0 + fractions[:, 1] * (y1 - y0)], axis=1)


def _tight_crop() -> np.ndarray:
  image = np.full((200, 200, 3), 30, np.uint8)
  image[0:40, 80:120] = 240  # The face touches the top edge.
  return image


@pytest.mark.parametrize("min_side", [0, 600])
def test_padded_retry_maps_landmarks_back(min_side):
  image = _tight_crop()
  with pytest.raises(align.NoFaceError):
    _square_detector(image)
  retry = align.PaddedRetry(_square_detector, margin=0.25, min_side=min_side)
  points = retry(image)
  # Exact with the pixel-centre convention, also through a x2 upscale (its
  # pixels straddle each edge symmetrically).
  expected = _square_landmarks(79.5, -0.5, 119.5, 39.5)
  np.testing.assert_allclose(points, expected, atol=0.02)
  assert (retry.num_retried, retry.num_rescued) == (1, 1)
  padded, border, scale = align.pad_for_detection(image, 0.25, min_side)
  assert border == 50 and padded.shape[0] == max(300, min_side)
  assert scale == (1.0 if not min_side else 2.0)
  blank = np.full((60, 60, 3), 30, np.uint8)
  with pytest.raises(align.NoFaceError, match="also after padding by 15 px"):
    retry(blank)


def test_cli_retry_and_skipped_file_lists_every_miss(tmp_path, monkeypatch,
                                                      capsys):
  monkeypatch.setattr(align, "make_detector", lambda name: _square_detector)
  raw = tmp_path / "raw"
  raw.mkdir()
  Image.fromarray(_tight_crop()).save(raw / "tight.png")
  blanks = [f"blank{i:02d}.png" for i in range(13)]
  for name in blanks:
    Image.fromarray(np.full((60, 60, 3), 30, np.uint8)).save(raw / name)
  out = tmp_path / "out"
  argv = ["--input", str(raw), "--output", str(out), "--no-progress",
          "--skip-bad-examples"]
  assert align.main(argv) == 0
  printed = capsys.readouterr().out
  assert "0 ok, 14 skipped" in printed and "and 4 more" in printed
  listed = (out / "skipped.txt").read_text().splitlines()
  assert [l.split("\t")[0] for l in listed] == blanks + ["tight.png"]
  assert all(l.endswith("\tno face detected") for l in listed)
  assert align.main(argv + ["--pad-retry", "0.25"]) == 0
  printed = capsys.readouterr().out
  assert "1 ok, 13 skipped" in printed
  assert "padded retry found a face in 1 of 14 images" in printed
  assert len((out / "skipped.txt").read_text().splitlines()) == 13
  assert (out / "tight.png").is_file()
  assert align.main(argv + ["--pad-retry", "0.25", "--lfw-crop"]) == 1
  assert "--pad-retry applies to a detector" in capsys.readouterr().err


def test_align_extra_declares_the_detector_packages():
  pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
  extras = tomllib.loads(pyproject.read_text())["project"][
      "optional-dependencies"]
  names = {r.split(">")[0].split("=")[0] for r in extras["align"]}
  # The packages whose imports MtcnnDetector and DlibDetector need.
  assert names == {"mtcnn", "dlib-bin", "face-recognition-models"}
