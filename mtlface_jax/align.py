"""5-point face alignment to the 112x112 ArcFace template, and the LFW crop.

Usage::

  python -m mtlface_jax.align --input RAW_DIR --output ALIGNED_DIR \\
      [--landmarks FILE | --landmarks-dir PTS_DIR | --lfw-crop |
       --detector {auto,mtcnn,dlib} [--pad-retry 0.3]] [--skip-bad-examples]

Landmarks come from

* a file with lines ``relative/path x1 y1 ... x5 y5`` (left eye, right eye,
  nose tip, left and right mouth corner, in the image's left/right) or
  ``relative/path x1 y1 ... x68 y68`` (the 68 iBUG points);
* iBUG ``.pts`` files (FG-NET ships them: ``version: 1``, ``n_points: 68``,
  ``{``, one ``x y`` line per point, ``}``), in ``--landmarks-dir`` or, with
  no landmark option, found beside the images;
* or an optional detector: the ``mtcnn`` package (TensorFlow, weights inside
  the wheel) or ``dlib-bin`` with ``face-recognition-models`` (both on PyPI,
  offline after install: ``pip install mtlface-jax[align]``). Neither is a
  dependency of this package; a clear error says what to install when one is
  asked for. ``--pad-retry`` retries images where no face was found on a
  padded copy (tight crops give a detector no context).

68 points are reduced to the five (:func:`reduce_68_to_5`). Landmark names
match image files case-insensitively (FG-NET's ``001A02.JPG`` and
``001a02.pts``). With ``--skip-bad-examples`` every image that could not be
aligned is listed with its reason in ``<output>/skipped.txt``.

The similarity transform (rotation, uniform scale, translation) that maps
the five landmarks onto the template is estimated by Umeyama's least-squares
method, and the image is warped with bilinear sampling in NumPy, using the
convention that integer coordinates are pixel centres (as OpenCV does).
"""

import argparse
import collections
import importlib.util
import os
from pathlib import Path
import sys
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from mtlface_jax.formats import images as images_lib
from mtlface_jax.formats import lists as lists_lib
from mtlface_jax.formats import parse_report

# insightface's 112x112 ArcFace template: left eye, right eye, nose tip, left
# and right mouth corner, in (x, y) pixels.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
     [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)
FACE_SIZE = images_lib.FACE_SIZE

Landmarks = np.ndarray  # [5, 2] float (x, y).
SKIPPED_FILE = "skipped.txt"
# 0-based iBUG 68-point indices: eye contours, nose tip, mouth corners.
IBUG_LEFT_EYE = tuple(range(36, 42))
IBUG_RIGHT_EYE = tuple(range(42, 48))
IBUG_NOSE_TIP = 30
IBUG_MOUTH_CORNERS = (48, 54)


class NoFaceError(ValueError):
  """No face (or no landmarks) could be found for an image."""


def umeyama(src: np.ndarray, dst: np.ndarray,
            estimate_scale: bool = True) -> np.ndarray:
  """Least-squares similarity transform mapping ``src`` points onto ``dst``.

  Umeyama, "Least-squares estimation of transformation parameters between two
  point patterns", TPAMI 1991.

  Args:
    src: ``[N, D]`` source points.
    dst: ``[N, D]`` destination points.
    estimate_scale: if False, a rigid transform (scale 1).

  Returns:
    ``[D+1, D+1]`` homogeneous matrix ``T`` with ``dst ~ T @ [src; 1]``.

  Raises:
    ValueError: for mismatched shapes or degenerate (coincident) points.
  """
  src = np.asarray(src, dtype=np.float64)
  dst = np.asarray(dst, dtype=np.float64)
  if src.shape != dst.shape or src.ndim != 2 or src.shape[0] < 2:
    raise ValueError(f"need matching [N, D] point sets, got {src.shape} and "
                     f"{dst.shape}")
  num, dim = src.shape
  src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
  src_c, dst_c = src - src_mean, dst - dst_mean
  src_var = (src_c**2).sum() / num
  if src_var < 1e-12:
    raise ValueError("source points coincide; no transform is defined")
  covariance = dst_c.T @ src_c / num
  u, singular, vt = np.linalg.svd(covariance)
  signs = np.ones(dim)
  if np.linalg.det(covariance) < 0:
    signs[-1] = -1
  if np.linalg.matrix_rank(covariance) == dim - 1:
    # One direction is undetermined; choose the proper rotation (det +1).
    signs[-1] = 1 if np.linalg.det(u) * np.linalg.det(vt) > 0 else -1
  rotation = u @ np.diag(signs) @ vt
  scale = (singular @ signs) / src_var if estimate_scale else 1.0
  transform = np.eye(dim + 1)
  transform[:dim, :dim] = scale * rotation
  transform[:dim, dim] = dst_mean - scale * rotation @ src_mean
  return transform


