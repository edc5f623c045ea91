"""Parsers of annotation lists, verification pair lists and labelled names.

Every parser returns ``(entries, report)``: the parsed :class:`FaceRecord` or
:class:`FacePair` entries and a
:class:`~mtlface_jax.formats.report.ParseReport`.
A bad entry raises ``ValueError`` naming ``file:line`` (or the file), or, with
``skip_bad_examples=True``, is skipped and counted in the report.

Label conventions are those of the batch contract: ``id`` -1 = unknown,
``age`` in years (-1 = unknown), ``gender`` 1 male, 0 female, -1 unknown (the
SCAF lists' convention; UTKFace's names use the opposite and are flipped).
"""

import dataclasses
import os
from pathlib import Path
import re
from typing import Iterable, Sequence

import numpy as np

from mtlface_jax.formats import report as report_lib

# Ages above this are treated as label errors (UTKFace goes up to 116).
MAX_AGE = 120
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_TRUE_WORDS = {"1", "true", "same", "yes"}
_FALSE_WORDS = {"0", "-1", "false", "diff", "different", "no"}
_FGNET_NAME = re.compile(r"^(\d+)a(\d+)([a-z]?)\.\w+$", re.IGNORECASE)
_UTKFACE_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)_(\d+)((?:\.jpg\.chip)?\.jpg)$",
                           re.IGNORECASE)

Report = report_lib.ParseReport


@dataclasses.dataclass(frozen=True)
class FaceRecord:
  """One labelled image.

  Attributes:
    path: image path (joined with the image root when one was given).
    id: identity label, -1 unknown.
    age: age in years, -1 unknown.
    gender: 1 male, 0 female, -1 unknown.
    index: record index inside a container (``.rec``), -1 for plain files.
    source: ``file:line`` (or file) the entry came from, for error messages.
  """

  path: str
  id: int = -1
  age: float = -1.0
  gender: int = -1
  index: int = -1
  source: str = ""


@dataclasses.dataclass(frozen=True)
class FacePair:
  """One verification pair.

  Attributes:
    path1: first image.
    path2: second image.
    issame: whether both show the same person.
    fold: cross-validation fold, -1 if the list has none.
    source: ``file:line`` the pair came from.
  """

  path1: str
  path2: str
  issame: bool
  fold: int = -1
  source: str = ""


def records_to_arrays(records: Sequence[FaceRecord]) -> dict[str, np.ndarray]:
  """Records as column arrays (path str, id/gender int32, age float32)."""
  return {
      "path": np.array([r.path for r in records], dtype=str),
      "id": np.array([r.id for r in records], dtype=np.int32),
      "age": np.array([r.age for r in records], dtype=np.float32),
      "gender": np.array([r.gender for r in records], dtype=np.int32),
  }


def pairs_to_arrays(pairs: Sequence[FacePair]) -> dict[str, np.ndarray]:
  """Converts pairs to column arrays (paths str, issame bool, fold int32)."""
  return {
      "path1": np.array([p.path1 for p in pairs], dtype=str),
      "path2": np.array([p.path2 for p in pairs], dtype=str),
      "issame": np.array([p.issame for p in pairs], dtype=bool),
      "fold": np.array([p.fold for p in pairs], dtype=np.int32),
  }


def _join(root: str | os.PathLike | None, name: str) -> str:
  return os.path.join(root, name) if root is not None else name


def _read_lines(path: str | os.PathLike) -> list[str]:
  try:
    return Path(path).read_text(encoding="utf-8").splitlines()
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{path}: list file not found") from e
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not a UTF-8 text file ({e})") from e


def _parse_int(text: str, what: str) -> int:
  try:
    return int(text)
  except ValueError:
    raise ValueError(f"{what} {text!r} is not an integer") from None


def _parse_age(text: str, max_age: float) -> float:
  try:
    age = float(text)
  except ValueError:
    raise ValueError(f"age {text!r} is not a number") from None
  if age == -1:
    return -1.0
  if not 0 <= age <= max_age:
    raise ValueError(f"age {text} is outside [0, {max_age}] (or -1 = unknown)")
  return age


def _parse_gender(text: str) -> int:
  gender = _parse_int(text, "gender")
  if gender not in (-1, 0, 1):
    raise ValueError(f"gender {gender} is not 1 (male), 0 (female) or -1")
  return gender


