"""Evaluation inputs: faces to model inputs, labelled face sets, pair lists, folds.

A :class:`FaceSet` is a list of faces (image files or in-memory uint8 images)
with identity and age labels, built from the formats of
:mod:`mtlface_jax.formats` (UTKFace/FG-NET names, identity folders, MTLFace/
SCAF lists) or a synthetic split. Parse problems raise ``ValueError`` naming
the file (and line), or, with ``skip_bad_examples``, are counted in the set's
``report`` and listed in the evaluation report.

Files become model inputs through :func:`decode_face`: an optional crop box
(``--crop``) or the fixed LFW crop, then a resize to 112x112 whose input
shape is kept so a run can count (:func:`shape_tally`) the images a resize
squashed. Identity folders may hold subfolders (``<person>/y/``): their
images belong to the person, keep their subfolder in ``FaceSet.subsets`` and
can be selected (gallery/probe by subset) or refused.
"""

import dataclasses
import os
import re
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

from mtlface_jax import ages as ages_lib
from mtlface_jax.evaluation import verification
from mtlface_jax.formats import images as images_lib
from mtlface_jax.formats import lists
from mtlface_jax.formats import parse_report

FOLDER_FORMATS = ("utkface", "fgnet", "identity", "images")
PAIR_FORMATS = ("lfw", "generic", "numbered")
NESTED_MODES = lists.NESTED_MODES


# --- faces -> model inputs ------------------------------------------------------

def to_model_input(image: np.ndarray) -> np.ndarray:
  """RGB uint8 [H, W, 3] -> float32 in [-1, 1], as the batch contract scales."""
  return (np.asarray(image, np.float32) / 255.0 - 0.5) / 0.5


def spread_indices(num_images: int, count: int) -> np.ndarray:
  """``count`` indices evenly spread over ``range(num_images)`` (all if fewer).

  How the FAS protocols pick their inputs (:meth:`FaceSet.spread`, the
  ground-truth protocol of ``evaluation.synthetic_truth``), so both start
  from the same faces.
  """
  if count <= 0 or count >= num_images:
    return np.arange(num_images)
  return np.unique(np.linspace(0, num_images - 1, count).round()).astype(np.int64)


def decode_face(path, lfw_style: bool = False,
                crop: Optional[images_lib.CropBox] = None
                ) -> tuple[np.ndarray, Optional[tuple[int, int]]]:
  """Decodes an image file to the 112x112 face the models' inputs are made of.

  Args:
    path: image file.
    lfw_style: apply the fixed LFW crop (raw deep-funneled LFW).
    crop: a face box cut out first (``images.parse_crop``); not with
      ``lfw_style``.

  Returns:
    ``(uint8 [112, 112, 3] face, (height, width) resized from)``; the shape
    is that of the image after any crop box (what a plain resize could
    squash), None for the LFW crop (square by construction).

  Raises:
    ImageDecodeError: naming the file, if it is missing or corrupt.
    ValueError: naming the file, if the crop box leaves the image.
  """
  image = images_lib.load_image(path)
  if lfw_style:
    return images_lib.to_face(image, lfw_style=True, crop=crop), None
  if crop is not None:
    image = images_lib.crop_image(image, crop, str(path))
  return images_lib.resize_image(image, images_lib.FACE_SIZE), image.shape[:2]


def load_face(path, lfw_style: bool = False,
              image_size: int = images_lib.FACE_SIZE,
              crop: Optional[images_lib.CropBox] = None) -> np.ndarray:
  """Decodes an image file to a model input: float32 [S, S, 3] in [-1, 1].

  Args:
    path: image file.
    lfw_style: apply the fixed LFW crop instead of a plain resize.
    image_size: side S of the model's input; the 112x112 face is resized to
      it (e.g. 48 for the tiny test models).
    crop: a face box cut out before the resize (see :func:`decode_face`).

  Returns:
    The scaled face.

  Raises:
    ImageDecodeError: naming the file, if it is missing or corrupt.
  """
  face, _ = decode_face(path, lfw_style, crop)
  return to_model_input(images_lib.resize_image(face, image_size))