def apply_transform(transform: np.ndarray, points: np.ndarray) -> np.ndarray:
  """Applies a ``[3, 3]`` (or ``[2, 3]``) transform to ``[N, 2]`` points."""
  points = np.asarray(points, dtype=np.float64)
  return points @ transform[:2, :2].T + transform[:2, 2]


def _bilinear_sample(image: np.ndarray, x: np.ndarray,
                     y: np.ndarray) -> np.ndarray:
  """Samples ``image`` at float pixel coordinates; black outside the image."""
  height, width = image.shape[:2]
  x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
  fx, fy = (x - x0)[..., None], (y - y0)[..., None]
  padded = np.pad(image.astype(np.float32), ((1, 1), (1, 1), (0, 0)))
  # Indices into the zero-padded image; anything beyond lands on padding.
  xi = np.clip(x0 + 1, 0, width + 1)
  yi = np.clip(y0 + 1, 0, height + 1)
  xj = np.clip(x0 + 2, 0, width + 1)
  yj = np.clip(y0 + 2, 0, height + 1)
  top = padded[yi, xi] * (1 - fx) + padded[yi, xj] * fx
  bottom = padded[yj, xi] * (1 - fx) + padded[yj, xj] * fx
  return top * (1 - fy) + bottom * fy


def warp_similarity(image: np.ndarray, transform: np.ndarray,
                    size: int = FACE_SIZE) -> np.ndarray:
  """Warps ``image`` so that source point ``p`` lands at ``transform @ p``.

  A strong reduction is first done by an antialiased resize, so that
  downscaling a large photo does not alias.

  Args:
    image: ``[H, W, 3]`` uint8.
    transform: ``[3, 3]`` homogeneous source-to-output transform.
    size: output side.

  Returns:
    ``[size, size, 3]`` uint8.
  """
  scale = np.sqrt(abs(np.linalg.det(transform[:2, :2])))
  if scale < 0.5:
    image, transform = _prescale(image, transform, 2 * scale)
  inverse = np.linalg.inv(transform)
  ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
  src_x = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
  src_y = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
  warped = _bilinear_sample(image, src_x, src_y)
  return np.clip(np.rint(warped), 0, 255).astype(np.uint8)


def _prescale(image: np.ndarray, transform: np.ndarray,
              factor: float) -> tuple[np.ndarray, np.ndarray]:
  """Shrinks ``image`` by ``factor`` and adapts ``transform`` to match."""
  height, width = image.shape[:2]
  new_w, new_h = max(1, round(width * factor)), max(1, round(height * factor))
  small = np.asarray(Image.fromarray(image).resize((new_w, new_h),
                                                   Image.LANCZOS))
  kx, ky = new_w / width, new_h / height
  # Pixel-centre convention: x_small + 0.5 = (x + 0.5) * k.
  to_small = np.array([[kx, 0, 0.5 * kx - 0.5], [0, ky, 0.5 * ky - 0.5],
                       [0, 0, 1]])
  return small, transform @ np.linalg.inv(to_small)


def align_face(image: np.ndarray, landmarks: Landmarks,
               size: int = FACE_SIZE) -> np.ndarray:
  """Aligns a face to the ArcFace template from its five landmarks.

  Args:
    image: ``[H, W, 3]`` uint8.
    landmarks: ``[5, 2]`` (x, y): left eye, right eye, nose, left and right
      mouth corner.
    size: output side; the template is scaled by ``size / 112``.

  Returns:
    ``[size, size, 3]`` uint8 aligned face.
  """
  landmarks = np.asarray(landmarks, dtype=np.float64)
  if landmarks.shape != (5, 2) or not np.all(np.isfinite(landmarks)):
    raise ValueError(f"need 5 finite (x, y) landmarks, got {landmarks.shape}")
  template = ARCFACE_TEMPLATE * (size / FACE_SIZE)
  return warp_similarity(image, umeyama(landmarks, template), size)


