"""Readers for the dataset formats MTLFace users have, without MXNet.

- :mod:`~mtlface_jax.formats.recordio`: insightface/MXNet ``.rec``/``.idx``.
- :mod:`~mtlface_jax.formats.binset`: insightface ``.bin`` verification sets
  (restricted unpickler).
- :mod:`~mtlface_jax.formats.lists`: annotation lists, pair lists, labels from
  file and folder names (SCAF, LFW, CACD-VS, FG-NET, UTKFace).
- :mod:`~mtlface_jax.formats.images`: robust decoding and the LFW crop.
"""

from mtlface_jax.formats.parse_report import ParseReport
from mtlface_jax.formats.lists import FacePair
from mtlface_jax.formats.lists import FaceRecord

__all__ = ["FacePair", "FaceRecord", "ParseReport"]