def crop_key(lfw_style: bool, crop: Optional[images_lib.CropBox]) -> str:
  """How a file is cut before resizing, as a cache key ("" = plain resize)."""
  if lfw_style:
    return "lfw"
  if crop is None:
    return ""
  frame = "" if crop.frame is None else f"@{crop.frame[0]}x{crop.frame[1]}"
  return f"{crop.x0},{crop.y0},{crop.x1},{crop.y1}{frame}"


def shape_tally(shapes: Iterable[tuple[str, Optional[tuple[int, int]]]]
                ) -> images_lib.ShapeTally:
  """Counts faces that were not square or not 112x112 before their resize.

  Args:
    shapes: ``(source, (height, width))`` per face, as :func:`decode_face`
      gives them (None: not counted, e.g. the LFW crop).

  Returns:
    The tally (``warning()`` says what was squashed or resized).
  """
  tally = images_lib.ShapeTally(images_lib.FACE_SIZE)
  for source, shape in shapes:
    if shape is not None:
      tally.add(shape, source)
  return tally


def array_faces(images: Iterable[np.ndarray], image_size: int) -> Iterator[np.ndarray]:
  """uint8 [H, W, 3] faces (already aligned) -> model inputs at ``image_size``.

  Args:
    images: e.g. a synthetic split's ``images`` array (112x112 faces).
    image_size: the model's input side.

  Yields:
    float32 [image_size, image_size, 3] in [-1, 1].
  """
  for image in images:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f"expected uint8 [H, W, 3] faces, got {image.dtype} {image.shape}")
    yield to_model_input(images_lib.resize_image(image, image_size))


def file_faces(paths: Iterable[str], image_size: int, lfw_style: bool = False,
               crop: Optional[images_lib.CropBox] = None) -> Iterator[np.ndarray]:
  """Decodes image files lazily into model inputs (see :func:`load_face`)."""
  for path in paths:
    yield load_face(path, lfw_style, image_size, crop)


# --- face sets ------------------------------------------------------------------