def reduce_68_to_5(points: np.ndarray) -> Landmarks:
  """The five ArcFace points from 68 iBUG landmarks.

  Eye centres are the means of the eye contours (0-based points 36-41 and
  42-47), the nose tip is point 30, the mouth corners points 48 and 54; eyes
  and mouth corners are then ordered by image x.

  Args:
    points: ``[68, 2]`` (x, y), 0-based iBUG order (dlib's, FG-NET's
      ``.pts``).

  Returns:
    ``[5, 2]`` landmarks.

  Raises:
    ValueError: for another shape or non-finite values.
  """
  points = np.asarray(points, dtype=np.float64)
  if points.shape != (68, 2) or not np.all(np.isfinite(points)):
    raise ValueError(f"need 68 finite (x, y) points, got shape {points.shape}")
  five = [points[list(IBUG_LEFT_EYE)].mean(0),
          points[list(IBUG_RIGHT_EYE)].mean(0), points[IBUG_NOSE_TIP],
          points[IBUG_MOUTH_CORNERS[0]], points[IBUG_MOUTH_CORNERS[1]]]
  return _order_left_right(five)


def to_five_points(points: np.ndarray) -> Landmarks:
  """``[5, 2]`` landmarks from 5 points (kept as given) or 68 (reduced)."""
  points = np.asarray(points, dtype=np.float64)
  if points.shape == (68, 2):
    return reduce_68_to_5(points)
  if points.shape != (5, 2):
    raise ValueError(f"need 5 or 68 (x, y) landmarks, got {len(points)}")
  if not np.all(np.isfinite(points)):
    raise ValueError("landmarks must be finite numbers")
  return points


def parse_pts_file(path: str | os.PathLike) -> np.ndarray:
  """Reads an iBUG/FG-NET ``.pts`` landmark file.

  The layout: header lines ``key: value`` (``version: 1``,
  ``n_points: 68``), a line ``{``, ``n_points`` lines ``x y``, a line ``}``.

  Args:
    path: the ``.pts`` file.

  Returns:
    ``[n_points, 2]`` float64 (x, y), in file order.

  Raises:
    ValueError: naming ``path:line`` for a malformed file.
  """
  lines = [(n, l.strip()) for n, l in enumerate(
      Path(path).read_text(encoding="utf-8", errors="replace").splitlines(), 1)
           if l.strip()]
  header, position = {}, 0
  while position < len(lines) and lines[position][1] != "{":
    line_no, text = lines[position]
    key, colon, value = text.partition(":")
    if not colon:
      raise ValueError(f"{path}:{line_no}: expected 'key: value' or '{{', "
                       f"got {text!r}")
    header[key.strip().lower()] = value.strip()
    position += 1
  try:
    count = int(header["n_points"])
  except (KeyError, ValueError):
    raise ValueError(f"{path}: no 'n_points: N' line before '{{'") from None
  body = lines[position + 1:position + 1 + count]
  closing = lines[position + 1 + count:position + 2 + count]
  if position == len(lines) or len(body) < count or not closing or (
      closing[0][1] != "}"):
    raise ValueError(f"{path}: expected '{{', {count} 'x y' lines and '}}'")
  points = []
  for line_no, text in body:
    try:
      x, y = (float(v) for v in text.split())
      if not np.isfinite(x) or not np.isfinite(y):
        raise ValueError
    except ValueError:
      raise ValueError(f"{path}:{line_no}: expected 'x y', got {text!r}"
                       ) from None
    points.append((x, y))
  return np.array(points, dtype=np.float64)


