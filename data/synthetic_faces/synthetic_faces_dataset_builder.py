"""`synthetic_faces`: the embedded default dataset, rendered procedurally.

Nothing is downloaded: examples are rendered by :mod:`mtlface_jax.synthetic`
from the config's seed, so a given config always builds the same dataset.

Splits ``train`` and ``test`` have disjoint identities (train ids are
``0..num_train_identities-1``, test ids follow). The verification pairs over
``test`` (LFW-style: 10 identity-disjoint folds of matched and mismatched
cross-age pairs) are in ``info.metadata['pairs']`` as rows
``[index_a, index_b, issame, fold]`` of the examples' ``index`` feature; use
:func:`load_pairs`.

Build and read, e.g.::

  import data.synthetic_faces  # registers the builder
  builder = tfds.builder('synthetic_faces/small', data_dir=OUT)
  builder.download_and_prepare()
  train = builder.as_dataset(split='train')
"""

import dataclasses
import io

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from mtlface_jax import synthetic

_SIZE = synthetic.IMAGE_SIZE


@dataclasses.dataclass(eq=False)
class SyntheticFacesConfig(tfds.core.BuilderConfig):
  """Size and seed of the rendered dataset (see ``synthetic.make_dataset``)."""

  num_identities: int = 1000
  images_per_identity: int = 20
  seed: int = 0
  test_fraction: float = 0.1
  max_age: int = synthetic.MAX_AGE
  num_folds: int = 10
  pairs_per_fold: int = 300
  min_age_gap: float = 20.0

  def make_kwargs(self) -> dict:
    """Keyword arguments of ``synthetic.make_dataset`` for this config."""
    return {
        "num_identities": self.num_identities,
        "images_per_identity": self.images_per_identity, "seed": self.seed,
        "test_fraction": self.test_fraction, "max_age": self.max_age,
        "num_folds": self.num_folds, "pairs_per_fold": self.pairs_per_fold,
        "min_age_gap": self.min_age_gap,
    }


class Builder(tfds.core.GeneratorBasedBuilder):
  """Procedural 112x112 faces with id, age (0-80) and gender labels."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      SyntheticFacesConfig(
          name="default", description="1,000 identities x 20 images, seed 0"),
      SyntheticFacesConfig(
          name="small", num_identities=200, images_per_identity=20,
          pairs_per_fold=100, description="200 identities x 20 images"),
      SyntheticFacesConfig(
          name="tiny", num_identities=40, images_per_identity=8, num_folds=2,
          pairs_per_fold=10, description="40 identities x 8 images (tests)"),
  ]
  DEFAULT_CONFIG_NAME = "default"

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(_SIZE, _SIZE, 3),
                                         encoding_format="png"),
            "id": tfds.features.Scalar(np.int32, doc="identity"),
            "age": tfds.features.Scalar(np.float32, doc="age in years"),
            "gender": tfds.features.Scalar(np.int32, doc="1 male, 0 female"),
            "index": tfds.features.Scalar(
                np.int32, doc="position in the split, used by the pairs"),
            "filename": tfds.features.Text(doc="<split>/<index>"),
        }),
        supervised_keys=("image", "id"),
        metadata=tfds.core.MetadataDict(),
        description=__doc__.split("\n\n")[0])

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Nothing to download.
    config = self.builder_config
    data = synthetic.make_dataset(**config.make_kwargs())
    # Saved with dataset_info.json once the splits are written.
    self.info.metadata.update({
        "pairs": data.pairs.tolist(),
        "num_train_identities": data.num_train_identities,
        "config": config.make_kwargs(),
    })
    return {"train": self._generate_examples(data.train, "train"),
            "test": self._generate_examples(data.test, "test")}

  def _generate_examples(self, split: synthetic.SplitArrays, name: str):
    for index in range(len(split)):
      yield index, {
          "image": _png(split.images[index]),
          "id": int(split.ids[index]), "age": float(split.ages[index]),
          "gender": int(split.genders[index]), "index": index,
          "filename": f"{name}/{index:06d}",
      }


def _png(image: np.ndarray) -> bytes:
  """PNG bytes (lossless); encoding with PIL avoids a TF call per image."""
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
  return buffer.getvalue()


def load_pairs(builder: tfds.core.DatasetBuilder) -> np.ndarray:
  """The test split's verification pairs of a prepared builder.

  Args:
    builder: a prepared ``synthetic_faces`` builder.

  Returns:
    int32 [P, 4]: (index_a, index_b, issame, fold), indices being the
    examples' ``index`` feature.

  Raises:
    ValueError: if the builder's metadata has no pairs (not prepared).
  """
  metadata = builder.info.metadata or {}
  if "pairs" not in metadata:
    raise ValueError(f"{builder.data_dir}: no verification pairs in the "
                     "metadata; run download_and_prepare() first")
  return np.asarray(metadata["pairs"], np.int32).reshape(-1, 4)