def _parse_mtlface_line(line: str, num_ids: int | None,
                        max_age: float) -> tuple[int, str, float, int]:
  fields = line.split()
  if len(fields) != 4:
    raise ValueError(
        f"expected 4 fields 'id filename age gender', got {len(fields)}")
  label = _parse_int(fields[0], "id")
  if label < -1 or (num_ids is not None and label >= num_ids):
    upper = f"[0, {num_ids})" if num_ids is not None else ">= 0"
    raise ValueError(f"id {label} is out of range {upper} (or -1 = unknown)")
  return label, fields[1], _parse_age(fields[2], max_age), _parse_gender(
      fields[3])


def parse_mtlface_list(list_path: str | os.PathLike,
                       image_root: str | os.PathLike | None = None,
                       *,
                       num_ids: int | None = None,
                       max_age: float = MAX_AGE,
                       check_files: bool = False,
                       skip_bad_examples: bool = False
                       ) -> tuple[list[FaceRecord], Report]:
  """Parses an MTLFace/SCAF annotation list, lines ``id filename age gender``.

  Args:
    list_path: the list file (space separated; gender 1 male, 0 female).
    image_root: joined in front of each file name; None keeps names as is.
    num_ids: if given, ids must be below it.
    max_age: ages above this are errors.
    check_files: require each image file to exist.
    skip_bad_examples: count bad lines instead of raising.

  Returns:
    ``(records, report)``.

  Raises:
    ValueError: naming ``list_path:line`` for a malformed line, an
      out-of-range id/age/gender or a missing file, unless skipping.
  """
  report = Report()
  records = []
  for line_no, line in enumerate(_read_lines(list_path), 1):
    if not line.strip():
      continue
    where = f"{list_path}:{line_no}"
    try:
      label, name, age, gender = _parse_mtlface_line(line, num_ids, max_age)
      path = _join(image_root, name)
      if check_files and not os.path.isfile(path):
        raise ValueError(f"image file {path} not found")
    except ValueError as e:
      report_lib.handle_bad_entry(where, str(e), skip_bad_examples, report)
      continue
    records.append(FaceRecord(path, label, age, gender, source=where))
    report.add_ok()
  return records, report


def _lfw_header(lines: list[str], pairs_path) -> tuple[int, int]:
  header = lines[0].split() if lines else []
  try:
    numbers = [int(x) for x in header]
  except ValueError:
    numbers = []
  if len(numbers) == 1:  # pairsDevTrain/Test.txt: one fold of N + N pairs.
    numbers = [1, numbers[0]]
  if len(numbers) != 2 or min(numbers) < 1:
    raise ValueError(
        f"{pairs_path}:1: expected a header 'folds pairs_per_fold' like "
        f"'10 300', got {lines[0] if lines else ''!r}")
  return numbers[0], numbers[1]


def _lfw_image(root, name: str, number: str) -> str:
  return _join(root, os.path.join(name, f"{name}_{int(number):04d}.jpg"))


def _parse_lfw_line(fields: list[str], matched: bool, root) -> tuple[str, str]:
  if matched:
    if len(fields) != 3:
      raise ValueError(f"expected a matched pair 'name n1 n2', got "
                       f"{len(fields)} fields")
    name, n1, n2 = fields
    name1, name2 = name, name
  else:
    if len(fields) != 4:
      raise ValueError(f"expected a mismatched pair 'name1 n1 name2 n2', got "
                       f"{len(fields)} fields")
    name1, n1, name2, n2 = fields
  for number in (n1, n2):
    if _parse_int(number, "image number") < 1:
      raise ValueError(f"image number {number} must be >= 1")
  return _lfw_image(root, name1, n1), _lfw_image(root, name2, n2)


