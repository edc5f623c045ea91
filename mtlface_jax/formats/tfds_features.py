"""Feature specs and example helpers shared by the TFDS builders in ``data/``.

Kept out of the parser modules so that reading files does not import
TensorFlow Datasets.
"""

import logging
import re

import numpy as np
import tensorflow_datasets as tfds

from mtlface_jax.formats import images as images_lib
from mtlface_jax.formats import lists as lists_lib
from mtlface_jax.formats import parse_report as parse_report_lib

FACE_SHAPE = (images_lib.FACE_SIZE, images_lib.FACE_SIZE, 3)


def face_features() -> tfds.features.FeaturesDict:
  """Features of a labelled face: image, id, age, gender, filename."""
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=FACE_SHAPE, encoding_format="jpeg"),
      "id": tfds.features.Scalar(np.int32, doc="identity, -1 unknown"),
      "age": tfds.features.Scalar(np.float32, doc="age in years, -1 unknown"),
      "gender": tfds.features.Scalar(
          np.int32, doc="1 male, 0 female, -1 unknown"),
      "filename": tfds.features.Text(),
  })


def pair_features() -> tfds.features.FeaturesDict:
  """Features of a verification pair: two images, issame, fold."""
  return tfds.features.FeaturesDict({
      "image1": tfds.features.Image(shape=FACE_SHAPE, encoding_format="jpeg"),
      "image2": tfds.features.Image(shape=FACE_SHAPE, encoding_format="jpeg"),
      "issame": tfds.features.Scalar(np.bool_),
      "fold": tfds.features.Scalar(np.int32, doc="fold, -1 if none"),
  })


def face_jpeg(image: np.ndarray, lfw_style: bool = False) -> bytes:
  """Brings a decoded image to 112x112 and encodes it as JPEG.

  Encoding here (PIL) rather than letting TFDS encode the array avoids a
  TensorFlow call per example.
  """
  return images_lib.encode_jpeg(images_lib.to_face(image, lfw_style))


def load_face_jpeg(path: str, lfw_style: bool, skip_bad_examples: bool,
                   report: parse_report_lib.ParseReport) -> bytes | None:
  """Loads an image file as a 112x112 JPEG, counting it as ok or skipped.

  Raises:
    ValueError: naming the file if it is missing or corrupt, unless skipping.
  """
  try:
    jpeg = face_jpeg(images_lib.load_image(path), lfw_style)
  except ValueError as e:
    parse_report_lib.handle_bad_entry(path, str(e), skip_bad_examples, report)
    return None
  report.add_ok()
  return jpeg


def example_report(parse_report: parse_report_lib.ParseReport
                  ) -> parse_report_lib.ParseReport:
  """A report that keeps the parse skips and counts examples from zero.

  Builders parse a list first (skipping bad lines), then load images (which
  may be skipped too); the returned report ends up counting the examples
  actually written and every skip of both stages.
  """
  return parse_report_lib.ParseReport(skipped=list(parse_report.skipped))


def face_example(record: lists_lib.FaceRecord, jpeg: bytes,
                 filename: str) -> dict:
  """The example dict of :func:`face_features` for ``record``."""
  return {
      "image": jpeg,
      "id": np.int32(record.id),
      "age": np.float32(record.age),
      "gender": np.int32(record.gender),
      "filename": filename,
  }


def split_name(stem: str) -> str:
  """A valid TFDS split name from a file stem (``agedb-30`` -> ``agedb_30``)."""
  return re.sub(r"\W", "_", stem)


def log_report(name: str, report: parse_report_lib.ParseReport) -> None:
  """Logs what a builder accepted and skipped."""
  level = logging.WARNING if report.num_skipped else logging.INFO
  logging.log(level, "%s: %s", name, report.summary())