@dataclasses.dataclass
class FaceSet:
  """Faces to evaluate, with labels.

  Attributes:
    name: how reports refer to the set.
    source: where it came from (a path or "synthetic ...").
    ids: [N] identity labels (ints, or strings such as folder names); -1 or
      "" where unknown.
    ages: float [N] ages in years, -1 where unknown; anything else outside
      [0, ages.MAX_AGE] is refused, as training refuses it.
    paths: [N] image files, or None for in-memory images.
    images: uint8 [N, H, W, 3] aligned faces, or None for files.
    lfw_style: apply the fixed LFW crop to files (raw deep-funneled LFW).
    crop: a face box cut out of every file before the resize, or None.
    subsets: [N] subfolder below the identity folder of each face ("" =
      directly inside; see ``formats.lists.parse_identity_folders``), or
      None when the set has no such layout.
    report: parse counts (accepted, skipped entries with reasons).
  """
  name: str
  source: str
  ids: np.ndarray
  ages: np.ndarray
  paths: Optional[list[str]] = None
  images: Optional[np.ndarray] = None
  lfw_style: bool = False
  crop: Optional[images_lib.CropBox] = None
  subsets: Optional[np.ndarray] = None
  report: parse_report.ParseReport = dataclasses.field(default_factory=parse_report.ParseReport)

  def __post_init__(self):
    if (self.paths is None) == (self.images is None):
      raise ValueError(f"{self.name}: a FaceSet needs exactly one of paths or images")
    self.ids = np.asarray(self.ids)
    self.ages = np.asarray(self.ages, np.float32).reshape(-1)
    lengths = {"ids": len(self.ids), "ages": len(self.ages),
               "faces": len(self.paths if self.paths is not None else self.images)}
    if self.subsets is not None:
      self.subsets = np.asarray(self.subsets, dtype=str)
      lengths["subsets"] = len(self.subsets)
    if len(set(lengths.values())) != 1:
      raise ValueError(f"{self.name}: unequal lengths {lengths}")
    if not lengths["faces"]:
      raise ValueError(f"{self.name} ({self.source}): no faces to evaluate")
    check_ages(self.ages, self.paths, f"{self.name} ({self.source})")

  def __len__(self) -> int:
    return len(self.ids)

  @property
  def crop_key(self) -> str:
    """How the files are cut before resizing (see :func:`crop_key`)."""
    return crop_key(self.lfw_style, self.crop)

  def faces(self, image_size: int) -> Iterator[np.ndarray]:
    """Model inputs (float32 [S, S, 3] in [-1, 1]), decoded lazily."""
    if self.paths is not None:
      return file_faces(self.paths, image_size, self.lfw_style, self.crop)
    return array_faces(self.images, image_size)

  def subset(self, indices: Sequence[int]) -> "FaceSet":
    """The faces at ``indices`` (same name, source and report)."""
    indices = np.asarray(indices, np.int64)
    return dataclasses.replace(
        self, ids=self.ids[indices], ages=self.ages[indices],
        paths=None if self.paths is None else [self.paths[i] for i in indices],
        images=None if self.images is None else self.images[indices],
        subsets=None if self.subsets is None else self.subsets[indices])

  def spread(self, max_faces: Optional[int]) -> "FaceSet":
    """At most ``max_faces`` faces evenly spaced over the set (all if None/0)."""
    if not max_faces or max_faces >= len(self):
      return self
    return self.subset(spread_indices(len(self), max_faces))

  def check_files(self) -> None:
    """Fails before any compute if image files are missing (naming them)."""
    if self.paths is None:
      return
    missing = [p for p in self.paths if not os.path.isfile(p)]
    if missing:
      raise FileNotFoundError(f"{self.name}: {len(missing)} image file(s) missing, e.g. "
                              + ", ".join(missing[:5]))

  def summary(self, max_listed: int = 20) -> dict:
    """JSON-ready description: source, counts, subsets and the first skips."""
    entry = {"source": self.source, "num_faces": len(self),
             "num_identities": int(len(np.unique(self.ids))),
             "num_skipped": self.report.num_skipped,
             "skipped": [{"entry": where, "reason": why}
                         for where, why in self.report.skipped[:max_listed]]}
    if self.paths is not None:
      entry["crop"] = self.crop_key or "none"
    if self.subsets is not None:
      records = [lists.FaceRecord("", i, subset=s) for i, s in zip(self.ids, self.subsets)]
      entry["subsets"] = lists.subset_counts(records)
    return entry


def check_ages(ages: np.ndarray, paths: Optional[Sequence[str]], name: str) -> None:
  """Refuses ages outside [0, ages.MAX_AGE] (-1 = unknown), as training does.

  Raises:
    ValueError: naming the set, the count and the first offending face.
  """
  bad = np.flatnonzero(~np.isfinite(ages) | ((ages < 0) & (ages != -1))
                       | (ages > ages_lib.MAX_AGE))
  if bad.size:
    first = paths[bad[0]] if paths is not None else f"face {bad[0]}"
    raise ValueError(f"{name}: {bad.size} age(s) outside [0, {ages_lib.MAX_AGE}] years "
                     f"(-1 = unknown), e.g. {ages[bad[0]]:g} for {first}; training "
                     "refuses them too")


def from_records(name: str, source: str, records: Sequence[lists.FaceRecord],
                 report: parse_report.ParseReport, lfw_style: bool = False,
                 labels: Optional[Sequence] = None,
                 crop: Optional[images_lib.CropBox] = None,
                 subsets: bool = False) -> FaceSet:
  """A file FaceSet from parsed records (ids from the records unless ``labels``).

  ``subsets`` keeps each record's subfolder (identity folders).
  """
  if not records:
    raise ValueError(f"{source}: no usable images ({report.summary()})")
  ids = np.asarray(labels if labels is not None else [r.id for r in records])
  return FaceSet(name, source, ids, [r.age for r in records],
                 paths=[r.path for r in records], lfw_style=lfw_style, crop=crop,
                 subsets=[r.subset for r in records] if subsets else None, report=report)