def parse_landmark_file(path: str | os.PathLike) -> dict[str, Landmarks]:
  """Reads lines ``relative/path x1 y1 ... x5 y5`` (or ``... x68 y68``).

  The path may contain spaces (the last 10 or 136 fields are the numbers).
  A line of 68 points (iBUG order) is reduced to the five
  (:func:`reduce_68_to_5`).

  Args:
    path: the landmark file.

  Returns:
    Mapping from relative path to ``[5, 2]`` landmarks, in file order.

  Raises:
    ValueError: naming ``path:line`` for a malformed or duplicate line.
  """
  landmarks = {}
  text = Path(path).read_text(encoding="utf-8")
  for line_no, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    num_values = 136 if len(line.split()) >= 137 else 10
    fields = line.rsplit(maxsplit=num_values)
    try:
      if len(fields) != num_values + 1:
        raise ValueError(f"expected 'path x1 y1 ... x5 y5' (or 68 points), "
                         f"got {len(fields)} fields")
      points = to_five_points(
          np.array([float(v) for v in fields[1:]]).reshape(-1, 2))
    except ValueError as e:
      raise ValueError(f"{path}:{line_no}: {e}") from None
    name = fields[0].strip()
    if Path(name).is_absolute() or ".." in Path(name).parts:
      # The name is reused under --output; it must not escape that folder.
      raise ValueError(f"{path}:{line_no}: path {name!r} must be relative and "
                       "stay inside the input folder")
    if name in landmarks:
      raise ValueError(f"{path}:{line_no}: duplicate entry for {name!r}")
    landmarks[name] = points
  return landmarks


def list_images(root: str | os.PathLike) -> list[str]:
  """Relative POSIX paths of every image below ``root``, sorted."""
  root = Path(root)
  extensions = lists_lib.IMAGE_EXTENSIONS
  return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                if p.is_file() and p.name.lower().endswith(extensions))


class NameIndex:
  """Finds files by relative path, ignoring case (and, if asked, extension).

  Landmark lists and ``.pts`` files often spell names differently from the
  images (``001A02.JPG`` vs ``001a02.pts``); an exact match wins, then a
  unique case-insensitive one. Two files that differ only in case make a
  name ambiguous, which is an error rather than a guess.
  """

  def __init__(self, names: Sequence[str]):
    """Indexes relative POSIX ``names``."""
    self._exact = set(names)
    self._by_lower: dict[str, list[str]] = {}
    self._by_stem: dict[str, list[str]] = {}
    for name in names:
      self._by_lower.setdefault(name.lower(), []).append(name)
      self._by_stem.setdefault(_stem(name).lower(), []).append(name)

  def find(self, name: str, any_extension: bool = False) -> str | None:
    """The indexed name matching ``name``, or None.

    Args:
      name: a relative path (``\\`` or ``/`` separated).
      any_extension: also match the same path with another extension (a
        ``.pts`` file for its image, a list entry given without one).

    Raises:
      ValueError: when several indexed names match equally.
    """
    name = name.replace("\\", "/")
    if name in self._exact:
      return name
    found = self._by_lower.get(name.lower(), [])
    if not found and any_extension:
      found = self._by_stem.get(_stem(name).lower(), [])
    if len(found) > 1:
      raise ValueError(f"{name!r} matches several files: {sorted(found)}")
    return found[0] if found else None


def _stem(name: str) -> str:
  """The relative path without its extension."""
  suffix = Path(name).suffix
  return name[:-len(suffix)] if suffix else name


def find_pts_files(image_names: Sequence[str], pts_root: str | os.PathLike
                   ) -> dict[str, Path]:
  """Pairs images with the ``.pts`` files that describe them.

  A ``.pts`` matches an image with the same relative path up to case and
  extension (``sub/001A02.JPG`` and ``sub/001a02.pts``), or, for a flat
  folder of landmarks, with the same file name stem when that is unique.

  Args:
    image_names: relative image paths.
    pts_root: the folder holding the ``.pts`` files (may be the image
      folder itself).

  Returns:
    Image name -> its ``.pts`` path, for the images that have one.
  """
  pts_root = Path(pts_root)
  pts = sorted(p.relative_to(pts_root).as_posix() for p in pts_root.rglob("*")
               if p.is_file() and p.suffix.lower() == ".pts")
  by_path = NameIndex(pts)
  # The flat fallback only for file names that occur once in the tree.
  files = collections.Counter(Path(p).name.lower() for p in pts)
  file_to_path = {Path(p).name: p for p in pts
                  if files[Path(p).name.lower()] == 1}
  by_file = NameIndex(list(file_to_path))
  found = {}
  for image in image_names:
    match = by_path.find(_stem(image) + ".pts")
    if match is None:
      name = by_file.find(Path(_stem(image)).name + ".pts")
      match = file_to_path[name] if name is not None else None
    if match is not None:
      found[image] = pts_root / match
  return found


