"""Robust image decoding to RGB uint8, resizing and the fixed LFW crop.

Decoding never returns a silently broken image: a missing file, a corrupt or
truncated JPEG, or an unsupported pixel format raises :class:`ImageDecodeError`
(a ``ValueError``) naming the file. Grayscale, palette, CMYK, 16-bit and
alpha images are converted to 3-channel RGB.
"""

import dataclasses
import io
import os
from pathlib import Path
import re

import numpy as np
from PIL import Image
from PIL import ImageOps

from mtlface_jax.formats import parse_report

FACE_SIZE = 112  # Side of the aligned ArcFace-style faces everything uses.
# LFW deep-funneled images are 250x250 with the face in the centre; a central
# crop of this side, resized to 112x112, frames it like the ArcFace template.
LFW_CROP_SIZE = 128


class ImageDecodeError(ValueError):
  """An image file or buffer could not be decoded."""


def decode_image_bytes(data: bytes, source: str = "<bytes>",
                       orient: bool = False) -> np.ndarray:
  """Decodes encoded image bytes (JPEG, PNG, BMP, ...) to RGB uint8.

  Args:
    data: the encoded image.
    source: name of where the bytes came from, used in error messages.
    orient: apply the EXIF orientation tag (phone and camera photos store
      pixels sideways and say so there); datasets are read as stored.

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
      return from_pil(image, orient)
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
                       report: parse_report.ParseReport) -> np.ndarray | None:
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


def from_pil(image: Image.Image, orient: bool = False) -> np.ndarray:
  """A PIL image (any mode) as RGB uint8 ``[H, W, 3]``, optionally EXIF-oriented."""
  if orient:
    image = ImageOps.exif_transpose(image)
  return _to_rgb_array(image)


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


@dataclasses.dataclass(frozen=True)
class CropBox:
  """A face box ``[x0, x1) x [y0, y1)`` in pixels.

  Attributes:
    x0: left edge.
    y0: top edge.
    x1: right edge (exclusive).
    y1: bottom edge (exclusive).
    frame: ``(width, height)`` of the images the box was given for; other
      image sizes get the box scaled to them. None: the box is used as is.
  """
  x0: int
  y0: int
  x1: int
  y1: int
  frame: tuple[int, int] | None = None


# Named boxes for known layouts, in the coordinates of their images.
CROP_PRESETS = {
    # LFW deep-funneled (250x250): the central LFW_CROP_SIZE square.
    "lfw": CropBox(61, 61, 189, 189, frame=(250, 250)),
}


def parse_crop(text: str) -> CropBox:
  """Parses ``--crop``: ``x0,y0,x1,y1`` in pixels or a preset name.

  Args:
    text: e.g. ``"40,60,210,230"`` or ``"lfw"`` (see ``CROP_PRESETS``).

  Returns:
    The box (a preset's box scales with the image size).

  Raises:
    ValueError: naming the presets, for anything else.
  """
  if text in CROP_PRESETS:
    return CROP_PRESETS[text]
  match = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*",
                       text)
  if not match:
    raise ValueError(f"crop {text!r} is not 'x0,y0,x1,y1' (pixels) or one of "
                     f"{sorted(CROP_PRESETS)}")
  x0, y0, x1, y1 = (int(v) for v in match.groups())
  if x1 <= x0 or y1 <= y0:
    raise ValueError(f"crop {text!r} is empty: need x0 < x1 and y0 < y1")
  return CropBox(x0, y0, x1, y1)


def crop_image(image: np.ndarray, box: CropBox, source: str = "image"
               ) -> np.ndarray:
  """Cuts ``box`` out of ``image`` (scaled to its size if the box has a frame).

  Raises:
    ValueError: naming ``source`` when the box leaves the image.
  """
  height, width = image.shape[:2]
  x0, y0, x1, y1 = box.x0, box.y0, box.x1, box.y1
  if box.frame is not None:
    kx, ky = width / box.frame[0], height / box.frame[1]
    x0, x1 = (int(round(v * kx)) for v in (x0, x1))
    y0, y1 = (int(round(v * ky)) for v in (y0, y1))
    x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)  # Never empty when shrunk.
  if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
    raise ValueError(f"{source}: crop {x0},{y0},{x1},{y1} does not fit the "
                     f"{width}x{height} image")
  return image[y0:y1, x0:x1]


@dataclasses.dataclass
class ShapeTally:
  """Counts images that a plain resize distorts or rescales.

  Aligned faces are square at the model's size; a 321x386 photo resized to
  112x112 is squashed without a word unless someone counts.

  Attributes:
    size: the expected side.
    num_images: images seen.
    num_not_square: images whose height and width differ.
    num_resized: square images of another size.
    examples: up to 5 ``(source, "WxH")`` of images not square.
  """
  size: int = FACE_SIZE
  num_images: int = 0
  num_not_square: int = 0
  num_resized: int = 0
  examples: list = dataclasses.field(default_factory=list)

  def add(self, shape: tuple[int, ...], source: str = "") -> None:
    """Counts one image of ``shape`` (``[H, W, ...]``)."""
    height, width = shape[:2]
    self.num_images += 1
    if height != width:
      self.num_not_square += 1
      if len(self.examples) < 5:
        self.examples.append((source, f"{width}x{height}"))
    elif height != self.size:
      self.num_resized += 1

  def warning(self) -> str | None:
    """A one-paragraph warning, or None when every image was as expected."""
    if not self.num_not_square and not self.num_resized:
      return None
    parts = []
    if self.num_not_square:
      shown = ", ".join(f"{s} ({d})" if s else d for s, d in self.examples)
      parts.append(f"{self.num_not_square} of {self.num_images} images are "
                   f"not square and were squashed to {self.size}x{self.size} "
                   f"(e.g. {shown}); align them (python -m "
                   "mtlface_jax.align) or give a crop")
    if self.num_resized:
      parts.append(f"{self.num_resized} square images were not "
                   f"{self.size}x{self.size} and were resized")
    return "; ".join(parts)


def to_face(image: np.ndarray, lfw_style: bool = False,
            crop: CropBox | None = None,
            tally: ShapeTally | None = None, source: str = "image"
            ) -> np.ndarray:
  """Brings a decoded image to the 112x112 face size.

  Args:
    image: ``[H, W, 3]`` uint8.
    lfw_style: apply :func:`lfw_crop` (for deep-funneled LFW images) instead
      of a plain resize (for images that are already aligned faces).
    crop: a box cut out first (see :func:`parse_crop`); not with
      ``lfw_style``.
    tally: counts images (after any crop) that are not square or not
      112x112, so the caller can warn once.
    source: names the image in errors and the tally.

  Returns:
    ``[112, 112, 3]`` uint8.
  """
  if lfw_style:
    if crop is not None:
      raise ValueError("give either the LFW crop or a crop box, not both")
    return lfw_crop(image)
  if crop is not None:
    image = crop_image(image, crop, source)
  if tally is not None:
    tally.add(image.shape, source)
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