def parse_lfw_pairs(pairs_path: str | os.PathLike,
                    image_root: str | os.PathLike | None = None,
                    *,
                    check_files: bool = False,
                    skip_bad_examples: bool = False
                    ) -> tuple[list[FacePair], Report]:
  """Parses LFW's ``pairs.txt`` (View 2 protocol).

  The header ``F N`` (e.g. ``10 300``) is followed, for each of the ``F``
  folds, by ``N`` matched pairs ``name n1 n2`` then ``N`` mismatched pairs
  ``name1 n1 name2 n2``. Images resolve to
  ``<image_root>/<name>/<name>_%04d.jpg``.

  Args:
    pairs_path: the pairs file.
    image_root: the folder holding one folder per person.
    check_files: require both images of each pair to exist.
    skip_bad_examples: count bad lines instead of raising.

  Returns:
    ``(pairs, report)``; each pair carries its fold index.

  Raises:
    ValueError: naming ``pairs_path:line`` for a bad header, a wrong number
      of lines, a malformed line or a missing image, unless skipping.
  """
  lines = _read_lines(pairs_path)
  num_folds, per_fold = _lfw_header(lines, pairs_path)
  body = [(n, l) for n, l in enumerate(lines[1:], 2) if l.strip()]
  expected = num_folds * 2 * per_fold
  if len(body) != expected:
    raise ValueError(
        f"{pairs_path}: header promises {num_folds} folds x 2 x {per_fold} = "
        f"{expected} pairs, found {len(body)} lines")
  report = Report()
  pairs = []
  for position, (line_no, line) in enumerate(body):
    fold, within = divmod(position, 2 * per_fold)
    matched = within < per_fold
    where = f"{pairs_path}:{line_no}"
    try:
      path1, path2 = _parse_lfw_line(line.split(), matched, image_root)
      _check_pair_files(check_files, path1, path2)
    except ValueError as e:
      report_lib.handle_bad_entry(where, str(e), skip_bad_examples, report)
      continue
    pairs.append(FacePair(path1, path2, matched, fold, where))
    report.add_ok()
  return pairs, report


def _check_pair_files(check_files: bool, *paths: str) -> None:
  if check_files:
    for path in paths:
      if not os.path.isfile(path):
        raise ValueError(f"image file {path} not found")


def _parse_same(text: str) -> bool:
  word = text.lower()
  if word in _TRUE_WORDS:
    return True
  if word in _FALSE_WORDS:
    return False
  raise ValueError(f"same/different label {text!r} is not one of 1/0/-1/"
                   "true/false")


def parse_pair_list(list_path: str | os.PathLike,
                    image_root: str | os.PathLike | None = None,
                    *,
                    check_files: bool = False,
                    skip_bad_examples: bool = False
                    ) -> tuple[list[FacePair], Report]:
  """Parses a generic pair list, lines ``path1 path2 same [fold]``.

  ``same`` is 1/true/same for a matched pair and 0/-1/false/diff for a
  mismatched one (MTLFace's converted ``.bin`` lists use 1 / -1).

  Args:
    list_path: the list file.
    image_root: joined in front of both paths; None keeps them as is.
    check_files: require both images to exist.
    skip_bad_examples: count bad lines instead of raising.

  Returns:
    ``(pairs, report)``; fold is -1 where the line has none.

  Raises:
    ValueError: naming ``list_path:line``, unless skipping.
  """
  report = Report()
  pairs = []
  for line_no, line in enumerate(_read_lines(list_path), 1):
    if not line.strip():
      continue
    where = f"{list_path}:{line_no}"
    fields = line.split()
    try:
      if len(fields) not in (3, 4):
        raise ValueError(f"expected 'path1 path2 same [fold]', got "
                         f"{len(fields)} fields")
      issame = _parse_same(fields[2])
      fold = _parse_int(fields[3], "fold") if len(fields) == 4 else -1
      path1, path2 = (_join(image_root, f) for f in fields[:2])
      _check_pair_files(check_files, path1, path2)
    except ValueError as e:
      report_lib.handle_bad_entry(where, str(e), skip_bad_examples, report)
      continue
    pairs.append(FacePair(path1, path2, issame, fold, where))
    report.add_ok()
  return pairs, report


