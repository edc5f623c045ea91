"""Parsers of annotation lists, verification pair lists and labelled names.

Every parser returns ``(entries, report)``: the parsed :class:`FaceRecord` or
:class:`FacePair` entries and a
:class:`~mtlface_jax.formats.parse_report.ParseReport`.
A bad entry raises ``ValueError`` naming ``file:line`` (or the file), or, with
``skip_bad_examples=True``, is skipped and counted in the report.

Names that contain spaces are written in double quotes (``"a b.jpg"``) or in
tab-separated lines (:func:`split_fields`). A line that looks like another
pair-list format says which ``--pair_format`` fits; a file name that looks
like another naming scheme says which ``--folder_format`` fits.

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

from mtlface_jax import ages as ages_lib
from mtlface_jax.formats import parse_report

# Ages above this are label errors; the same range training accepts.
MAX_AGE = ages_lib.MAX_AGE
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_TRUE_WORDS = {"1", "true", "same", "yes"}
_FALSE_WORDS = {"0", "-1", "false", "diff", "different", "no"}
_FGNET_NAME = re.compile(r"^(\d+)a(\d+)([a-z]?)\.\w+$", re.IGNORECASE)
_UTKFACE_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)_(\d+)((?:\.jpg\.chip)?\.jpg)$",
                           re.IGNORECASE)

Report = parse_report.ParseReport


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
    subset: the subfolder below the identity folder an image was found in
      (``"y"`` for ``<person>/y/1.jpg``, ``"a/b"`` deeper), "" elsewhere; see
      :func:`parse_identity_folders`.
  """

  path: str
  id: int = -1
  age: float = -1.0
  gender: int = -1
  index: int = -1
  source: str = ""
  subset: str = ""


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
  """Records as column arrays (path/subset str, id/gender int32, age f32)."""
  return {
      "path": np.array([r.path for r in records], dtype=str),
      "id": np.array([r.id for r in records], dtype=np.int32),
      "age": np.array([r.age for r in records], dtype=np.float32),
      "gender": np.array([r.gender for r in records], dtype=np.int32),
      "subset": np.array([r.subset for r in records], dtype=str),
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


# A double-quoted name that ends its field, or a run of non-space characters.
_FIELD = re.compile(r'"([^"]*)"(?=\s|$)|(\S+)')
PAIR_FORMAT_LAYOUTS = {
    "lfw": "LFW pairs.txt: header 'folds pairs', then 'name n1 n2' and "
           "'name1 n1 name2 n2'",
    "generic": "'path1 path2 same [fold]'",
    "numbered": "'number path1 path2 same'",
}


def split_fields(line: str, counts: Sequence[int] = ()) -> list[str]:
  """Splits one list line into fields; names may contain spaces.

  Names with spaces are written either

  * in a tab-separated line (``a b.jpg<TAB>c d.jpg<TAB>1``): a line holding a
    tab is split at tabs (fields stripped, empty fields dropped) when that
    gives one of the accepted ``counts`` (any count if ``counts`` is empty), or
  * in double quotes (``"a b.jpg" "c d.jpg" 1``) on a whitespace-separated
    line. A quote opens a name only at the start of a field and its closing
    quote must end the field, so quotes inside names (``O"Neil.jpg``) are
    plain characters.

  Other lines split at whitespace, as they always did.

  Args:
    line: the line.
    counts: field counts the caller accepts (decides whether tabs separate).

  Returns:
    The fields, quotes removed.

  Raises:
    ValueError: for an unbalanced quote or an empty quoted name.
  """
  if "\t" in line:
    tabbed = [f.strip() for f in line.split("\t") if f.strip()]
    if not counts or len(tabbed) in counts:
      return tabbed
  if '"' not in line:
    return line.split()
  fields = []
  for match in _FIELD.finditer(line):
    quoted, plain = match.groups()
    if plain is not None and plain.startswith('"'):
      raise ValueError(f"unbalanced quote in {line.strip()!r}; quote a whole "
                       'name, e.g. "a b.jpg"')
    if quoted == "":
      raise ValueError(f"empty quoted name in {line.strip()!r}")
    fields.append(plain if quoted is None else quoted)
  return fields


def _field_count_error(expected: str, fields: Sequence[str], line: str,
                       max_count: int) -> ValueError:
  """A wrong-field-count error; suggests quoting when names may hold spaces."""
  message = f"expected {expected}, got {len(fields)} fields"
  if len(fields) > max_count and "\t" not in line and '"' not in line:
    message += ('; a name with spaces must be quoted ("a b.jpg") or the '
                "fields separated by tabs")
  return ValueError(message)


def _is_int(text: str) -> bool:
  try:
    int(text)
  except ValueError:
    return False
  return True


def _is_same_word(text: str) -> bool:
  return text.lower() in _TRUE_WORDS | _FALSE_WORDS


def _looks_like_path(text: str) -> bool:
  return "/" in text or text.lower().endswith(IMAGE_EXTENSIONS)


def guess_pair_format(fields: Sequence[str]) -> str | None:
  """The pair-list format (a key of ``PAIR_FORMAT_LAYOUTS``) a line looks like.

  Args:
    fields: the line's fields.

  Returns:
    "lfw", "generic" or "numbered", or None when the line fits none clearly.
  """
  n = len(fields)
  ints = [_is_int(f) for f in fields]
  if n == 2 and all(ints):
    return "lfw"  # The 'folds pairs' header.
  if n == 4 and ints[0] and _is_same_word(fields[3]) and not _is_same_word(
      fields[2]):
    return "numbered"
  if n == 3 and ints[1] and ints[2] and not _looks_like_path(fields[0]):
    return "lfw"  # A matched pair 'name n1 n2'.
  if (n == 4 and ints[1] and ints[3] and not ints[0] and not ints[2] and
      not _looks_like_path(fields[0]) and not _looks_like_path(fields[2])):
    return "lfw"  # A mismatched pair 'name1 n1 name2 n2'.
  if n in (3, 4) and not ints[0] and _is_same_word(fields[2]) and (
      n == 3 or ints[3]):
    return "generic"
  return None


def _with_format_hint(reason: str, fields: Sequence[str], own: str) -> str:
  """Appends which ``--pair_format`` fits when the line looks like another."""
  guess = guess_pair_format(fields)
  if guess is None or guess == own:
    return reason
  return (f"{reason}; this looks like a {guess!r} list "
          f"({PAIR_FORMAT_LAYOUTS[guess]}): use --pair_format={guess}")


def _refuse_wrong_format(pairs: Sequence["FacePair"], report: Report) -> None:
  """A list in another format is an input error even when skipping lines."""
  if not pairs and report.skipped and "--pair_format=" in report.skipped[0][1]:
    where, why = report.skipped[0]
    raise ValueError(f"{where}: {why}")


def _parse_mtlface_line(line: str, num_ids: int | None,
                        max_age: float) -> tuple[int, str, float, int]:
  fields = split_fields(line, (4,))
  if len(fields) != 4:
    raise _field_count_error("4 fields 'id filename age gender'", fields, line,
                             4)
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
      parse_report.handle_bad_entry(where, str(e), skip_bad_examples, report)
      continue
    records.append(FaceRecord(path, label, age, gender, source=where))
    report.add_ok()
  return records, report


def _lfw_header(lines: list[str], pairs_path) -> tuple[int, int]:
  header = split_fields(lines[0], (1, 2)) if lines else []
  try:
    numbers = [int(x) for x in header]
  except ValueError:
    numbers = []
  if len(numbers) == 1:  # pairsDevTrain/Test.txt: one fold of N + N pairs.
    numbers = [1, numbers[0]]
  if len(numbers) != 2 or min(numbers) < 1:
    reason = _with_format_hint(
        "expected a header 'folds pairs_per_fold' like '10 300', got "
        f"{lines[0] if lines else ''!r}", header, "lfw")
    raise ValueError(f"{pairs_path}:1: {reason}")
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
    fields = []
    try:
      fields = split_fields(line, (3,) if matched else (4,))
      path1, path2 = _parse_lfw_line(fields, matched, image_root)
      _check_pair_files(check_files, path1, path2)
    except ValueError as e:
      parse_report.handle_bad_entry(
          where, _with_format_hint(str(e), fields, "lfw"), skip_bad_examples,
          report)
      continue
    pairs.append(FacePair(path1, path2, matched, fold, where))
    report.add_ok()
  _refuse_wrong_format(pairs, report)
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
    fields = []
    try:
      fields = split_fields(line, (3, 4))
      if len(fields) not in (3, 4):
        raise _field_count_error("'path1 path2 same [fold]'", fields, line, 4)
      issame = _parse_same(fields[2])
      fold = _parse_int(fields[3], "fold") if len(fields) == 4 else -1
      path1, path2 = (_join(image_root, f) for f in fields[:2])
      _check_pair_files(check_files, path1, path2)
    except ValueError as e:
      parse_report.handle_bad_entry(
          where, _with_format_hint(str(e), fields, "generic"),
          skip_bad_examples, report)
      continue
    pairs.append(FacePair(path1, path2, issame, fold, where))
    report.add_ok()
  _refuse_wrong_format(pairs, report)
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
    fields = []
    try:
      fields = split_fields(line, (4,))
      if len(fields) != 4:
        raise _field_count_error("'number path1 path2 same'", fields, line, 4)
      number = _parse_int(fields[0], "pair number")
      if number in numbered:
        raise ValueError(f"pair number {number} repeats "
                         f"{numbered[number].source}")
      path1, path2 = (_join(image_root, f) for f in fields[1:3])
      _check_pair_files(check_files, path1, path2)
      pair = FacePair(path1, path2, _parse_same(fields[3]), -1, where)
    except ValueError as e:
      parse_report.handle_bad_entry(
          where, _with_format_hint(str(e), fields, "numbered"),
          skip_bad_examples, report)
      continue
    numbered[number] = pair
    report.add_ok()
  _refuse_wrong_format(numbered, report)
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
    hint = ("; this looks like a UTKFace name: use --folder_format=utkface"
            if _UTKFACE_NAME.match(os.path.basename(name)) else "")
    raise ValueError(f"malformed FG-NET name {name!r} (expected like "
                     f"001A02.JPG){hint}")
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
    hint = ("; this looks like an FG-NET name (person A age): use "
            "--folder_format=fgnet" if _FGNET_NAME.match(os.path.basename(name))
            else "")
    raise ValueError(f"malformed UTKFace name {name!r} (expected "
                     f"age_gender_race_datetime.jpg.chip.jpg){hint}")
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


def _named_images(folder: str | os.PathLike, scheme: str) -> list[Path]:
  """Images directly in ``folder``; none there but some below is an error.

  Names carry the labels only for files directly inside ``folder``; a
  folder of folders is most likely one folder per person.
  """
  files = list_image_files(folder)
  if not files:
    nested = next((p for p in Path(folder).rglob("*") if p.is_file()
                   and p.name.lower().endswith(IMAGE_EXTENSIONS)), None)
    if nested is not None:
      raise ValueError(
          f"{folder}: no images directly in the folder for {scheme} names, "
          f"but subfolders hold some (e.g. {nested}); for one folder per "
          "person use --folder_format=identity")
  return files


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
  for path in _named_images(folder, "UTKFace"):
    try:
      age, gender, _ = parse_utkface_name(path.name, max_age)
    except ValueError as e:
      parse_report.handle_bad_entry(str(path), str(e), skip_bad_examples, report)
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
  for path in _named_images(folder, "FG-NET"):
    try:
      person, age = parse_fgnet_name(path.name)
    except ValueError as e:
      parse_report.handle_bad_entry(str(path), str(e), skip_bad_examples, report)
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
    parse_report.handle_bad_entry(str(path), "image is not inside a label folder",
                                skip_bad_examples, report)


NESTED_MODES = ("include", "refuse")


def _images_below(folder: Path) -> list[tuple[Path, str]]:
  """``(image, subfolder)`` of every image at any depth below ``folder``.

  The subfolder is relative to ``folder`` in POSIX form ("" for images
  directly inside). Folders whose names start with "." (``.ipynb_checkpoints``
  and the like) are not entered; symbolic links to folders are not followed.
  Sorted by subfolder ("" first), then file name.
  """
  found = []
  for parent, dirs, files in os.walk(folder):
    dirs[:] = [d for d in dirs if not d.startswith(".")]
    subset = Path(parent).relative_to(folder).as_posix()
    subset = "" if subset == "." else subset
    found.extend((Path(parent) / f, subset) for f in files
                 if f.lower().endswith(IMAGE_EXTENSIONS))
  return sorted(found, key=lambda item: (item[1], item[0].name))


def parse_identity_folders(root: str | os.PathLike, *,
                           skip_bad_examples: bool = False,
                           nested: str = "include"
                           ) -> tuple[list[FaceRecord], list[str], Report]:
  """Labels images in ``root/<identity>/...`` by their identity folder.

  Every image below an identity folder belongs to that identity, at any
  depth: ``bob/1.jpg``, ``bob/y/2.jpg`` and ``bob/y/2001/3.jpg`` are all
  ``bob``'s. ``FaceRecord.subset`` keeps the subfolder ("", "y", "y/2001"),
  so sets laid out as ``<person>/`` plus ``<person>/y/`` (old and young
  photos) can be split with :func:`select_subsets`; :func:`subset_counts`
  tells how many images and identities each subfolder holds.

  Args:
    root: folder with one subfolder per identity (e.g. LFW's ``images``).
    skip_bad_examples: count bad images (directly in ``root``, or nested
      ones when refused) instead of raising.
    nested: "include" (the default) or "refuse": an image in a subfolder of
      an identity folder is then a bad entry, for layouts whose subfolders
      are not the same person.

  Returns:
    ``(records, identity names, report)``; ``id`` is the index of the
    folder name in the sorted names, age and gender unknown. Records are
    grouped by identity, then subfolder ("" first), then file name.

  Raises:
    ValueError: naming an image outside any identity folder (or a refused
      nested one), unless skipping; for an unknown ``nested``.
  """
  if nested not in NESTED_MODES:
    raise ValueError(f"nested must be one of {NESTED_MODES}, got {nested!r}")
  root = Path(root)
  report = Report()
  _report_loose_files(root, skip_bad_examples, report)
  names = [folder.name for folder in _subfolders(root)
           if not folder.name.startswith(".")]
  records = []
  for label, name in enumerate(names):
    for path, subset in _images_below(root / name):
      if subset and nested == "refuse":
        parse_report.handle_bad_entry(
            str(path), f"image is in subfolder {subset!r} of identity folder "
            f"{name!r} (nested folders refused)", skip_bad_examples, report)
        continue
      records.append(FaceRecord(str(path), label, source=str(path),
                                subset=subset))
  report.add_ok(len(records))
  return records, names, report


def subset_counts(records: Sequence[FaceRecord]) -> dict[str, dict[str, int]]:
  """How many images and identities each subfolder holds.

  Args:
    records: from :func:`parse_identity_folders`.

  Returns:
    ``{"images": {subset: count}, "identities": {subset: count}}`` with
    subsets in sorted order ("" = images directly in identity folders).
  """
  images, identities = {}, {}
  for record in records:
    images[record.subset] = images.get(record.subset, 0) + 1
    identities.setdefault(record.subset, set()).add(record.id)
  order = sorted(images)
  return {"images": {k: images[k] for k in order},
          "identities": {k: len(identities[k]) for k in order}}


def select_subsets(records: Sequence[FaceRecord],
                   subsets: Iterable[str]) -> list[FaceRecord]:
  """The records found in one of ``subsets`` ("" = directly in the folder).

  E.g. ``select_subsets(records, [""])`` and ``select_subsets(records,
  ["y"])`` make the old and young halves of a ``<person>/`` + ``<person>/y/``
  set, a gallery and its probes.

  Raises:
    ValueError: naming the subsets present when a requested one has no image.
  """
  wanted = set(subsets)
  present = {r.subset for r in records}
  missing = sorted(wanted - present)
  if missing:
    raise ValueError(f"no images in subfolder(s) {missing}; the identity "
                     f"folders hold {sorted(present)} ('' = directly inside)")
  return [r for r in records if r.subset in wanted]


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
        parse_report.handle_bad_entry(str(path), f"bad age folder: {e}",
                                    skip_bad_examples, report)
      continue
    records.extend(
        FaceRecord(str(p), -1, age, -1, source=str(p)) for p in files)
    report.add_ok(len(files))
  return records, report
