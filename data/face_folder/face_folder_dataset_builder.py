"""`face_folder`: faces labelled by folder or file names (no downloads).

Configs (the manual directory is the image folder itself):

- ``identity``: ``<manual_dir>/<identity>/<image>``; id = index of the sorted
  folder name, age and gender unknown.
- ``lfw``: the same on LFW deep-funneled images (``lfw/images``), with the
  fixed centre crop to 112x112.
- ``age``: ``<manual_dir>/<age in years>/<image>``; id and gender unknown.
- ``utkface``: UTKFace names ``age_gender_race_datetime.jpg.chip.jpg``; gender
  converted to 1 male / 0 female, id unknown.
- ``fgnet``: FG-NET names ``001A02.JPG``: id = person number, age.
"""

import dataclasses
from pathlib import Path

import tensorflow_datasets as tfds

from mtlface_jax.formats import lists
from mtlface_jax.formats import parse_report as parse_report_lib
from mtlface_jax.formats import tfds_features


@dataclasses.dataclass(eq=False)
class FaceFolderConfig(tfds.core.BuilderConfig):
  """How a folder is labelled.

  Attributes:
    layout: one of identity, age, utkface, fgnet.
    lfw_style: crop like LFW deep-funneled images instead of resizing.
  """

  layout: str = "identity"
  lfw_style: bool = False


def _parse(config: FaceFolderConfig, root: Path, skip: bool):
  """Lists the records of ``root`` for ``config``."""
  if config.layout == "identity":
    records, _, report = lists.parse_identity_folders(
        root, skip_bad_examples=skip)
    return records, report
  parsers = {
      "age": lists.parse_age_folders,
      "utkface": lists.parse_utkface_folder,
      "fgnet": lists.parse_fgnet_folder,
  }
  return parsers[config.layout](root, skip_bad_examples=skip)


class Builder(tfds.core.GeneratorBasedBuilder):
  """Faces labelled by their folder or file names."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      FaceFolderConfig(name="identity", description="one folder per identity"),
      FaceFolderConfig(name="lfw", lfw_style=True,
                       description="LFW deep-funneled, centre-cropped"),
      FaceFolderConfig(name="age", layout="age",
                       description="one folder per age"),
      FaceFolderConfig(name="utkface", layout="utkface",
                       description="UTKFace file names"),
      FaceFolderConfig(name="fgnet", layout="fgnet",
                       description="FG-NET file names"),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Pass the image folder itself as the manual directory (e.g. `lfw/images` for
  the `lfw` config, the UTKFace image folder for `utkface`).
  """

  def __init__(self, *, skip_bad_examples: bool = False, **kwargs):
    """Creates the builder.

    Args:
      skip_bad_examples: skip and count malformed names and unreadable images
        (reported in the log and in ``self.reports``) instead of failing.
      **kwargs: passed to ``tfds.core.GeneratorBasedBuilder``.
    """
    self._skip_bad_examples = skip_bad_examples
    self.reports: dict[str, parse_report_lib.ParseReport] = {}
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds_features.face_features(),
        description="Faces labelled by folder or file names.")

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    return {"train": self._generate_examples(Path(dl_manager.manual_dir))}

  def _generate_examples(self, root: Path):
    config = self.builder_config
    records, parse_report = _parse(config, root, self._skip_bad_examples)
    report = tfds_features.example_report(parse_report)
    self.reports["train"] = report
    for record in records:
      jpeg = tfds_features.load_face_jpeg(
          record.path, config.lfw_style, self._skip_bad_examples, report)
      if jpeg is not None:
        filename = str(Path(record.path).relative_to(root))
        yield filename, tfds_features.face_example(record, jpeg, filename)
    tfds_features.log_report(str(root), report)
