"""The `insightface_rec` TFDS builder (importing this registers it)."""

from data.insightface_rec.insightface_rec_dataset_builder import Builder

__all__ = ["Builder"]
