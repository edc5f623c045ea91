"""insightface/MXNet RecordIO (``.rec`` + ``.idx``) reader and writer, no MXNet.

File format (dmlc-core ``recordio``): each record is

  uint32 magic 0xced7230a | uint32 lrec | payload | zero padding to 4 bytes

where ``lrec``'s top 3 bits are a continuation flag and its low 29 bits the
payload length. A payload that itself contains the magic word at a 4-byte
aligned position is split there into parts (flag 1 = first, 2 = middle,
3 = last; 0 = a whole record) and the magic word is dropped; the reader puts
it back between the parts.

An image record's payload (MXNet ``recordio.pack``) starts with the IRHeader,
struct ``<IfQQ``: flag, label, id, id2. If ``flag > 0``, ``flag`` float32 labels
follow the header (and the header's own label field is unused), then the
encoded image bytes.

insightface training sets: record 0's header holds ``label = [start, end)``,
the record indices of the identity header records; the images are records
``1 .. start-1``; identity header record ``start + k`` has
``label = [first, end)``, the image records of identity ``k``.

The ``.idx`` file has one ``index<TAB>offset`` line per record.
"""

import dataclasses
import os
from pathlib import Path
import re
import struct
import threading
from typing import Iterable, Iterator, Sequence

import numpy as np

from mtlface_jax.formats import images as images_lib
from mtlface_jax.formats import lists as lists_lib
from mtlface_jax.formats import parse_report

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LENGTH_BITS = 29
_LENGTH_MASK = (1 << _LENGTH_BITS) - 1
_IR_FORMAT = "<IfQQ"
IR_HEADER_SIZE = struct.calcsize(_IR_FORMAT)  # 24 bytes.
# Flags of the parts of a split record (dmlc-core's cflag).
_WHOLE, _FIRST, _MIDDLE, _LAST = 0, 1, 2, 3
# SCAF-style file names of images extracted from a .rec: label/record.jpg.
_SCAF_NAME = re.compile(r"^(\d+)/(\d+)\.\w+$")


class RecordIOError(ValueError):
  """A record could not be read or parsed."""


@dataclasses.dataclass(frozen=True)
class IRHeader:
  """MXNet image-record header.

  Attributes:
    flag: number of float labels after the header (0: one label in
      ``label``).
    label: the label: a float if ``flag == 0``, else a float32 array.
    id: record id.
    id2: second id (usually 0).
  """

  flag: int
  label: float | np.ndarray
  id: int = 0
  id2: int = 0

  @property
  def labels(self) -> np.ndarray:
    """The label(s) as a 1-D float32 array."""
    return np.atleast_1d(np.asarray(self.label, dtype=np.float32))


def pack(label: float | Sequence[float], payload: bytes, record_id: int = 0,
         id2: int = 0) -> bytes:
  """Packs a header and payload like ``mxnet.recordio.pack``.

  Args:
    label: a scalar label (stored in the header, flag 0) or a sequence of
      float labels (flag = their count, stored after the header).
    payload: the bytes after the header (usually an encoded image).
    record_id: the header's id.
    id2: the header's second id.

  Returns:
    The record payload.
  """
  if np.ndim(label) == 0:
    header = struct.pack(_IR_FORMAT, 0, float(label), record_id, id2)
    return header + payload
  labels = np.asarray(label, dtype="<f4").ravel()
  if labels.size == 0:
    raise ValueError("a label sequence must not be empty")
  header = struct.pack(_IR_FORMAT, labels.size, 0.0, record_id, id2)
  return header + labels.tobytes() + payload


def unpack(record: bytes, source: str = "<record>") -> tuple[IRHeader, bytes]:
  """Splits a record payload into its IRHeader and the remaining bytes.

  Args:
    record: a record payload as stored in a ``.rec``.
    source: where the record came from, for error messages.

  Returns:
    ``(header, payload)``.

  Raises:
    RecordIOError: naming ``source`` if the record is too short.
  """
  if len(record) < IR_HEADER_SIZE:
    raise RecordIOError(
        f"{source}: record of {len(record)} bytes is shorter than the "
        f"{IR_HEADER_SIZE}-byte IRHeader")
  flag, label, record_id, id2 = struct.unpack_from(_IR_FORMAT, record)
  payload = record[IR_HEADER_SIZE:]
  if flag > 0:
    if len(payload) < 4 * flag:
      raise RecordIOError(
          f"{source}: header announces {flag} float labels but only "
          f"{len(payload)} bytes follow")
    labels = np.frombuffer(payload, dtype="<f4", count=flag).astype(np.float32)
    return IRHeader(flag, labels, record_id, id2), payload[4 * flag:]
  return IRHeader(flag, label, record_id, id2), payload