def from_synthetic(name: str, split) -> FaceSet:
  """A FaceSet over a split of ``mtlface_jax.synthetic.make_dataset``."""
  return FaceSet(name, f"synthetic {name}", split.ids, split.ages, images=split.images)


def folder_name(folder) -> str:
  """A folder's set name: its own, or its parent's for ``.../<set>/images``."""
  folder = Path(folder).absolute()
  return folder.parent.name if folder.name == "images" else folder.name


def from_folder(folder, folder_format: str, lfw_style: bool = False,
                skip_bad_examples: bool = False,
                crop: Optional[images_lib.CropBox] = None,
                nested: str = "include",
                subsets: Optional[Sequence[str]] = None,
                name: Optional[str] = None) -> FaceSet:
  """A FaceSet labelled from a folder's layout or file names.

  Args:
    folder: the folder.
    folder_format: "utkface" (``age_gender_race_date.jpg.chip.jpg``: ages, no
      identities), "fgnet" (``001A02.JPG``: person and age), "identity"
      (``<folder>/<identity>/...``: identities by folder name, no ages; images
      in subfolders such as ``<identity>/y/`` belong to the identity too) or
      "images" (unlabelled images directly in the folder).
    lfw_style: apply the fixed LFW crop to the images.
    skip_bad_examples: count malformed names instead of raising.
    crop: a face box cut out of every image.
    nested: identity folders: "include" subfolders' images or "refuse" them.
    subsets: identity folders: keep only images of these subfolders ("" =
      directly in the identity folder); None keeps all.
    name: the set's name (default: :func:`folder_name`).

  Returns:
    The FaceSet.

  Raises:
    ValueError / FileNotFoundError: naming the folder or the bad file.
  """
  folder = Path(folder).absolute()
  name = name or folder_name(folder)
  if folder_format != "identity" and subsets is not None:
    raise ValueError(f"{folder}: subfolder selection needs an identity folder "
                     f"(<person>/<subfolder>/...), not --folder_format={folder_format}")
  labels = None
  if folder_format == "utkface":
    records, parsed = lists.parse_utkface_folder(folder, skip_bad_examples=skip_bad_examples)
  elif folder_format == "fgnet":
    records, parsed = lists.parse_fgnet_folder(folder, skip_bad_examples=skip_bad_examples)
  elif folder_format == "identity":
    records, names, parsed = lists.parse_identity_folders(
        folder, skip_bad_examples=skip_bad_examples, nested=nested)
    if subsets is not None:
      records = lists.select_subsets(records, subsets)
    labels = [names[r.id] for r in records]  # Names, so two folders' labels compare.
  elif folder_format == "images":
    records = [lists.FaceRecord(str(p)) for p in lists.list_image_files(folder)]
    parsed = parse_report.ParseReport(num_ok=len(records))
  else:
    raise ValueError(f"folder format must be one of {FOLDER_FORMATS}, got {folder_format!r}")
  return from_records(name, str(folder), records, parsed, lfw_style, labels, crop,
                      subsets=folder_format == "identity")


def from_list(list_path, images_root=None, lfw_style: bool = False,
              skip_bad_examples: bool = False,
              crop: Optional[images_lib.CropBox] = None,
              name: Optional[str] = None) -> FaceSet:
  """A FaceSet from an MTLFace/SCAF list (lines ``id filename age gender``)."""
  records, parsed = lists.parse_mtlface_list(list_path, images_root,
                                             skip_bad_examples=skip_bad_examples)
  return from_records(name or Path(list_path).stem, str(list_path), records, parsed,
                      lfw_style, crop=crop)


