"""Tests of the 5-point alignment: transform math, warping and the CLI."""

import sys

import numpy as np
import pytest
from PIL import Image

from mtlface_jax import align
from mtlface_jax.formats import images


def _similarity(angle: float, scale: float, shift) -> np.ndarray:
  cos, sin = np.cos(angle), np.sin(angle)
  return np.array([[scale * cos, -scale * sin, shift[0]],
                   [scale * sin, scale * cos, shift[1]], [0, 0, 1]])


def _landmarks_for(transform: np.ndarray) -> np.ndarray:
  """Photo landmarks that ``transform`` maps exactly onto the template."""
  return align.apply_transform(np.linalg.inv(transform), align.ARCFACE_TEMPLATE)


def _blob_image(size: int, points: np.ndarray, sigma: float) -> np.ndarray:
  """Black image with a Gaussian blob (red channel) at each point."""
  ys, xs = np.mgrid[0:size, 0:size]
  red = np.zeros((size, size))
  for x, y in points:
    red = np.maximum(red, np.exp(-((xs - x)**2 + (ys - y)**2) / (2 * sigma**2)))
  image = np.zeros((size, size, 3), np.uint8)
  image[..., 0] = np.rint(255 * red)
  return image


def _blob_centres(face: np.ndarray, near: np.ndarray, radius: int = 8):
  """Intensity centroids of the red channel around each of ``near``."""
  red = face[..., 0].astype(np.float64)
  centres = []
  for x, y in np.rint(near).astype(int):
    window = red[y - radius:y + radius + 1, x - radius:x + radius + 1]
    ys, xs = np.mgrid[y - radius:y + radius + 1, x - radius:x + radius + 1]
    centres.append([(window * xs).sum() / window.sum(),
                    (window * ys).sum() / window.sum()])
  return np.array(centres)


@pytest.mark.parametrize("angle,scale", [(0.3, 1.7), (-2.5, 0.05), (1.0, 40.0)])
def test_umeyama_recovers_known_similarity(angle, scale):
  rng = np.random.default_rng(0)
  src = rng.uniform(-100, 300, size=(7, 2))
  expected = _similarity(angle, scale, (12.5, -40.0))
  estimated = align.umeyama(src, align.apply_transform(expected, src))
  np.testing.assert_allclose(estimated, expected, atol=1e-9 * max(scale, 1))


def test_umeyama_rigid_reflection_and_degenerate():
  src = np.array([[0.0, 0], [4, 0], [0, 2], [3, 5]])
  rigid = _similarity(0.7, 1.0, (3, 4))
  estimated = align.umeyama(src, align.apply_transform(rigid, src),
                            estimate_scale=False)
  np.testing.assert_allclose(estimated, rigid, atol=1e-12)
  # A mirrored point set is fitted by a proper rotation, never a reflection.
  mirrored = align.umeyama(src, src * [-1, 1])
  assert np.linalg.det(mirrored[:2, :2]) > 0
  with pytest.raises(ValueError, match="coincide"):
    align.umeyama(np.ones((5, 2)), align.ARCFACE_TEMPLATE)
  with pytest.raises(ValueError, match="matching"):
    align.umeyama(src, src[:3])


@pytest.mark.parametrize("scale", [1.0, 0.4, 0.12, 2.5])
def test_warped_landmarks_land_on_template(scale):
  # scale < 0.5 exercises the antialiased pre-shrink.
  transform = _similarity(0.35, scale, (-20.0, 15.0))
  sigma = 2.5 / scale
  points = _landmarks_for(transform)
  points += 6 * sigma - points.min(axis=0)  # Blobs wholly inside the photo.
  size = int(points.max() + 6 * sigma)
  photo = _blob_image(size, points, sigma)
  face = align.align_face(photo, points)
  assert face.shape == (112, 112, 3) and face.dtype == np.uint8
  centres = _blob_centres(face, align.ARCFACE_TEMPLATE)
  np.testing.assert_allclose(centres, align.ARCFACE_TEMPLATE, atol=0.05)