def _encode_record(payload: bytes) -> bytes:
  """Frames a payload as dmlc-core does, splitting at embedded magic words."""
  if len(payload) > _LENGTH_MASK:
    raise ValueError(f"record of {len(payload)} bytes exceeds 2^29 - 1")
  chunks = []
  start = 0
  for pos in range(0, len(payload) - len(payload) % 4, 4):
    if payload[pos:pos + 4] == _MAGIC_BYTES:
      flag = _FIRST if start == 0 else _MIDDLE
      chunks.append(_MAGIC_BYTES +
                    struct.pack("<I", (flag << _LENGTH_BITS) | (pos - start)))
      chunks.append(payload[start:pos])  # start and pos are 4-aligned.
      start = pos + 4
  flag = _LAST if start else _WHOLE
  tail = payload[start:]
  chunks.append(_MAGIC_BYTES +
                struct.pack("<I", (flag << _LENGTH_BITS) | len(tail)))
  chunks.append(tail + b"\0" * (-len(tail) % 4))
  return b"".join(chunks)


class RecordIOWriter:
  """Writes a ``.rec`` file and its ``.idx`` index.

  Use as a context manager, or call :meth:`close`.
  """

  def __init__(self, rec_path: str | os.PathLike,
               idx_path: str | os.PathLike | None = None):
    """Opens the files for writing (truncating them).

    Args:
      rec_path: the ``.rec`` file.
      idx_path: the ``.idx`` file; defaults to ``rec_path`` with ``.idx``.
    """
    self.rec_path = Path(rec_path)
    self.idx_path = Path(idx_path) if idx_path else self.rec_path.with_suffix(
        ".idx")
    self._rec = open(self.rec_path, "wb")
    self._idx = open(self.idx_path, "w", encoding="ascii")
    self._written: set[int] = set()

  def write(self, index: int, record: bytes) -> None:
    """Appends a record and indexes it under ``index``.

    Args:
      index: the record's key in the ``.idx`` (unique).
      record: the payload (see :func:`pack`).
    """
    if index in self._written:
      raise ValueError(f"{self.idx_path}: index {index} written twice")
    self._written.add(index)
    offset = self._rec.tell()
    self._rec.write(_encode_record(record))
    self._idx.write(f"{index}\t{offset}\n")

  def close(self) -> None:
    """Flushes and closes both files."""
    self._rec.close()
    self._idx.close()

  def __enter__(self) -> "RecordIOWriter":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def write_insightface_rec(rec_path: str | os.PathLike,
                          labels: Sequence[int],
                          encoded_images: Sequence[bytes]) -> None:
  """Writes an insightface-style training ``.rec``/``.idx`` pair.

  Record 0 holds the identity range, records ``1..N`` the images (label =
  identity), then one identity header record per identity. Images of one
  identity must be contiguous, as in insightface's files.

  Args:
    rec_path: the ``.rec`` file (the ``.idx`` goes beside it).
    labels: identity label of each image, non-decreasing from 0.
    encoded_images: encoded image bytes, one per label.
  """
  if len(labels) != len(encoded_images):
    raise ValueError("labels and encoded_images differ in length")
  labels = [int(x) for x in labels]
  if any(b < a for a, b in zip(labels, labels[1:])):
    raise ValueError("labels must be non-decreasing (identities contiguous)")
  num_images = len(labels)
  identities = sorted(set(labels))
  id_start = num_images + 1
  with RecordIOWriter(rec_path) as writer:
    writer.write(0, pack([id_start, id_start + len(identities)], b""))
    for index, (label, data) in enumerate(zip(labels, encoded_images), 1):
      writer.write(index, pack(float(label), data, record_id=index))
    for k, identity in enumerate(identities):
      first = labels.index(identity) + 1
      last = num_images - labels[::-1].index(identity)
      writer.write(id_start + k, pack([first, last + 1], b""))


