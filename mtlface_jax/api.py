"""Your own photos in one line: ``mtlface_jax.load(path)`` and :class:`FaceModel`.

::

  import mtlface_jax
  model = mtlface_jax.load("runs/fas")          # workdir, converted checkpoint or bundle
  model.verify("a.jpg", "b.jpg")                # Verdict(similarity, same, threshold)
  model.age(["a.jpg", "b.jpg"])                 # [AgeEstimate(age, group, label), ...]
  model.progress("a.jpg", "grid.png")           # the face at every age group
  model.embed(["a.jpg", "b.jpg"])               # float32 [2, D], L2-normalised

Photos are file paths, encoded bytes, PIL images or uint8 ``[H, W, 3]``
arrays. Each is decoded (any format Pillow reads), turned upright by its EXIF
orientation, converted to RGB, aligned to the 112x112 ArcFace template when a
face detector is installed (``pip install 'mtlface-jax[align]'``: mtcnn or
dlib) and otherwise taken as an already-aligned face crop (said once),
resized to the model's input side and scaled to [-1, 1] as in evaluation.

The verification threshold is, in this order, the ``threshold`` given, the
one recorded by an evaluation of the checkpoint (``best_threshold`` of the
first verification result in ``eval/report.json`` beside or above the
checkpoint), or :data:`DEFAULT_THRESHOLD`.
"""

import dataclasses
import json
import os
from pathlib import Path
import sys
import tempfile
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
from PIL import Image

from mtlface_jax import ages as ages_lib
from mtlface_jax.formats import images as images_lib

# A cosine-similarity threshold typical of 512-d CosFace/ArcFace embeddings of
# aligned faces (same person above it); an evaluation's recorded threshold
# replaces it (run eval.py with --pairs to record one for your checkpoint).
DEFAULT_THRESHOLD = 0.3
# Batch sizes that programs are compiled for: a call pads its photos to the
# smallest bucket that holds them (larger sets run in batches of the largest),
# so a session compiles at most three shapes per program.
BATCH_BUCKETS = (2, 8, 32)
ALIGN_MODES = ("auto", "mtcnn", "dlib", "none")
NO_DETECTOR_NOTE = ("no face detector is installed (pip install 'mtlface-jax[align]'); "
                    "photos are taken as already-aligned face crops")

Photo = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]


class PhotoError(ValueError):
  """A photo could not be read, or holds no face or several faces (one line)."""


@dataclasses.dataclass(frozen=True)
class Verdict:
  """Whether two photos show the same person.

  Attributes:
    similarity: cosine similarity of the two embeddings, in [-1, 1].
    same: ``similarity >= threshold``.
    threshold: the threshold used.
    threshold_source: where it came from ("given", a report path, "default").
  """
  similarity: float
  same: bool
  threshold: float
  threshold_source: str

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class AgeEstimate:
  """One photo's estimated age.

  Attributes:
    photo: its name (file path, or "photo <i>" for in-memory photos).
    age: expected age in years (flip-averaged).
    group: the age-group classifier's group, 0..G-1.
    label: that group's age range, e.g. "21-30".
  """
  photo: str
  age: float
  group: int
  label: str

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def _photo_name(photo: Photo, index: int) -> str:
  if isinstance(photo, (str, os.PathLike)):
    return str(photo)
  return f"photo {index + 1}"


def decode_photo(photo: Photo, name: str = "photo") -> np.ndarray:
  """Any accepted photo -> upright RGB uint8 ``[H, W, 3]``.

  Raises:
    PhotoError: naming ``name`` for unreadable files or unsupported arrays.
  """
  try:
    if isinstance(photo, (str, os.PathLike)):
      try:
        data = Path(photo).read_bytes()
      except OSError as e:
        raise PhotoError(f"{photo}: cannot read the file ({e.strerror or e})") from None
      return images_lib.decode_image_bytes(data, str(photo), orient=True)
    if isinstance(photo, (bytes, bytearray)):
      return images_lib.decode_image_bytes(bytes(photo), name, orient=True)
    if isinstance(photo, Image.Image):
      return images_lib.from_pil(photo, orient=True)
  except images_lib.ImageDecodeError as e:
    raise PhotoError(str(e)) from None
  array = np.asarray(photo)
  if array.dtype != np.uint8 or array.ndim not in (2, 3) or (
      array.ndim == 3 and array.shape[-1] not in (1, 3, 4)):
    raise PhotoError(f"{name}: arrays must be uint8 [H, W], [H, W, 3] or [H, W, 4], "
                     f"got {array.dtype} {array.shape}")
  if array.ndim == 2:
    array = array[..., None]
  return np.ascontiguousarray(np.broadcast_to(array[..., :3], array.shape[:2] + (3,))
                              if array.shape[-1] == 1 else array[..., :3])