def guess_pair_format(path) -> str:
  """The pair-list format the first line of ``path`` looks like ("generic" if unsure).

  ``--pair_format=auto`` uses it, so several lists in different formats can be
  scored in one run.
  """
  for line in lists._read_lines(path):  # pylint: disable=protected-access
    if line.strip():
      try:
        fields = lists.split_fields(line, (2, 3, 4))
      except ValueError:
        return "generic"  # The parser then names the line.
      return lists.guess_pair_format(fields) or "generic"
  return "generic"


def load_pairs(path, pair_format: str, images_root=None, num_folds: int = 10,
               skip_bad_examples: bool = False) -> tuple[list[lists.FacePair],
                                                         parse_report.ParseReport]:
  """Parses a verification pair list.

  Args:
    path: the list.
    pair_format: "lfw" (``pairs.txt``), "generic" (``path1 path2 same
      [fold]``), "numbered" (CACD-VS: ``n path1 path2 same``) or "auto"
      (:func:`guess_pair_format`). Names with spaces are quoted or the
      fields tab-separated (``formats.lists.split_fields``).
    images_root: the image folder the list's names are relative to.
    num_folds: folds of a "numbered" list.
    skip_bad_examples: count malformed lines instead of raising.

  Returns:
    (pairs, parse report).
  """
  kwargs = {"skip_bad_examples": skip_bad_examples}
  if pair_format == "auto":
    pair_format = guess_pair_format(path)
  if pair_format == "lfw":
    return lists.parse_lfw_pairs(path, images_root, **kwargs)
  if pair_format == "generic":
    return lists.parse_pair_list(path, images_root, **kwargs)
  if pair_format == "numbered":
    return lists.parse_numbered_pairs(path, images_root, num_folds=num_folds, **kwargs)
  raise ValueError(f"pair format must be one of {PAIR_FORMATS} or 'auto', got "
                   f"{pair_format!r}")


def limit_pairs_per_fold(pairs: Sequence[lists.FacePair],
                         max_per_fold: Optional[int]) -> list[lists.FacePair]:
  """Keeps the first ``max_per_fold`` matched and mismatched pairs of each fold.

  A quick, smaller run of the same protocol (every fold keeps both kinds).
  Pairs without folds count as one fold. None or 0 keeps everything.
  """
  if not max_per_fold:
    return list(pairs)
  counts, kept = {}, []
  for pair in pairs:
    key = (pair.fold, pair.issame)
    if counts.get(key, 0) < max_per_fold:
      counts[key] = counts.get(key, 0) + 1
      kept.append(pair)
  return kept


def limit_pair_rows(pairs: np.ndarray, max_per_fold: Optional[int]) -> np.ndarray:
  """:func:`limit_pairs_per_fold` for synthetic pair rows ``(a, b, issame, fold)``."""
  if not max_per_fold:
    return pairs
  keep = np.zeros(len(pairs), bool)
  for fold in np.unique(pairs[:, 3]):
    for same in (0, 1):
      rows = np.flatnonzero((pairs[:, 3] == fold) & (pairs[:, 2] == same))
      keep[rows[:max_per_fold]] = True
  return pairs[keep]


def parse_fold_ordinals(text: str) -> list[int]:
  """Parses 1-based fold numbers like ``"6-10"`` or ``"1,3,5-7"``.

  Args:
    text: comma-separated numbers and inclusive ranges; "" for none.

  Returns:
    Sorted distinct ordinals (1 = the first fold).

  Raises:
    ValueError: on malformed text or numbers below 1.
  """
  ordinals = set()
  for part in filter(None, (p.strip() for p in text.split(","))):
    match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
    if not match:
      raise ValueError(f"bad fold selection {part!r} in {text!r}; use e.g. '6-10' or '1,3'")
    first, last = int(match.group(1)), int(match.group(2) or match.group(1))
    if first < 1 or last < first:
      raise ValueError(f"bad fold range {part!r}: folds are numbered from 1")
    ordinals.update(range(first, last + 1))
  return sorted(ordinals)


