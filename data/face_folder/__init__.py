"""The `face_folder` TFDS builder (importing this registers it)."""

from data.face_folder.face_folder_dataset_builder import Builder

__all__ = ["Builder"]
