"""The `synthetic_faces` TFDS builder (importing this registers it)."""

from data.synthetic_faces import synthetic_faces_dataset_builder as _builder

Builder = _builder.Builder
SyntheticFacesConfig = _builder.SyntheticFacesConfig
load_pairs = _builder.load_pairs

__all__ = ["Builder", "SyntheticFacesConfig", "load_pairs"]
