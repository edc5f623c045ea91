"""insightface ``.bin`` verification sets, read with a restricted unpickler.

A ``.bin`` (``lfw.bin``, ``agedb_30.bin``, ``cfp_fp.bin``...) is a pickle of
``(bins, issame_list)``: ``2 * N`` encoded images (JPEG/PNG bytes; image ``2k``
and ``2k+1`` form pair ``k``) and ``N`` booleans. Unpickling an untrusted file
with :mod:`pickle` can run arbitrary code, so :class:`RestrictedUnpickler`
resolves only the few globals such files legitimately contain (the byte
re-encoding helper Python 3 uses for protocol-2 ``bytes``, and numpy's array
and scalar reconstruction) and refuses everything else before anything runs.
"""

import codecs
import io
import os
from pathlib import Path
import pickle
from typing import Sequence

import numpy as np

from mtlface_jax.formats import images as images_lib
from mtlface_jax.formats import parse_report


class UnsafePickleError(pickle.UnpicklingError):
  """A pickle referenced a global that is not on the allow-list."""


class _TextEncode:
  """Stands in for ``_codecs.encode`` with only the codecs pickle uses.

  Python 3 pickles ``bytes`` at protocol <= 2 as ``_codecs.encode(str,
  'latin1')``; any other codec is refused. A slotted instance rather than a
  function, so that a pickle's BUILD opcode cannot set attributes on it.
  """

  __slots__ = ()

  def __call__(self, text: str, encoding: str = "utf-8",
               errors: str = "strict") -> bytes:
    if codecs.lookup(encoding).name not in ("latin-1", "iso8859-1", "utf-8"):
      raise UnsafePickleError(f"refused _codecs.encode with codec {encoding!r}")
    return codecs.encode(text, encoding, errors)


def _numpy_reconstructors() -> dict[tuple[str, str], object]:
  """The numpy callables that array/scalar pickles reference.

  They are taken from numpy's own ``__reduce__`` results, so the allow-list is
  right for numpy 1.x (``numpy.core``) and 2.x (``numpy._core``) alike; both
  module spellings map to them because files outlive numpy versions.
  """
  reconstruct = np.ndarray((0,), np.uint8).__reduce__()[0]
  scalar = np.float32(0).__reduce__()[0]
  frombuffer = np.arange(2).__reduce_ex__(5)[0]
  allowed = {}
  for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    allowed[(module, "_reconstruct")] = reconstruct
    allowed[(module, "scalar")] = scalar
  for module in ("numpy.core.numeric", "numpy._core.numeric"):
    allowed[(module, "_frombuffer")] = frombuffer
  allowed[("numpy", "ndarray")] = np.ndarray
  allowed[("numpy", "dtype")] = np.dtype
  return allowed


# Everything else, notably copyreg's reconstructors (which instantiate any
# class) and every callable that touches the system, is refused.
_ALLOWED_GLOBALS = {
    ("_codecs", "encode"): _TextEncode(),
    ("builtins", "bytes"): bytes,
    ("builtins", "bytearray"): bytearray,
    ("__builtin__", "bytearray"): bytearray,
    **_numpy_reconstructors(),
}


class RestrictedUnpickler(pickle.Unpickler):
  """Unpickler that resolves only an allow-list of harmless globals."""

  def __init__(self, file, source: str = "<pickle>"):
    """Wraps ``file``.

    Args:
      file: binary file object positioned at the pickle.
      source: name used in error messages.
    """
    # encoding="bytes" keeps Python-2 ``str`` (the encoded images in old
    # insightface files) as bytes instead of decoding them as text.
    super().__init__(file, encoding="bytes")
    self._source = source

  def find_class(self, module: str, name: str):
    """Returns an allow-listed global or refuses.

    Raises:
      UnsafePickleError: naming the file and the refused global.
    """
    try:
      return _ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      raise UnsafePickleError(
          f"{self._source}: refused to load global '{module}.{name}': this "
          "file is not a plain (images, issame) verification set and "
          "unpickling it could run code") from None

  def persistent_load(self, pid):
    raise UnsafePickleError(
        f"{self._source}: refused persistent id {pid!r} in pickle")