def resolve_eval_folds(ordinals: Sequence[int], fold_labels: Sequence[int]) -> Optional[list[int]]:
  """Maps 1-based fold ordinals to the fold labels a pair list uses.

  Fold k is the k-th smallest label: for LFW (labels 0..9) folds 6-10 are
  labels 5..9; for a list labelling folds 1..10 they are 6..10.

  Args:
    ordinals: from :func:`parse_fold_ordinals`; empty means all folds.
    fold_labels: the labels present (any order, repeats allowed).

  Returns:
    The selected labels, or None for all folds.

  Raises:
    ValueError: naming an ordinal beyond the number of folds.
  """
  if not ordinals:
    return None
  labels = sorted(set(int(f) for f in fold_labels))
  too_large = [k for k in ordinals if k > len(labels)]
  if too_large:
    raise ValueError(f"eval fold(s) {too_large} do not exist: the pairs have "
                     f"{len(labels)} folds (numbered 1-{len(labels)})")
  return [labels[k - 1] for k in ordinals]


def with_contiguous_folds(pairs: Sequence[lists.FacePair],
                          num_folds: int = 10) -> list[lists.FacePair]:
  """Gives a list without fold labels ``num_folds`` contiguous folds 0..F-1.

  The blocks are those ``verification.contiguous_folds`` (and insightface)
  use; a list whose pairs carry folds is returned unchanged.

  Raises:
    ValueError: if only some pairs have a fold, or there are fewer pairs
      than folds.
  """
  folds = [p.fold for p in pairs]
  if not pairs or min(folds) >= 0:
    return list(pairs)
  if max(folds) >= 0:
    first = next(p for p in pairs if p.fold < 0)
    raise ValueError(f"{first.source}: pair has no fold while others do; give every "
                     "pair a fold or none")
  labels = verification.contiguous_folds(len(pairs), num_folds)
  return [dataclasses.replace(p, fold=int(f)) for p, f in zip(pairs, labels)]


def pair_fold_labels(pairs: Sequence[lists.FacePair]) -> list[int]:
  """The distinct fold labels of parsed pairs, ascending."""
  return sorted({p.fold for p in pairs})


def shard_face_set(shards, name: str, indices: Sequence[int]) -> FaceSet:
  """A :class:`FaceSet` of the faces at ``indices`` of a ``real_data.ShardSet`` (decoded)."""
  indices = np.asarray(indices, np.int64)
  return FaceSet(name, f"{shards.root} ({name})", shards.ids[indices], shards.ages[indices],
                 images=shards.images(indices))


# --- pair lists ----------------------------------------------------------------

def pair_folds(pairs: Sequence[lists.FacePair]) -> Optional[np.ndarray]:
  """Fold labels of parsed pairs, or None when the list defines none.

  Args:
    pairs: parsed pairs; ``fold == -1`` means "no fold given".

  Returns:
    int64 [N] labels, or None if every pair has -1 (contiguous folds are then
    used by the protocol).

  Raises:
    ValueError: if only some pairs have a fold (naming the first without).
  """
  folds = np.asarray([p.fold for p in pairs], np.int64)
  if (folds < 0).all():
    return None
  if (folds < 0).any():
    first = pairs[int(np.argmax(folds < 0))]
    raise ValueError(f"{first.source}: pair has no fold while others do; give "
                     "every pair a fold or none")
  return folds


def check_pair_files(pairs: Sequence[lists.FacePair]) -> None:
  """Fails before any compute if an image of the pair list is missing.

  Args:
    pairs: parsed pairs.

  Raises:
    FileNotFoundError: naming the count and the first missing files with the
      list lines that reference them.
  """
  missing = []
  for pair in pairs:
    missing += [(path, pair.source) for path in (pair.path1, pair.path2)
                if not os.path.isfile(path)]
  if missing:
    listed = "; ".join(f"{path} (pair at {source})" for path, source in missing[:5])
    raise FileNotFoundError(f"{len(missing)} image file(s) of the pair list are "
                            f"missing: {listed}")