def _order_left_right(points: np.ndarray) -> np.ndarray:
  """Orders eyes and mouth corners by image x (detectors differ on this)."""
  points = np.array(points, dtype=np.float64)
  for a, b in ((0, 1), (3, 4)):
    if points[a, 0] > points[b, 0]:
      points[[a, b]] = points[[b, a]]
  return points


class MtcnnDetector:
  """5-point landmarks from the ``mtcnn`` package (TensorFlow)."""

  def __init__(self, min_confidence: float = 0.9):
    try:
      from mtcnn import MTCNN  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(
          "the mtcnn detector needs the optional 'mtcnn' package: "
          "pip install mtcnn (it uses the installed TensorFlow), or "
          f"pip install 'mtlface-jax[align]' for every detector ({e})") from e
    self._model = MTCNN()
    self._min_confidence = min_confidence

  def __call__(self, image: np.ndarray) -> Landmarks:
    faces = [f for f in self._model.detect_faces(image)
             if f.get("confidence", 0.0) >= self._min_confidence]
    self.num_faces = len(faces)  # The largest is used; callers may refuse several.
    if not faces:
      raise NoFaceError("no face detected")
    face = max(faces, key=lambda f: f["box"][2] * f["box"][3])
    keys = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
    return _order_left_right([face["keypoints"][k] for k in keys])


_DLIB_HINT = ("the dlib detector needs the optional packages 'dlib-bin' and "
              "'face-recognition-models': pip install dlib-bin "
              "face-recognition-models (or 'mtlface-jax[align]')")


def _dlib_68_point_model() -> Path:
  """Finds the 68-point model file of ``face-recognition-models``.

  The package's own accessors import ``pkg_resources``, which recent
  setuptools no longer ships, so the file is located through the import
  system instead.
  """
  spec = importlib.util.find_spec("face_recognition_models")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError(_DLIB_HINT + " (face_recognition_models not found)")
  folder = Path(next(iter(spec.submodule_search_locations)))
  model = folder / "models" / "shape_predictor_68_face_landmarks.dat"
  if not model.is_file():
    raise ImportError(_DLIB_HINT + f" ({model} is missing)")
  return model


class DlibDetector:
  """5-point landmarks from dlib's 68-point predictor.

  Uses ``dlib-bin`` and the model files of ``face-recognition-models``; the
  ArcFace points are the eye centres, nose tip (68-point index 30) and mouth
  corners (48, 54).
  """

  def __init__(self):
    try:
      import dlib  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(_DLIB_HINT + f" ({e})") from e
    self._detector = dlib.get_frontal_face_detector()
    self._predictor = dlib.shape_predictor(str(_dlib_68_point_model()))

  def __call__(self, image: np.ndarray) -> Landmarks:
    boxes = self._detector(image, 1)
    self.num_faces = len(boxes)  # The largest is used; callers may refuse several.
    if not boxes:
      raise NoFaceError("no face detected")
    box = max(boxes, key=lambda b: b.width() * b.height())
    shape = self._predictor(image, box)
    points = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)
    return reduce_68_to_5(points)


def pad_for_detection(image: np.ndarray, margin: float, min_side: int = 0
                      ) -> tuple[np.ndarray, int, float]:
  """A padded (and, if small, upscaled) copy of ``image`` for a detector.

  Args:
    image: ``[H, W, 3]`` uint8.
    margin: border on each side, as a fraction of the longer side; filled
      with the image's mean colour (a neutral background, where mirrored or
      repeated edges could look like a second face).
    min_side: upscale the padded image so its longer side is at least this
      (0: never).

  Returns:
    ``(padded image, border in original pixels, scale)``; see
    :func:`unpad_landmarks` to map points back.
  """
  height, width = image.shape[:2]
  border = max(1, int(round(margin * max(height, width))))
  fill = image.reshape(-1, image.shape[-1]).mean(axis=0)
  padded = np.empty((height + 2 * border, width + 2 * border, image.shape[-1]),
                    np.uint8)
  padded[...] = np.rint(fill).astype(np.uint8)
  padded[border:border + height, border:border + width] = image
  scale = 1.0
  if min_side and max(padded.shape[:2]) < min_side:
    scale = min_side / max(padded.shape[:2])
    size = (round(padded.shape[1] * scale), round(padded.shape[0] * scale))
    padded = np.asarray(Image.fromarray(padded).resize(size, Image.BICUBIC))
  return padded, border, scale