def restricted_loads(data: bytes, source: str = "<pickle>"):
  """Unpickles ``data`` with :class:`RestrictedUnpickler`."""
  return RestrictedUnpickler(io.BytesIO(data), source).load()


def _as_image_bytes(item, source: str, position: int) -> bytes:
  if isinstance(item, (bytes, bytearray)):
    return bytes(item)
  if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1:
    return item.tobytes()  # Some converters store the bytes as a uint8 array.
  raise ValueError(f"{source}: image {position} is a {type(item).__name__}, "
                   "not encoded image bytes")


def _as_bool(item, source: str, position: int) -> bool:
  if isinstance(item, (bool, np.bool_)) or (
      isinstance(item, (int, np.integer)) and item in (0, 1)):
    return bool(item)
  raise ValueError(f"{source}: issame entry {position} is {item!r}, not a bool")


def read_bin(path: str | os.PathLike) -> tuple[list[bytes], list[bool]]:
  """Reads a ``.bin`` verification set without running any code from it.

  Args:
    path: the ``.bin`` file.

  Returns:
    ``(encoded images, issame)`` with ``len(images) == 2 * len(issame)``.

  Raises:
    FileNotFoundError: if the file is missing.
    UnsafePickleError: naming the file and the global, for a pickle that
      references anything but the expected types.
    ValueError: naming the file, for a corrupt pickle or an unexpected
      structure.
  """
  source = str(path)
  try:
    data = Path(path).read_bytes()
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{source}: verification set not found") from e
  try:
    loaded = restricted_loads(data, source)
  except UnsafePickleError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # Truncated or garbled pickles raise many exception types.
    raise ValueError(f"{source}: not a readable pickle ({e!r})") from e
  if not isinstance(loaded, (tuple, list)) or len(loaded) != 2:
    raise ValueError(f"{source}: expected a pickled (images, issame) pair, "
                     f"got {type(loaded).__name__}")
  bins, issame = loaded
  images = [_as_image_bytes(b, source, i) for i, b in enumerate(bins)]
  issame = [_as_bool(s, source, i) for i, s in enumerate(np.asarray(
      issame, dtype=object).ravel())]
  if len(images) != 2 * len(issame):
    raise ValueError(f"{source}: {len(images)} images for {len(issame)} pairs "
                     "(expected two images per pair)")
  return images, issame


def write_bin(path: str | os.PathLike, images: Sequence[bytes],
              issame: Sequence[bool], protocol: int = 4) -> None:
  """Writes a ``.bin`` verification set (the inverse of :func:`read_bin`).

  Args:
    path: output file.
    images: ``2 * N`` encoded images; pair ``k`` is images ``2k``, ``2k+1``.
    issame: ``N`` booleans.
    protocol: pickle protocol (insightface's files use 2 or the highest).
  """
  if len(images) != 2 * len(issame):
    raise ValueError(f"{len(images)} images for {len(issame)} pairs")
  payload = ([bytes(b) for b in images], [bool(s) for s in issame])
  Path(path).write_bytes(pickle.dumps(payload, protocol=protocol))


def iter_bin_pairs(path: str | os.PathLike, num_folds: int = 10,
                   skip_bad_examples: bool = False,
                   report: parse_report.ParseReport | None = None):
  """Yields decoded pairs of a ``.bin`` with their LFW-style folds.

  insightface evaluates ``.bin`` sets with 10 folds of consecutive pairs.

  Args:
    path: the ``.bin`` file.
    num_folds: number of contiguous folds.
    skip_bad_examples: count undecodable pairs instead of raising.
    report: receives counts; a fresh one if None.

  Yields:
    ``(pair index, image1, image2, issame, fold)`` with RGB uint8 images.
  """
  report = report if report is not None else parse_report.ParseReport()
  images, issame = read_bin(path)
  for k, same in enumerate(issame):
    try:
      image1, image2 = (images_lib.decode_image_bytes(
          images[2 * k + j], f"{path}: image {2 * k + j}") for j in (0, 1))
    except images_lib.ImageDecodeError as e:
      parse_report.handle_bad_entry(f"{path}: pair {k}", str(e),
                                  skip_bad_examples, report)
      continue
    report.add_ok()
    yield k, image1, image2, same, k * num_folds // len(issame)
