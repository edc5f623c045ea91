"""5-point face alignment to the 112x112 ArcFace template, and the LFW crop.

Usage::

  python -m mtlface_jax.align --input RAW_DIR --output ALIGNED_DIR \\
      [--landmarks FILE | --detector {auto,mtcnn,dlib} | --lfw-crop]

Landmarks come from a file with lines ``relative/path x1 y1 ... x5 y5``
(left eye, right eye, nose tip, left and right mouth corner, in the image's
left/right) or from an optional detector: the ``mtcnn`` package (TensorFlow,
weights inside the wheel) or ``dlib-bin`` with ``face-recognition-models``
(both on PyPI, offline after install). Neither is a dependency of this
package; a clear error says what to install when one is asked for.

The similarity transform (rotation, uniform scale, translation) that maps
the five landmarks onto the template is estimated by Umeyama's least-squares
method, and the image is warped with bilinear sampling in NumPy, using the
convention that integer coordinates are pixel centres (as OpenCV does).
"""

import argparse
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
from mtlface_jax.formats import report as report_lib

# insightface's 112x112 ArcFace template: left eye, right eye, nose tip, left
# and right mouth corner, in (x, y) pixels.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
     [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)
FACE_SIZE = images_lib.FACE_SIZE

Landmarks = np.ndarray  # [5, 2] float (x, y).


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


def parse_landmark_file(path: str | os.PathLike) -> dict[str, Landmarks]:
  """Reads lines ``relative/path x1 y1 x2 y2 x3 y3 x4 y4 x5 y5``.

  The path may contain spaces (the last ten fields are the numbers).

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
    fields = line.rsplit(maxsplit=10)
    try:
      if len(fields) != 11:
        raise ValueError(f"expected 'path x1 y1 ... x5 y5', got {len(fields)} "
                         "fields")
      points = np.array([float(v) for v in fields[1:]]).reshape(5, 2)
      if not np.all(np.isfinite(points)):
        raise ValueError("landmarks must be finite numbers")
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
          f"pip install mtcnn (it uses the installed TensorFlow) ({e})") from e
    self._model = MTCNN()
    self._min_confidence = min_confidence

  def __call__(self, image: np.ndarray) -> Landmarks:
    faces = [f for f in self._model.detect_faces(image)
             if f.get("confidence", 0.0) >= self._min_confidence]
    if not faces:
      raise NoFaceError("no face detected")
    face = max(faces, key=lambda f: f["box"][2] * f["box"][3])
    keys = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
    return _order_left_right([face["keypoints"][k] for k in keys])


_DLIB_HINT = ("the dlib detector needs the optional packages 'dlib-bin' and "
              "'face-recognition-models': pip install dlib-bin "
              "face-recognition-models")


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
    if not boxes:
      raise NoFaceError("no face detected")
    box = max(boxes, key=lambda b: b.width() * b.height())
    shape = self._predictor(image, box)
    points = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)
    five = [points[36:42].mean(0), points[42:48].mean(0), points[30],
            points[48], points[54]]
    return _order_left_right(five)


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
  raise ImportError("no face detector is installed; pass --landmarks FILE or "
                    "install one: " + "; ".join(errors))


def _save_image(image: np.ndarray, path: Path) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(image).save(path, quality=95)


def _align_one(input_root: Path, name: str, mode: str,
               landmarks: dict[str, Landmarks] | None,
               detector: Callable[[np.ndarray], Landmarks] | None
               ) -> np.ndarray:
  image = images_lib.load_image(input_root / name)
  if mode == "lfw":
    return images_lib.lfw_crop(image)
  points = landmarks[name] if landmarks is not None else detector(image)
  return align_face(image, points)


def align_directory(input_dir: str | os.PathLike, output_dir: str | os.PathLike,
                    *,
                    landmarks: dict[str, Landmarks] | None = None,
                    detector: Callable[[np.ndarray], Landmarks] | None = None,
                    lfw_crop: bool = False,
                    skip_bad_examples: bool = False,
                    progress: bool = True) -> report_lib.ParseReport:
  """Aligns images of ``input_dir`` into ``output_dir`` (same relative paths).

  Exactly one landmark source is used: ``lfw_crop``, else ``landmarks``
  (only the listed files are processed), else ``detector`` (every image found
  recursively).

  Args:
    input_dir: raw images.
    output_dir: receives 112x112 aligned faces.
    landmarks: relative path -> ``[5, 2]`` landmarks.
    detector: callable image -> ``[5, 2]`` landmarks.
    lfw_crop: apply the fixed LFW deep-funneled crop instead of alignment.
    skip_bad_examples: count unreadable images and failed detections instead
      of raising.
    progress: show a tqdm progress bar.

  Returns:
    The report of aligned and skipped images.

  Raises:
    ValueError: naming the file, for a bad image or no face, unless skipping.
  """
  input_root, output_root = Path(input_dir), Path(output_dir)
  if not input_root.is_dir():
    raise FileNotFoundError(f"{input_root}: input folder not found")
  if lfw_crop:
    mode = "lfw"
  else:
    mode = "landmarks" if landmarks is not None else "detect"
  if mode == "detect" and detector is None:
    raise ValueError("need landmarks, a detector or lfw_crop")
  if mode == "landmarks":
    names = list(landmarks)
  else:
    extensions = lists_lib.IMAGE_EXTENSIONS
    names = sorted(str(p.relative_to(input_root)) for p in input_root.rglob("*")
                   if p.is_file() and p.name.lower().endswith(extensions))
  report = report_lib.ParseReport()
  for name in tqdm(names, desc="aligning", unit="img", disable=not progress):
    try:
      face = _align_one(input_root, name, mode, landmarks, detector)
    except ValueError as e:  # ImageDecodeError and NoFaceError included.
      report_lib.handle_bad_entry(str(input_root / name), str(e),
                                  skip_bad_examples, report)
      continue
    _save_image(face, output_root / name)
    report.add_ok()
  return report


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m mtlface_jax.align",
      description="Align face photos to the 112x112 ArcFace template.")
  parser.add_argument("--input", required=True, help="folder of raw images")
  parser.add_argument("--output", required=True, help="output folder")
  source = parser.add_mutually_exclusive_group()
  source.add_argument("--landmarks", help="file of 'relative/path x1 y1 ... "
                      "x5 y5' lines (paths relative to --input)")
  source.add_argument("--lfw-crop", action="store_true",
                      help="fixed centre crop for LFW deep-funneled images")
  source.add_argument("--detector", default="auto",
                      choices=("auto", "mtcnn", "dlib"),
                      help="landmark detector when no --landmarks are given")
  parser.add_argument("--skip-bad-examples", action="store_true",
                      help="skip and count unreadable images and images "
                      "without a face instead of stopping")
  parser.add_argument("--no-progress", action="store_true")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; returns the exit status."""
  args = _parse_args(argv)
  try:
    landmarks = parse_landmark_file(args.landmarks) if args.landmarks else None
    detector = None
    if not args.lfw_crop and landmarks is None:
      detector = make_detector(args.detector)
    report = align_directory(
        args.input, args.output, landmarks=landmarks, detector=detector,
        lfw_crop=args.lfw_crop, skip_bad_examples=args.skip_bad_examples,
        progress=not args.no_progress)
  except (ValueError, ImportError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"aligned into {args.output}: {report.summary()}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