def test_parse_landmark_file(tmp_path):
  path = tmp_path / "landmarks.txt"
  path.write_text("dir/with space.jpg 1 2 3 4 5 6 7 8 9 10\n\n"
                  "b.png 1.5 2 3 4 5 6 7 8 9 10.25\n")
  landmarks = align.parse_landmark_file(path)
  assert list(landmarks) == ["dir/with space.jpg", "b.png"]
  np.testing.assert_array_equal(landmarks["b.png"][4], [9, 10.25])
  path.write_text("a.jpg 1 2 3 4 5 6 7 8 9 10\na.jpg 1 2 3 4 5 6 7 8 9 x\n")
  with pytest.raises(ValueError, match=r"landmarks\.txt:2: could not convert"):
    align.parse_landmark_file(path)
  path.write_text("a.jpg 1 2 3\n")
  with pytest.raises(ValueError, match=r"landmarks\.txt:1: expected"):
    align.parse_landmark_file(path)
  path.write_text("a.jpg 1 2 3 4 5 6 7 8 9 10\na.jpg 1 2 3 4 5 6 7 8 9 10\n")
  with pytest.raises(ValueError, match=r"landmarks\.txt:2: duplicate"):
    align.parse_landmark_file(path)
  path.write_text("../escape.jpg 1 2 3 4 5 6 7 8 9 10\n")
  with pytest.raises(ValueError, match=r"landmarks\.txt:1: path .* relative"):
    align.parse_landmark_file(path)


def _photo_fixture(tmp_path):
  """A raw folder with one good photo, one corrupt one and a landmark file."""
  raw = tmp_path / "raw"
  (raw / "sub").mkdir(parents=True)
  transform = _similarity(-0.2, 0.8, (5.0, -10.0))
  points = _landmarks_for(transform) + 30
  Image.fromarray(_blob_image(220, points, 3.0)).save(raw / "sub" / "a.png")
  (raw / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
  coords = " ".join(f"{v:.4f}" for v in points.ravel())
  landmark_file = tmp_path / "landmarks.txt"
  landmark_file.write_text(f"sub/a.png {coords}\nbad.jpg {coords}\n")
  return raw, landmark_file


def test_cli_with_landmark_file(tmp_path, capsys):
  raw, landmark_file = _photo_fixture(tmp_path)
  out = tmp_path / "aligned"
  argv = ["--input", str(raw), "--output", str(out), "--landmarks",
          str(landmark_file), "--no-progress"]
  assert align.main(argv) == 1  # The corrupt photo stops a strict run.
  assert "bad.jpg" in capsys.readouterr().err
  assert align.main(argv + ["--skip-bad-examples"]) == 0
  assert "1 ok, 1 skipped" in capsys.readouterr().out
  face = images.load_image(out / "sub" / "a.png")
  assert face.shape == (112, 112, 3)
  np.testing.assert_allclose(_blob_centres(face, align.ARCFACE_TEMPLATE),
                             align.ARCFACE_TEMPLATE, atol=0.1)


def test_cli_lfw_crop(tmp_path):
  raw = tmp_path / "lfw" / "Ann"
  raw.mkdir(parents=True)
  image = np.zeros((250, 250, 3), np.uint8)
  image[61:189, 61:189] = 180
  Image.fromarray(image).save(raw / "Ann_0001.png")
  out = tmp_path / "out"
  assert align.main(["--input", str(tmp_path / "lfw"), "--output", str(out),
                     "--lfw-crop", "--no-progress"]) == 0
  face = images.load_image(out / "Ann" / "Ann_0001.png")
  assert face.shape == (112, 112, 3) and face.min() == 180


def test_missing_detector_package_is_a_clear_error(monkeypatch):
  # None in sys.modules makes `import mtcnn` raise ImportError.
  monkeypatch.setitem(sys.modules, "mtcnn", None)
  monkeypatch.setitem(sys.modules, "dlib", None)
  with pytest.raises(ImportError, match="pip install mtcnn"):
    align.make_detector("mtcnn")
  with pytest.raises(ImportError, match="pip install dlib-bin"):
    align.make_detector("dlib")
  with pytest.raises(ImportError, match="--landmarks"):
    align.make_detector("auto")