def unpad_landmarks(points: np.ndarray, border: int, scale: float
                    ) -> np.ndarray:
  """Maps points found in :func:`pad_for_detection`'s image back.

  Pixel centres are integer coordinates (as everywhere in this module):
  ``x_scaled + 0.5 = (x_padded + 0.5) * scale`` and ``x = x_padded - border``.
  """
  points = np.asarray(points, dtype=np.float64)
  return (points + 0.5) / scale - 0.5 - border


class PaddedRetry:
  """A detector that retries on a padded copy when it finds no face.

  Tight crops (a face filling the frame) give detectors no context, so they
  often report no face; a border of ``margin`` (and an upscale to
  ``min_side``) usually fixes that. Landmarks are mapped back to the
  original image.
  """

  def __init__(self, detector: Callable[[np.ndarray], Landmarks],
               margin: float = 0.3, min_side: int = 0):
    """Wraps ``detector``; see :func:`pad_for_detection` for the arguments."""
    if margin <= 0:
      raise ValueError(f"the retry margin must be > 0, got {margin}")
    self._detector = detector
    self._margin = margin
    self._min_side = min_side
    self.num_retried = 0
    self.num_rescued = 0

  @property
  def num_faces(self) -> int:
    """Faces the wrapped detector found in its last image."""
    return getattr(self._detector, "num_faces", 1)

  def __call__(self, image: np.ndarray) -> Landmarks:
    try:
      return self._detector(image)
    except NoFaceError as first:
      self.num_retried += 1
      padded, border, scale = pad_for_detection(image, self._margin,
                                                self._min_side)
      try:
        points = self._detector(padded)
      except NoFaceError:
        upscaled = f", upscaled x{scale:.2f}" if scale != 1 else ""
        raise NoFaceError(f"{first} (also after padding by {border} px"
                          f"{upscaled})") from None
    self.num_rescued += 1
    return unpad_landmarks(points, border, scale)


def make_detector(name: str) -> Callable[[np.ndarray], Landmarks]:
  """Builds a landmark detector: ``"mtcnn"``, ``"dlib"`` or ``"auto"``.

  ``"auto"`` tries mtcnn, then dlib.

  Raises:
    ImportError: saying what to install when no backend is available.
  """
  if name == "mtcnn":
    return MtcnnDetector()
  if name == "dlib":
    return DlibDetector()
  if name != "auto":
    raise ValueError(f"unknown detector {name!r}")
  errors = []
  for backend in (MtcnnDetector, DlibDetector):
    try:
      return backend()
    except ImportError as e:
      errors.append(str(e))
  raise ImportError("no face detector is installed; pass --landmarks FILE, "
                    "--landmarks-dir PTS_DIR or "
                    "install one: " + "; ".join(errors))


def _save_image(image: np.ndarray, path: Path) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(image).save(path, quality=95)


def _plan(input_root: Path, landmarks: dict[str, Landmarks] | None,
          landmarks_dir: Path | None, skip_bad_examples: bool,
          report: parse_report.ParseReport) -> list[tuple[str, object]]:
  """``(image name, landmark source)`` for every image to align.

  The source is ``[5, 2]`` landmarks (a list), a ``.pts`` path or None
  (``.pts`` mode: none found), or None for detection and the LFW crop.
  """
  images = list_images(input_root)
  if landmarks_dir is not None:
    pts = find_pts_files(images, landmarks_dir)
    return [(name, pts.get(name)) for name in images]
  if landmarks is None:
    return [(name, None) for name in images]
  index, taken, jobs = NameIndex(images), {}, []
  for name, points in landmarks.items():
    try:
      found = index.find(name, any_extension=not name.lower().endswith(
          lists_lib.IMAGE_EXTENSIONS))
      if found is None:
        raise ValueError(f"no image file {name!r} below {input_root} (names "
                         "match ignoring case)")
      if found in taken:
        raise ValueError(f"names the same image as {taken[found]!r}")
    except ValueError as e:
      parse_report.handle_bad_entry(str(input_root / name), str(e),
                                  skip_bad_examples, report)
      continue
    taken[found] = name
    jobs.append((found, points))
  return jobs