def find_recorded_threshold(model_path) -> tuple[Optional[float], Optional[str]]:
  """The verification threshold an evaluation of this checkpoint recorded.

  Looks for ``eval/report.json`` (and ``report.json``) in the checkpoint's
  folder and its parent (a recipe's stage folder ``workdir/fas`` is evaluated
  into ``workdir/eval``; a ``checkpoints/`` folder sits in its workdir).

  Returns:
    ``(threshold, "report.json path [dataset]")`` or ``(None, None)``.
  """
  path = Path(model_path).absolute()
  folders = [path, path.parent] if path.is_dir() else [path.parent]
  for folder in folders:
    for candidate in (folder / "eval" / "report.json", folder / "report.json"):
      try:
        report = json.loads(candidate.read_text())
      except (OSError, ValueError):
        continue
      for name, result in (report.get("verification") or {}).items():
        if isinstance(result, dict) and result.get("best_threshold") is not None:
          return float(result["best_threshold"]), f"{candidate} [{name}]"
  return None, None


def make_aligner(mode: str = "auto", notice: Callable[[str], None] = None
                 ) -> Optional[Callable[[np.ndarray, str], np.ndarray]]:
  """A function ``(RGB image, name) -> aligned 112x112 face``, or None.

  Args:
    mode: "auto" (a detector if one is installed, else none), "mtcnn",
      "dlib" (that detector, or an ImportError saying what to install) or
      "none" (photos are already-aligned crops).
    notice: called once with :data:`NO_DETECTOR_NOTE` when "auto" finds no
      detector (default: print to stderr).

  Returns:
    The aligner, or None when photos are taken as they are.
  """
  if mode not in ALIGN_MODES:
    raise ValueError(f"align must be one of {ALIGN_MODES}, got {mode!r}")
  if mode == "none":
    return None
  from mtlface_jax import align  # pylint: disable=g-import-not-at-top
  try:
    detector = align.make_detector(mode)
  except ImportError:
    if mode != "auto":
      raise
    (notice or (lambda text: print(f"note: {text}", file=sys.stderr)))(NO_DETECTOR_NOTE)
    return None
  # Tight crops give a detector no context: retry on a padded copy.
  detector = align.PaddedRetry(detector, margin=0.3)

  def aligned(image: np.ndarray, name: str) -> np.ndarray:
    try:
      landmarks = detector(image)
    except align.NoFaceError as e:
      raise PhotoError(f"{name}: no face found ({e}); use a photo with one face, "
                       "or pass align='none' / --no-align for a ready face crop") from None
    if detector.num_faces > 1:
      raise PhotoError(f"{name}: {detector.num_faces} faces found; crop the photo to one face")
    return align.align_face(image, landmarks)

  return aligned