class RecordIOReader:
  """Random-access and sequential reader of an indexed ``.rec`` file.

  Safe to use from several threads: reads use ``os.pread`` (or a lock where
  that is unavailable).
  """

  def __init__(self, rec_path: str | os.PathLike,
               idx_path: str | os.PathLike | None = None):
    """Opens a ``.rec`` and reads its index.

    Args:
      rec_path: the ``.rec`` file.
      idx_path: its ``.idx``; defaults to ``rec_path`` with ``.idx``. If that
        file does not exist the ``.rec`` is scanned to build the index.

    Raises:
      FileNotFoundError: if the ``.rec`` is missing.
      RecordIOError: if the index is malformed.
    """
    self.rec_path = Path(rec_path)
    if not self.rec_path.is_file():
      raise FileNotFoundError(f"{self.rec_path}: RecordIO file not found")
    default_idx = self.rec_path.with_suffix(".idx")
    self.idx_path = Path(idx_path) if idx_path else default_idx
    self._fd = os.open(self.rec_path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    self._size = os.fstat(self._fd).st_size
    self._lock = threading.Lock()
    if idx_path is None and not default_idx.exists():
      self._offsets = self._scan_offsets()
    else:
      self._offsets = self._read_index()
    self.keys = sorted(self._offsets)

  def _read_index(self) -> dict[int, int]:
    offsets = {}
    try:
      lines = self.idx_path.read_text(encoding="ascii").splitlines()
    except FileNotFoundError as e:
      raise FileNotFoundError(f"{self.idx_path}: index file not found") from e
    for line_no, line in enumerate(lines, 1):
      if not line.strip():
        continue
      fields = line.split()
      try:
        index, offset = int(fields[0]), int(fields[1])
        if len(fields) != 2 or offset < 0:
          raise ValueError
      except (ValueError, IndexError):
        # An offset past the end is left to read time, which names the record
        # as truncated while the others stay readable.
        raise RecordIOError(
            f"{self.idx_path}:{line_no}: expected 'index<TAB>offset' with "
            f"non-negative integers, got {line!r}") from None
      if index in offsets:
        raise RecordIOError(
            f"{self.idx_path}:{line_no}: duplicate index {index}")
      offsets[index] = offset
    return offsets

  def _scan_offsets(self) -> dict[int, int]:
    """Builds an index by walking the records (for a .rec with no .idx)."""
    offsets = {}
    position = 0
    while position < self._size:
      offsets[len(offsets)] = position
      _, position = self._read_at(position, f"record {len(offsets) - 1}")
    return offsets

  def _pread(self, size: int, offset: int) -> bytes:
    if hasattr(os, "pread"):
      return os.pread(self._fd, size, offset)
    with self._lock:
      os.lseek(self._fd, offset, os.SEEK_SET)
      return os.read(self._fd, size)

  def _read_at(self, offset: int, what: str) -> tuple[bytes, int]:
    """Reads the (possibly multi-part) record at ``offset``.

    Returns:
      ``(payload, offset just past the record)``.
    """
    parts = []
    while True:
      head = self._pread(8, offset)
      where = f"{self.rec_path}: {what} at offset {offset}"
      if len(head) < 8:
        raise RecordIOError(f"{where}: truncated record header")
      magic, lrec = struct.unpack("<II", head)
      if magic != MAGIC:
        raise RecordIOError(
            f"{where}: bad magic 0x{magic:08x} (expected 0x{MAGIC:08x})")
      flag, length = lrec >> _LENGTH_BITS, lrec & _LENGTH_MASK
      data = self._pread(length, offset + 8)
      if len(data) < length:
        raise RecordIOError(f"{where}: truncated record data")
      parts.append(data)
      offset += 8 + length + (-length % 4)
      if flag in (_WHOLE, _LAST):
        return _MAGIC_BYTES.join(parts), offset
      if flag not in (_FIRST, _MIDDLE):
        raise RecordIOError(f"{where}: invalid continuation flag {flag}")

  def __len__(self) -> int:
    return len(self._offsets)

  def __contains__(self, index: int) -> bool:
    return index in self._offsets

  def read_raw(self, index: int) -> bytes:
    """Returns the payload of record ``index``.

    Raises:
      KeyError: if the index is not in the ``.idx``.
      RecordIOError: naming the file and index if the record is unreadable.
    """
    if index not in self._offsets:
      raise KeyError(f"{self.idx_path}: no record with index {index}")
    payload, _ = self._read_at(self._offsets[index], f"record {index}")
    return payload

  def read(self, index: int) -> tuple[IRHeader, bytes]:
    """Returns ``(header, payload after the header)`` of record ``index``."""
    return unpack(self.read_raw(index), f"{self.rec_path}: record {index}")

  def read_header(self, index: int) -> IRHeader:
    """Returns the IRHeader of record ``index`` without reading its image.

    Only the header bytes are read for an ordinary (single-part) record, so
    checking labels of millions of records stays cheap.
    """
    if index not in self._offsets:
      raise KeyError(f"{self.idx_path}: no record with index {index}")
    offset = self._offsets[index]
    head = self._pread(8 + IR_HEADER_SIZE, offset)
    if len(head) == 8 + IR_HEADER_SIZE:
      magic, lrec, label_count = struct.unpack_from("<III", head)
      length = lrec & _LENGTH_MASK
      needed = IR_HEADER_SIZE + 4 * label_count
      if (magic == MAGIC and lrec >> _LENGTH_BITS == _WHOLE and
          needed <= length):
        data = head[8:] if label_count == 0 else self._pread(needed, offset + 8)
        return unpack(data, f"{self.rec_path}: record {index}")[0]
    # Multi-part or damaged records: the full read decodes or names the error.
    return self.read(index)[0]

  def read_image(self, index: int) -> tuple[IRHeader, np.ndarray]:
    """Returns ``(header, RGB uint8 image)`` of record ``index``.

    Raises:
      RecordIOError: naming the file and index if the record or its image is
        unreadable.
    """
    header, payload = self.read(index)
    try:
      image = images_lib.decode_image_bytes(
          payload, f"{self.rec_path}: record {index}")
    except images_lib.ImageDecodeError as e:
      raise RecordIOError(str(e)) from e
    return header, image

  def __iter__(self) -> Iterator[tuple[int, IRHeader, bytes]]:
    """Yields ``(index, header, payload)`` for every record in index order."""
    for index in self.keys:
      header, payload = self.read(index)
      yield index, header, payload

  def identity_range(self) -> tuple[int, int] | None:
    """Returns record 0's ``[start, end)`` of identity records, if present.

    Only an insightface header record counts: at least two whole-number
    labels with ``1 <= start <= end`` and no image after them. Files whose
    record 0 is an ordinary image (e.g. labels ``[id, age, gender]``) have
    none.
    """
    if 0 not in self._offsets:
      return None
    header, payload = self.read(0)
    if header.flag < 2 or payload:
      return None
    start, end = (float(x) for x in header.labels[:2])
    if start != int(start) or end != int(end) or not 1 <= start <= end:
      return None
    return int(start), int(end)

  def missing_records(self) -> list[int]:
    """Records the insightface header promises that the ``.idx`` lacks.

    Record 0 says the file holds records ``0 .. end-1`` (images, then one
    header per identity); an ``.idx`` that is shorter (a cut copy, a lost
    last line) would otherwise drop those records silently.

    Returns:
      The missing indices, ascending; [] without an insightface header.
    """
    id_range = self.identity_range()
    if id_range is None:
      return []
    return [k for k in range(id_range[1]) if k not in self._offsets]

  def image_indices(self, skip_bad_examples: bool = False,
                    report: parse_report.ParseReport | None = None
                    ) -> list[int]:
    """Indices of the image records.

    With insightface's record 0 these are ``1 .. start-1``; otherwise every
    indexed record. Records that record 0 promises but the ``.idx`` lacks
    (see :meth:`missing_records`) are an error, or with
    ``skip_bad_examples`` one skipped entry each in ``report``.

    Raises:
      RecordIOError: naming both files and both counts, unless skipping.
    """
    id_range = self.identity_range()
    if id_range is None:
      return list(self.keys)
    missing = self.missing_records()
    if missing and not skip_bad_examples:
      shown = ", ".join(map(str, missing[:10])) + (
          f" and {len(missing) - 10} more" if len(missing) > 10 else "")
      raise RecordIOError(
          f"{self.idx_path} indexes {len(self._offsets)} records but record 0 "
          f"of {self.rec_path} says there are {id_range[1]} (images 1-"
          f"{id_range[0] - 1}, identity records {id_range[0]}-"
          f"{id_range[1] - 1}); missing: {shown}. Rebuild the .idx (without "
          "it the .rec is scanned) or skip the missing records with "
          "skip_bad_examples")
    for index in missing:
      parse_report.handle_bad_entry(
          f"{self.rec_path}: record {index}",
          f"not in {self.idx_path} (record 0 says {id_range[1]} records exist)",
          skip_bad_examples, report)
    return [k for k in self.keys if 1 <= k < id_range[0]]

  def close(self) -> None:
    """Closes the file."""
    if self._fd >= 0:
      os.close(self._fd)
      self._fd = -1

  def __enter__(self) -> "RecordIOReader":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def __del__(self):
    # Best effort for readers that are never closed explicitly.
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass


def image_label(header: IRHeader) -> int:
  """The identity label of an image record (first label if several)."""
  return int(header.labels[0])


def iter_images(reader: RecordIOReader,
                indices: Iterable[int] | None = None,
                skip_bad_examples: bool = False,
                report: parse_report.ParseReport | None = None
                ) -> Iterator[tuple[int, int, np.ndarray]]:
  """Yields ``(index, label, RGB image)`` for image records.

  Args:
    reader: an open reader.
    indices: records to read; default :meth:`RecordIOReader.image_indices`.
    skip_bad_examples: count unreadable records in ``report`` instead of
      raising.
    report: receives counts; a fresh one is used if None.

  Yields:
    ``(record index, identity label, [H, W, 3] uint8 image)``.
  """
  report = report if report is not None else parse_report.ParseReport()
  if indices is None:
    indices = reader.image_indices(skip_bad_examples, report)
  for index in indices:
    try:
      header, image = reader.read_image(index)
    except (RecordIOError, KeyError) as e:
      parse_report.handle_bad_entry(f"{reader.rec_path}: record {index}",
                                  f"unreadable record: {e}", skip_bad_examples,
                                  report)
      continue
    report.add_ok()
    yield index, image_label(header), image


def scaf_name(label: int, index: int) -> str:
  """The SCAF-style name ``LLLLLL/IIIIIIII.jpg`` of record ``index``."""
  return f"{label:06d}/{index:08d}.jpg"


def parse_scaf_name(name: str) -> tuple[int, int]:
  """Parses ``LLLLLL/IIIIIIII.jpg`` into ``(label, record index)``.

  Raises:
    ValueError: if the name does not have that form.
  """
  match = _SCAF_NAME.match(name.replace("\\", "/"))
  if not match:
    raise ValueError(
        f"file name {name!r} is not of the form LLLLLL/IIIIIIII.jpg")
  return int(match.group(1)), int(match.group(2))


def join_scaf_list(reader: RecordIOReader,
                   records: Sequence[lists_lib.FaceRecord],
                   skip_bad_examples: bool = False,
                   report: parse_report.ParseReport | None = None,
                   check_labels: bool = True
                   ) -> tuple[list[lists_lib.FaceRecord],
                              parse_report.ParseReport]:
  """Joins an annotation list with the records of a ``.rec``.

  The list's file names are ``LLLLLL/IIIIIIII.jpg``: the zero-padded identity
  label in the ``.rec`` and the record index (as written by MTLFace's
  ``convert_insightface.py``). The list's own id, age and gender are kept; the
  record index is stored in ``FaceRecord.index``.

  Args:
    reader: the ``.rec`` the list refers to.
    records: parsed list entries (see ``lists.parse_mtlface_list``).
    skip_bad_examples: count bad entries instead of raising.
    report: receives counts; a fresh one is made if None.
    check_labels: read each record's header and require its label to equal
      the ``LLLLLL`` of the name, so that a list that belongs to another
      ``.rec`` cannot silently attach wrong labels.

  Returns:
    ``(joined records, report)``.

  Raises:
    ValueError: naming the list entry, for a bad name, a record missing from
      the ``.idx`` or a label mismatch, unless skipping.
  """
  report = report if report is not None else parse_report.ParseReport()
  joined = []
  for record in records:
    where = record.source or record.path
    try:
      label, index = parse_scaf_name(record.path)
      if index not in reader:
        raise ValueError(f"record {index} is not in {reader.idx_path}")
      if check_labels:
        stored = image_label(reader.read_header(index))
        if stored != label:
          raise ValueError(
              f"record {index} of {reader.rec_path} has label {stored}, "
              f"the name says {label}")
    except ValueError as e:
      parse_report.handle_bad_entry(where, str(e), skip_bad_examples, report)
      continue
    joined.append(dataclasses.replace(record, index=index))
    report.add_ok()
  return joined, report
