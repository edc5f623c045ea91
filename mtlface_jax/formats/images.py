"""Robust image decoding to RGB uint8, resizing and the fixed LFW crop.

Decoding never returns a silently broken image: a missing file, a corrupt or
truncated JPEG, or an unsupported pixel format raises :class:`ImageDecodeError`
(a ``ValueError``) naming the file. Grayscale, palette, CMYK, 16-bit and
alpha images are converted to 3-channel RGB.
"""

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from mtlface_jax.formats import report as report_lib

FACE_SIZE = 112  # Side of the aligned ArcFace-style faces everything uses.
# LFW deep-funneled images are 250x250 with the face in the centre; a central
# crop of this side, resized to 112x112, frames it like the ArcFace template.
LFW_CROP_SIZE = 128


class ImageDecodeError(ValueError):
  """An image file or buffer could not be decoded."""


def decode_image_bytes(data: bytes, source: str = "<bytes>") -> np.ndarray:
  """Decodes encoded image bytes (JPEG, PNG, BMP, ...) to RGB uint8.

  Args:
    data: the encoded image.
    source: name of where the bytes came from, used in error messages.

  Returns:
    A ``[H, W, 3]`` uint8 array.

  Raises:
    ImageDecodeError: naming ``source`` if the bytes are not a complete image.
  """
  if not data:
    raise ImageDecodeError(f"{source}: empty image data")
  try:
    with Image.open(io.BytesIO(data)) as image:
      # load() forces the full decode, so a truncated JPEG fails here rather
      # than yielding a partly grey image. PIL raises DecompressionBombError
      # for absurd sizes, which guards memory against hostile files.
      image.load()
      return _to_rgb_array(image)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ImageDecodeError(f"{source}: cannot decode image ({e})") from e


def load_image(path: str | os.PathLike) -> np.ndarray:
  """Reads and decodes an image file to RGB uint8.

  Args:
    path: image file.

  Returns:
    A ``[H, W, 3]`` uint8 array.

  Raises:
    ImageDecodeError: naming ``path`` if it is missing, unreadable or corrupt.
  """
  try:
    data = Path(path).read_bytes()
  except FileNotFoundError as e:
    raise ImageDecodeError(f"{path}: image file not found") from e
  except OSError as e:
    raise ImageDecodeError(f"{path}: cannot read image file ({e})") from e
  return decode_image_bytes(data, source=str(path))


def load_image_or_skip(path: str | os.PathLike,
                       report: report_lib.ParseReport) -> np.ndarray | None:
  """Like :func:`load_image` but counts a bad file in ``report``.

  Args:
    path: image file.
    report: the skip is recorded here.

  Returns:
    The RGB uint8 image, or None if the file was missing or corrupt.
  """
  try:
    image = load_image(path)
  except ImageDecodeError as e:
    report.skip(str(path), f"bad image: {e}")
    return None
  report.add_ok()
  return image


def _to_rgb_array(image: Image.Image) -> np.ndarray:
  """Converts any PIL image mode to a ``[H, W, 3]`` uint8 array."""
  if image.mode in ("I;16", "I;16B", "I;16L", "I"):
    # 16/32-bit grayscale: PIL's convert("RGB") clips instead of rescaling.
    pixels = np.asarray(image, dtype=np.float64)
    peak = 65535.0 if image.mode.startswith("I;16") else max(pixels.max(), 1.0)
    gray = np.clip(pixels / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)
  if image.mode == "F":
    raise ValueError("floating-point images are not supported")
  if image.mode != "RGB":
    image = image.convert("RGB")
  array = np.asarray(image, dtype=np.uint8)
  if array.ndim != 3 or array.shape[-1] != 3:
    raise ValueError(f"unexpected decoded shape {array.shape}")
  return array


def resize_image(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
  """Resizes an RGB uint8 image with bilinear filtering (antialiased).

  Args:
    image: ``[H, W, 3]`` uint8.
    size: output side, or ``(height, width)``.

  Returns:
    The resized ``[height, width, 3]`` uint8 image (the input if unchanged).
  """
  height, width = (size, size) if isinstance(size, int) else size
  if image.shape[:2] == (height, width):
    return image
  resized = Image.fromarray(image).resize((width, height), Image.BILINEAR)
  return np.asarray(resized, dtype=np.uint8)


def center_crop_resize(image: np.ndarray, crop_size: int,
                       out_size: int = FACE_SIZE) -> np.ndarray:
  """Crops a centred square and resizes it.

  Args:
    image: ``[H, W, 3]`` uint8 with ``H, W >= crop_size``.
    crop_size: side of the central crop.
    out_size: side of the output.

  Returns:
    ``[out_size, out_size, 3]`` uint8.

  Raises:
    ValueError: if the image is smaller than the crop.
  """
  height, width = image.shape[:2]
  if height < crop_size or width < crop_size:
    raise ValueError(
        f"image of size {height}x{width} is smaller than the crop {crop_size}")
  top = (height - crop_size) // 2
  left = (width - crop_size) // 2
  crop = image[top:top + crop_size, left:left + crop_size]
  return resize_image(crop, out_size)


def lfw_crop(image: np.ndarray, crop_size: int = LFW_CROP_SIZE) -> np.ndarray:
  """The fixed crop for pre-aligned LFW deep-funneled images.

  The crop side scales with the image so that a resized LFW image (not
  250x250) is framed the same way.

  Args:
    image: ``[H, W, 3]`` uint8 deep-funneled LFW image (250x250).
    crop_size: crop side for a 250-pixel image.

  Returns:
    ``[112, 112, 3]`` uint8 face.
  """
  side = min(image.shape[:2])
  scaled_crop = max(1, int(round(crop_size * side / 250.0)))
  return center_crop_resize(image, scaled_crop, FACE_SIZE)


def to_face(image: np.ndarray, lfw_style: bool = False) -> np.ndarray:
  """Brings a decoded image to the 112x112 face size.

  Args:
    image: ``[H, W, 3]`` uint8.
    lfw_style: apply :func:`lfw_crop` (for deep-funneled LFW images) instead
      of a plain resize (for images that are already aligned faces).

  Returns:
    ``[112, 112, 3]`` uint8.
  """
  if lfw_style:
    return lfw_crop(image)
  return resize_image(image, FACE_SIZE)


def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
  """Encodes an RGB uint8 image as JPEG.

  Args:
    image: ``[H, W, 3]`` uint8.
    quality: JPEG quality (1-100).

  Returns:
    The JPEG bytes.
  """
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(image, dtype=np.uint8)).save(
      buffer, format="JPEG", quality=quality)
  return buffer.getvalue()


def encode_png(image: np.ndarray) -> bytes:
  """Encodes a uint8 image (RGB or grayscale) losslessly as PNG."""
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
  return buffer.getvalue()
