"""The `mtlface_list` TFDS builder (importing this registers it)."""

from data.mtlface_list.mtlface_list_dataset_builder import Builder

__all__ = ["Builder"]