def parse_numbered_pairs(list_path: str | os.PathLike,
                         image_root: str | os.PathLike | None = None,
                         *,
                         num_folds: int = 10,
                         check_files: bool = False,
                         skip_bad_examples: bool = False
                         ) -> tuple[list[FacePair], Report]:
  """Parses a CACD-VS-style numbered pair list, lines ``n path1 path2 same``.

  Folds are assigned as in CACD-VS's 10-fold protocol: matched and
  mismatched pairs are each ordered by their number and cut into
  ``num_folds`` contiguous, equally sized chunks, so every fold is balanced.

  Args:
    list_path: the list file.
    image_root: joined in front of both paths.
    num_folds: number of folds.
    check_files: require both images to exist.
    skip_bad_examples: count bad lines instead of raising.

  Returns:
    ``(pairs ordered by number, report)``.

  Raises:
    ValueError: naming ``list_path:line`` for a malformed line, a duplicate
      pair number or a missing image, unless skipping.
  """
  report = Report()
  numbered: dict[int, FacePair] = {}
  for line_no, line in enumerate(_read_lines(list_path), 1):
    if not line.strip():
      continue
    where = f"{list_path}:{line_no}"
    fields = line.split()
    try:
      if len(fields) != 4:
        raise ValueError(f"expected 'number path1 path2 same', got "
                         f"{len(fields)} fields")
      number = _parse_int(fields[0], "pair number")
      if number in numbered:
        raise ValueError(f"pair number {number} repeats "
                         f"{numbered[number].source}")
      path1, path2 = (_join(image_root, f) for f in fields[1:3])
      _check_pair_files(check_files, path1, path2)
      pair = FacePair(path1, path2, _parse_same(fields[3]), -1, where)
    except ValueError as e:
      report_lib.handle_bad_entry(where, str(e), skip_bad_examples, report)
      continue
    numbered[number] = pair
    report.add_ok()
  ordered = [numbered[n] for n in sorted(numbered)]
  for issame in (True, False):
    group = [i for i, p in enumerate(ordered) if p.issame == issame]
    for rank, i in enumerate(group):
      fold = rank * num_folds // len(group)
      ordered[i] = dataclasses.replace(ordered[i], fold=fold)
  return ordered, report


def parse_fgnet_name(name: str) -> tuple[int, int]:
  """Parses an FG-NET file name such as ``001A02.JPG`` or ``001A43a.JPG``.

  Args:
    name: the base name.

  Returns:
    ``(person, age)``.

  Raises:
    ValueError: if the name does not follow the FG-NET pattern.
  """
  match = _FGNET_NAME.match(os.path.basename(name))
  if not match:
    raise ValueError(f"malformed FG-NET name {name!r} (expected like "
                     "001A02.JPG)")
  return int(match.group(1)), int(match.group(2))


def parse_utkface_name(name: str,
                       max_age: float = MAX_AGE) -> tuple[int, int, int]:
  """Parses a UTKFace name ``age_gender_race_datetime.jpg.chip.jpg``.

  Args:
    name: the base name.
    max_age: larger ages are errors.

  Returns:
    ``(age, gender, race)`` with gender converted to the SCAF convention
    (1 male, 0 female; UTKFace uses 0 male, 1 female).

  Raises:
    ValueError: for a malformed name or an out-of-range field.
  """
  match = _UTKFACE_NAME.match(os.path.basename(name))
  if not match:
    raise ValueError(f"malformed UTKFace name {name!r} (expected "
                     "age_gender_race_datetime.jpg.chip.jpg)")
  age, utk_gender, race = (int(match.group(i)) for i in (1, 2, 3))
  if age > max_age:
    raise ValueError(f"age {age} in {name!r} is above {max_age}")
  if utk_gender not in (0, 1):
    raise ValueError(f"gender {utk_gender} in {name!r} is not 0 or 1")
  if not 0 <= race <= 4:
    raise ValueError(f"race {race} in {name!r} is not in 0..4")
  return age, 1 - utk_gender, race


def list_image_files(folder: str | os.PathLike,
                     extensions: Iterable[str] = IMAGE_EXTENSIONS
                     ) -> list[Path]:
  """Image files directly inside ``folder``, sorted by name."""
  extensions = tuple(e.lower() for e in extensions)
  folder = Path(folder)
  if not folder.is_dir():
    raise FileNotFoundError(f"{folder}: folder not found")
  return sorted(p for p in folder.iterdir()
                if p.is_file() and p.name.lower().endswith(extensions))


