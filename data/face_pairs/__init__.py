"""The `face_pairs` TFDS builder (importing this registers it)."""

from data.face_pairs.face_pairs_dataset_builder import Builder

__all__ = ["Builder"]