class FaceModel:
  """A checkpoint that answers questions about photos (see the module doc).

  Args:
    loaded: a ``predict.LoadedModel``.
    align: see :func:`make_aligner`.
    threshold: verification threshold; None: recorded, else the default.
    flip: flip-average encodings (the evaluation's test-time augmentation).
    notice: where one-time notes go (default stderr).
  """

  def __init__(self, loaded, align: str = "auto", threshold: Optional[float] = None,
               flip: bool = True, notice: Optional[Callable[[str], None]] = None):
    self.loaded = loaded
    self.image_size = int(loaded.info["image_size"])
    self.num_groups = int(loaded.info["age_group"])
    self.group_labels = ages_lib.group_ranges(self.num_groups)
    self.flip = flip
    self._aligner = make_aligner(align, notice)
    if threshold is not None:
      self.threshold, self.threshold_source = float(threshold), "given"
    else:
      recorded, source = find_recorded_threshold(loaded.info.get("checkpoint", ""))
      self.threshold, self.threshold_source = ((recorded, source) if recorded is not None
                                               else (DEFAULT_THRESHOLD, "default"))
    self._runners = {}

  @property
  def aligns(self) -> bool:
    """Whether photos are aligned with a detector (else taken as crops)."""
    return self._aligner is not None

  @property
  def info(self) -> dict:
    """The checkpoint's facts (kind, family, image size, age groups, modules...)."""
    return self.loaded.info

  def faces(self, photos: Sequence[Photo]) -> np.ndarray:
    """Photos -> float32 model inputs ``[N, S, S, 3]`` in [-1, 1].

    Raises:
      PhotoError: naming the photo that is unreadable or has no / several faces.
    """
    from mtlface_jax.evaluation import datasets  # pylint: disable=g-import-not-at-top
    out = []
    for index, photo in enumerate(photos):
      name = _photo_name(photo, index)
      image = decode_photo(photo, name)
      face = (self._aligner(image, name) if self._aligner is not None
              else images_lib.to_face(image, source=name))
      out.append(datasets.to_model_input(images_lib.resize_image(face, self.image_size)))
    if not out:
      raise PhotoError("no photos given")
    return np.stack(out)

  def _runner(self, count: int):
    """The runner whose batch size is the bucket for ``count`` photos."""
    from mtlface_jax.evaluation import runner  # pylint: disable=g-import-not-at-top
    size = next((b for b in BATCH_BUCKETS if b >= count), BATCH_BUCKETS[-1])
    if size not in self._runners:
      self._runners[size] = runner.ModelRunner(self.loaded, batch_size=size, flip=self.flip,
                                               progress=False)
    return self._runners[size]

  def embed(self, photos: Union[Photo, Sequence[Photo]]) -> np.ndarray:
    """float32 ``[N, D]`` L2-normalised identity embeddings of the photos."""
    faces = self.faces(_as_list(photos))
    return self._runner(len(faces)).embed(faces)

  def similarity(self, a: Photo, b: Photo) -> float:
    """Cosine similarity of two photos' embeddings."""
    embeddings = self.embed([a, b])
    return float(np.dot(embeddings[0], embeddings[1]))

  def verify(self, a: Photo, b: Photo, threshold: Optional[float] = None) -> Verdict:
    """Whether ``a`` and ``b`` show the same person (see :class:`Verdict`)."""
    if threshold is None:
      threshold, source = self.threshold, self.threshold_source
    else:
      threshold, source = float(threshold), "given"
    similarity = self.similarity(a, b)
    return Verdict(similarity, bool(similarity >= threshold), float(threshold), source)

  def age(self, photos: Union[Photo, Sequence[Photo]]) -> list[AgeEstimate]:
    """Estimated age and age group of each photo."""
    photos = _as_list(photos)
    faces = self.faces(photos)
    out = self._runner(len(faces)).estimate_ages(faces)
    return [AgeEstimate(_photo_name(p, i), float(out["age"][i]), int(out["group"][i]),
                        self.group_labels[int(out["group"][i])])
            for i, p in enumerate(photos)]

  def progress(self, photo: Photo, path=None) -> np.ndarray:
    """The face at every age group.

    Args:
      photo: one photo.
      path: optional PNG to write: the input, then one column per group,
        titled with the age ranges.

    Returns:
      float32 ``[G, S, S, 3]`` in [-1, 1], one face per age group (clipped:
      a generator's residual output may overshoot the range slightly).
    """
    faces = self.faces([photo])
    synthesized = np.clip(self._runner(1).synthesize(faces), -1.0, 1.0)
    if path is not None:
      self.save_grid(faces, synthesized, path)
    return synthesized[0]

  def save_grid(self, faces: np.ndarray, synthesized: np.ndarray, path) -> Path:
    """Writes the titled progression grid of :meth:`progress` (PNG)."""
    from mtlface_jax.evaluation import fas  # pylint: disable=g-import-not-at-top
    return fas.save_age_progression_grid(faces, synthesized, path, self.group_labels)

  def progress_png(self, photo: Photo) -> bytes:
    """:meth:`progress`'s titled grid as PNG bytes (for the web page)."""
    faces = self.faces([photo])
    synthesized = self._runner(1).synthesize(faces)
    with tempfile.TemporaryDirectory(prefix="mtlface-grid-") as folder:
      return self.save_grid(faces, synthesized, Path(folder) / "grid.png").read_bytes()


def _as_list(photos) -> list:
  """One photo or a sequence of photos -> a list of photos."""
  if isinstance(photos, (str, os.PathLike, bytes, bytearray, Image.Image)):
    return [photos]
  if isinstance(photos, np.ndarray) and photos.ndim in (2, 3):
    return [photos]
  return list(photos)


def load(path, align: str = "auto", threshold: Optional[float] = None,
         dtype: str = "float32", step: Optional[int] = None, flip: bool = True,
         notice: Optional[Callable[[str], None]] = None) -> FaceModel:
  """Loads a checkpoint for photos: a training workdir, converted checkpoint or bundle.

  Args:
    path: the checkpoint (``predict.load`` accepts it).
    align: "auto", "mtcnn", "dlib" or "none" (see :func:`make_aligner`).
    threshold: verification threshold (default: recorded, else
      :data:`DEFAULT_THRESHOLD`).
    dtype: compute dtype ("float32" or "bfloat16").
    step: checkpoint step (default latest).
    flip: flip-average encodings.
    notice: receives one-time notes (default: printed to stderr).

  Returns:
    A :class:`FaceModel`.
  """
  from mtlface_jax import predict  # pylint: disable=g-import-not-at-top
  if not Path(path).exists():
    raise FileNotFoundError(f"{path}: no such checkpoint (a training workdir, converted "
                            "checkpoint or exported bundle)")
  return FaceModel(predict.load(path, dtype=dtype, step=step), align, threshold, flip, notice)


def describe(model: FaceModel) -> dict[str, Any]:
  """JSON-ready facts for the page and ``--json`` outputs."""
  info = model.info
  return {"checkpoint": info.get("checkpoint"), "kind": info.get("kind"),
          "family": info.get("family"), "step": info.get("step"),
          "image_size": model.image_size, "age_groups": model.group_labels,
          "modules": info.get("modules"), "threshold": model.threshold,
          "threshold_source": model.threshold_source, "aligns": model.aligns}