def parse_utkface_folder(folder: str | os.PathLike, *,
                         max_age: float = MAX_AGE,
                         skip_bad_examples: bool = False
                         ) -> tuple[list[FaceRecord], Report]:
  """Labels every UTKFace image in ``folder`` from its name (no identities).

  Args:
    folder: folder of UTKFace images.
    max_age: larger ages are errors.
    skip_bad_examples: count malformed names instead of raising.

  Returns:
    ``(records with id -1, age and SCAF-convention gender, report)``.
  """
  report = Report()
  records = []
  for path in list_image_files(folder):
    try:
      age, gender, _ = parse_utkface_name(path.name, max_age)
    except ValueError as e:
      report_lib.handle_bad_entry(str(path), str(e), skip_bad_examples, report)
      continue
    records.append(FaceRecord(str(path), -1, float(age), gender,
                              source=str(path)))
    report.add_ok()
  return records, report


def parse_fgnet_folder(folder: str | os.PathLike, *,
                       skip_bad_examples: bool = False
                       ) -> tuple[list[FaceRecord], Report]:
  """Labels every FG-NET image in ``folder`` from its name.

  Args:
    folder: folder of FG-NET images (``001A02.JPG``...).
    skip_bad_examples: count malformed names instead of raising.

  Returns:
    ``(records, report)``; ``id`` is the person number of the name (FG-NET
    numbers people from 1), gender unknown (-1).
  """
  report = Report()
  records = []
  for path in list_image_files(folder):
    try:
      person, age = parse_fgnet_name(path.name)
    except ValueError as e:
      report_lib.handle_bad_entry(str(path), str(e), skip_bad_examples, report)
      continue
    records.append(FaceRecord(str(path), person, float(age), -1,
                              source=str(path)))
    report.add_ok()
  return records, report


def _subfolders(root: Path) -> list[Path]:
  if not root.is_dir():
    raise FileNotFoundError(f"{root}: folder not found")
  return sorted(p for p in root.iterdir() if p.is_dir())


def _report_loose_files(root: Path, skip_bad_examples: bool,
                        report: Report) -> None:
  """Images directly in ``root`` have no label folder: a bad entry each."""
  for path in list_image_files(root):
    report_lib.handle_bad_entry(str(path), "image is not inside a label folder",
                                skip_bad_examples, report)


def parse_identity_folders(root: str | os.PathLike, *,
                           skip_bad_examples: bool = False
                           ) -> tuple[list[FaceRecord], list[str], Report]:
  """Labels images in ``root/<identity>/<image>`` by their folder.

  Args:
    root: folder with one subfolder per identity (e.g. LFW's ``images``).
    skip_bad_examples: count images outside identity folders instead of
      raising.

  Returns:
    ``(records, identity names, report)``; ``id`` is the index of the
    folder name in the sorted names, age and gender unknown.
  """
  root = Path(root)
  report = Report()
  _report_loose_files(root, skip_bad_examples, report)
  names = [folder.name for folder in _subfolders(root)]
  records = []
  for label, name in enumerate(names):
    for path in list_image_files(root / name):
      records.append(FaceRecord(str(path), label, source=str(path)))
  report.add_ok(len(records))
  return records, names, report


def parse_age_folders(root: str | os.PathLike, *,
                      max_age: float = MAX_AGE,
                      skip_bad_examples: bool = False
                      ) -> tuple[list[FaceRecord], Report]:
  """Labels images in ``root/<age>/<image>`` by their folder's age.

  Args:
    root: folder with one subfolder per age in years (e.g. ``0``, ``27``).
    max_age: larger ages are errors.
    skip_bad_examples: count bad folders (all their images) instead of
      raising.

  Returns:
    ``(records with id -1, report)``.

  Raises:
    ValueError: naming the folder whose name is not an age, unless skipping.
  """
  root = Path(root)
  report = Report()
  _report_loose_files(root, skip_bad_examples, report)
  records = []
  for folder in _subfolders(root):
    files = list_image_files(folder)
    try:
      age = _parse_age(folder.name, max_age)
      if age < 0:
        raise ValueError("an age folder cannot be -1")
    except ValueError as e:
      for path in files or [folder]:
        report_lib.handle_bad_entry(str(path), f"bad age folder: {e}",
                                    skip_bad_examples, report)
      continue
    records.extend(
        FaceRecord(str(p), -1, age, -1, source=str(p)) for p in files)
    report.add_ok(len(files))
  return records, report