def _align_one(input_root: Path, name: str, source, mode: str,
               detector: Callable[[np.ndarray], Landmarks] | None
               ) -> np.ndarray:
  if mode == "pts" and source is None:
    raise NoFaceError("no .pts landmark file for it")
  image = images_lib.load_image(input_root / name)
  if mode == "lfw":
    return images_lib.lfw_crop(image)
  if mode == "pts":
    points = parse_pts_file(source)  # Its errors name the file and line.
    try:
      points = to_five_points(points)
    except ValueError as e:
      raise ValueError(f"{source}: {e}") from None
  elif mode == "landmarks":
    points = source
  else:
    points = detector(image)
  return align_face(image, points)


def write_skipped(output_root: str | os.PathLike,
                  input_root: str | os.PathLike,
                  report: parse_report.ParseReport) -> Path | None:
  """Lists every skipped image in ``<output_root>/skipped.txt``.

  One line per image: its path relative to ``input_root``, a tab, and why it
  was skipped. A stale file from an earlier run is removed when nothing was
  skipped.

  Returns:
    The file written, or None.
  """
  path = Path(output_root) / SKIPPED_FILE
  if not report.skipped:
    path.unlink(missing_ok=True)
    return None
  path.parent.mkdir(parents=True, exist_ok=True)
  lines = []
  for location, reason in report.skipped:
    relative = os.path.relpath(location, input_root)
    lines.append(f"{Path(relative).as_posix()}\t{' '.join(reason.split())}")
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return path


def align_directory(input_dir: str | os.PathLike, output_dir: str | os.PathLike,
                    *,
                    landmarks: dict[str, Landmarks] | None = None,
                    landmarks_dir: str | os.PathLike | None = None,
                    detector: Callable[[np.ndarray], Landmarks] | None = None,
                    lfw_crop: bool = False,
                    skip_bad_examples: bool = False,
                    progress: bool = True) -> parse_report.ParseReport:
  """Aligns images of ``input_dir`` into ``output_dir`` (same relative paths).

  Exactly one landmark source is used: ``lfw_crop``, else ``landmarks``
  (only the listed files, matched to files ignoring case), else
  ``landmarks_dir`` (every image, with the ``.pts`` file of the same name
  there, see :func:`find_pts_files`), else ``detector`` (every image found
  recursively). Skipped images are listed in ``<output_dir>/skipped.txt``.

  Args:
    input_dir: raw images.
    output_dir: receives 112x112 aligned faces.
    landmarks: relative path -> ``[5, 2]`` landmarks.
    landmarks_dir: folder of iBUG ``.pts`` files (5 or 68 points).
    detector: callable image -> ``[5, 2]`` landmarks.
    lfw_crop: apply the fixed LFW deep-funneled crop instead of alignment.
    skip_bad_examples: count unreadable images, missing landmarks and failed
      detections instead of raising.
    progress: show a tqdm progress bar.

  Returns:
    The report of aligned and skipped images.

  Raises:
    ValueError: naming the file, for a bad image or no face, unless skipping.
  """
  input_root, output_root = Path(input_dir), Path(output_dir)
  if not input_root.is_dir():
    raise FileNotFoundError(f"{input_root}: input folder not found")
  if landmarks_dir is not None and not Path(landmarks_dir).is_dir():
    raise FileNotFoundError(f"{landmarks_dir}: landmarks folder not found")
  if lfw_crop:
    mode = "lfw"
  elif landmarks is not None:
    mode = "landmarks"
  else:
    mode = "pts" if landmarks_dir is not None else "detect"
  if mode == "detect" and detector is None:
    raise ValueError("need landmarks, a landmarks folder, a detector or "
                     "lfw_crop")
  report = parse_report.ParseReport()
  jobs = _plan(input_root, landmarks if mode == "landmarks" else None,
               Path(landmarks_dir) if mode == "pts" else None,
               skip_bad_examples, report)
  for name, source in tqdm(jobs, desc="aligning", unit="img",
                           disable=not progress):
    try:
      face = _align_one(input_root, name, source, mode, detector)
    except ValueError as e:  # ImageDecodeError and NoFaceError included.
      parse_report.handle_bad_entry(str(input_root / name), str(e),
                                  skip_bad_examples, report)
      continue
    _save_image(face, output_root / name)
    report.add_ok()
  write_skipped(output_root, input_root, report)
  return report


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m mtlface_jax.align",
      description="Align face photos to the 112x112 ArcFace template. With "
      "no landmark option, .pts files found beside the images are used; "
      "without those, a detector.")
  parser.add_argument("--input", required=True, help="folder of raw images")
  parser.add_argument("--output", required=True, help="output folder")
  source = parser.add_mutually_exclusive_group()
  source.add_argument("--landmarks", help="file of 'relative/path x1 y1 ... "
                      "x5 y5' (or 68-point) lines (paths relative to --input, "
                      "matched ignoring case)")
  source.add_argument("--landmarks-dir", "--landmarks_dir",
                      dest="landmarks_dir",
                      help="folder of iBUG/FG-NET .pts files named like the "
                      "images (ignoring case and extension)")
  source.add_argument("--lfw-crop", action="store_true",
                      help="fixed centre crop for LFW deep-funneled images")
  source.add_argument("--detector", default=None,
                      choices=("auto", "mtcnn", "dlib"),
                      help="landmark detector (default when no landmarks "
                      "are given or found: auto)")
  parser.add_argument("--pad-retry", "--pad_retry", type=float, default=0.0,
                      metavar="MARGIN",
                      help="with a detector: retry images without a face on "
                      "a copy padded by MARGIN x the longer side (e.g. 0.3)")
  parser.add_argument("--retry-min-side", "--retry_min_side", type=int,
                      default=0, metavar="PX",
                      help="with --pad-retry: also upscale the padded copy "
                      "to at least PX pixels on its longer side")
  parser.add_argument("--skip-bad-examples", "--skip_bad_examples",
                      action="store_true",
                      help="skip and count unreadable images and images "
                      "without a face instead of stopping; all are listed in "
                      "OUTPUT/skipped.txt")
  parser.add_argument("--no-progress", action="store_true")
  return parser.parse_args(argv)


