"""`mtlface_list`: aligned faces labelled by MTLFace/SCAF annotation lists.

Manual directory layout (nothing is downloaded)::

  <manual_dir>/images/...         aligned 112x112 faces (others are resized)
  <manual_dir>/<split>.txt        lines 'id filename age gender', filename
                                  relative to images/; one split per list,
                                  e.g. train.txt, test.txt

Build with, e.g.::

  builder = Builder(data_dir=OUT)  # or Builder(skip_bad_examples=True)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=MY_DIR))
"""

from pathlib import Path

import tensorflow_datasets as tfds

from mtlface_jax.formats import lists
from mtlface_jax.formats import parse_report as parse_report_lib
from mtlface_jax.formats import tfds_features


class Builder(tfds.core.GeneratorBasedBuilder):
  """Faces with id/age/gender from 'id filename age gender' lists."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put the aligned images under `<manual_dir>/images/` and one annotation list
  per split as `<manual_dir>/<split>.txt` (lines `id filename age gender`,
  gender 1 male / 0 female, filename relative to images/).
  """

  def __init__(self, *, skip_bad_examples: bool = False, **kwargs):
    """Creates the builder.

    Args:
      skip_bad_examples: skip and count malformed lines and unreadable images
        (reported in the log and in ``self.reports``) instead of failing.
      **kwargs: passed to ``tfds.core.GeneratorBasedBuilder``.
    """
    self._skip_bad_examples = skip_bad_examples
    self.reports: dict[str, parse_report_lib.ParseReport] = {}
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds_features.face_features(),
        supervised_keys=("image", "id"),
        description="Aligned faces labelled by MTLFace annotation lists.")

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = Path(dl_manager.manual_dir)
    list_files = sorted(manual_dir.glob("*.txt"))
    if not list_files:
      raise FileNotFoundError(
          f"{manual_dir}: no <split>.txt annotation lists found")
    return {
        tfds_features.split_name(path.stem):
        self._generate_examples(path, manual_dir / "images")
        for path in list_files
    }

  def _generate_examples(self, list_path: Path, image_root: Path):
    records, parse_report = lists.parse_mtlface_list(
        list_path, image_root, skip_bad_examples=self._skip_bad_examples)
    report = tfds_features.example_report(parse_report)
    self.reports[list_path.stem] = report
    for key, record in enumerate(records):
      jpeg = tfds_features.load_face_jpeg(
          record.path, False, self._skip_bad_examples, report)
      if jpeg is None:
        continue
      filename = str(Path(record.path).relative_to(image_root))
      yield key, tfds_features.face_example(record, jpeg, filename)
    tfds_features.log_report(str(list_path), report)
