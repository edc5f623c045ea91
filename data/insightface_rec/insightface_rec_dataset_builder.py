"""`insightface_rec`: insightface RecordIO training sets, read without MXNet.

Manual directory layout (nothing is downloaded)::

  <manual_dir>/train.rec, <manual_dir>/train.idx   insightface's files
  <manual_dir>/list.txt                            optional SCAF/LCAF list

Without ``list.txt`` every image record becomes an example with ``id`` = the
record's label and unknown age/gender. With it, the list's lines
``id LLLLLL/IIIIIIII.jpg age gender`` select records by index (the record's
label must equal ``LLLLLL``) and provide id, age and gender.
"""

from pathlib import Path

import tensorflow_datasets as tfds

from mtlface_jax.formats import lists
from mtlface_jax.formats import recordio
from mtlface_jax.formats import parse_report as parse_report_lib
from mtlface_jax.formats import tfds_features


class Builder(tfds.core.GeneratorBasedBuilder):
  """Faces from an insightface .rec/.idx, optionally joined with a list."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put insightface's `train.rec` and `train.idx` (e.g. from faces_webface_112x112
  or faces_emore) in `<manual_dir>/`, and optionally the SCAF/LCAF annotation
  list as `<manual_dir>/list.txt`.
  """

  def __init__(self, *, skip_bad_examples: bool = False, **kwargs):
    """Creates the builder.

    Args:
      skip_bad_examples: skip and count bad list lines and unreadable records
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
        description="insightface RecordIO faces (optionally SCAF-labelled).")

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = Path(dl_manager.manual_dir)
    return {"train": self._generate_examples(manual_dir)}

  def _joined_entries(self, reader: recordio.RecordIOReader, list_path: Path):
    """List entries joined with the records (``index`` = record index)."""
    entries, parse_report = lists.parse_mtlface_list(
        list_path, skip_bad_examples=self._skip_bad_examples)
    return recordio.join_scaf_list(reader, entries, self._skip_bad_examples,
                                   parse_report)

  def _generate_examples(self, manual_dir: Path):
    list_path = manual_dir / "list.txt"
    with recordio.RecordIOReader(manual_dir / "train.rec") as reader:
      entries, parse_report = (self._joined_entries(reader, list_path)
                               if list_path.is_file() else
                               (None, parse_report_lib.ParseReport()))
      report = tfds_features.example_report(parse_report)
      self.reports["train"] = report
      indices = (reader.image_indices(self._skip_bad_examples, report)
                 if entries is None else [entry.index for entry in entries])
      for position, index in enumerate(indices):
        try:
          header, image = reader.read_image(index)
        except recordio.RecordIOError as e:
          parse_report_lib.handle_bad_entry(f"{reader.rec_path}: record {index}",
                                      str(e), self._skip_bad_examples, report)
          continue
        if entries is None:  # Unlabelled by a list: the record's own label.
          label = recordio.image_label(header)
          entry = lists.FaceRecord(recordio.scaf_name(label, index), label,
                                   index=index)
        else:
          entry = entries[position]
        report.add_ok()
        yield index, tfds_features.face_example(
            entry, tfds_features.face_jpeg(image), entry.path)
    tfds_features.log_report(str(manual_dir / "train.rec"), report)