def _landmark_source(args) -> tuple[dict | None, str | None, object]:
  """(landmarks, landmarks_dir, detector) from the command line."""
  if args.pad_retry and (args.landmarks or args.landmarks_dir or
                         args.lfw_crop):
    raise ValueError("--pad-retry applies to a detector only")
  landmarks = parse_landmark_file(args.landmarks) if args.landmarks else None
  landmarks_dir = args.landmarks_dir
  if not (landmarks is not None or landmarks_dir or args.lfw_crop or
          args.detector):
    if any(p.suffix.lower() == ".pts" for p in Path(args.input).rglob("*")):
      landmarks_dir = args.input
      print(f"using the .pts landmark files found in {args.input} (pass "
            "--detector to detect faces instead)")
  detector = None
  if not args.lfw_crop and landmarks is None and not landmarks_dir:
    detector = make_detector(args.detector or "auto")
    if args.pad_retry:
      detector = PaddedRetry(detector, args.pad_retry, args.retry_min_side)
  return landmarks, landmarks_dir, detector


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; returns the exit status."""
  args = _parse_args(argv)
  try:
    landmarks, landmarks_dir, detector = _landmark_source(args)
    report = align_directory(
        args.input, args.output, landmarks=landmarks,
        landmarks_dir=landmarks_dir, detector=detector,
        lfw_crop=args.lfw_crop, skip_bad_examples=args.skip_bad_examples,
        progress=not args.no_progress)
  except (ValueError, ImportError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"aligned into {args.output}: {report.summary()}")
  if report.num_skipped:
    print(f"all {report.num_skipped} skipped images, with reasons: "
          f"{Path(args.output) / SKIPPED_FILE}")
  if isinstance(detector, PaddedRetry) and detector.num_retried:
    print(f"padded retry found a face in {detector.num_rescued} of "
          f"{detector.num_retried} images")
  return 0


if __name__ == "__main__":
  sys.exit(main())
