"""`face_pairs`: face verification pairs (image1, image2, issame, fold).

Configs (nothing is downloaded; files come from the manual directory):

- ``lfw``: ``<manual_dir>/pairs.txt`` (LFW View 2, header ``10 300``) over
  ``<manual_dir>/images/<name>/<name>_NNNN.jpg``, deep-funneled images
  centre-cropped to 112x112. One split, ``test``.
- ``bin``: every insightface ``<manual_dir>/<name>.bin`` (``lfw.bin``,
  ``agedb_30.bin``, ...) becomes split ``<name>``; 10 contiguous folds.
  Read with a restricted unpickler: a ``.bin`` that would run code is refused.
- ``pair_list``: ``<manual_dir>/pairs.txt`` with lines ``path1 path2 same
  [fold]`` over aligned images relative to ``<manual_dir>``. Split ``test``.
- ``numbered``: CACD-VS-style ``<manual_dir>/pairs.txt`` with lines
  ``number path1 path2 same``; 10 balanced folds. Split ``test``.
"""

import dataclasses
from pathlib import Path

import tensorflow_datasets as tfds

from mtlface_jax.formats import binset
from mtlface_jax.formats import lists
from mtlface_jax.formats import parse_report as parse_report_lib
from mtlface_jax.formats import tfds_features


@dataclasses.dataclass(eq=False)
class FacePairsConfig(tfds.core.BuilderConfig):
  """Which pair format the manual directory holds.

  Attributes:
    layout: one of lfw, bin, pair_list, numbered.
  """

  layout: str = "lfw"


_LIST_PARSERS = {
    "lfw": lambda path, root, skip: lists.parse_lfw_pairs(
        path, root / "images", skip_bad_examples=skip),
    "pair_list": lambda path, root, skip: lists.parse_pair_list(
        path, root, skip_bad_examples=skip),
    "numbered": lambda path, root, skip: lists.parse_numbered_pairs(
        path, root, skip_bad_examples=skip),
}


class Builder(tfds.core.GeneratorBasedBuilder):
  """Verification pairs from LFW, insightface .bin or pair lists."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      FacePairsConfig(name="lfw", layout="lfw",
                      description="LFW pairs.txt over deep-funneled images"),
      FacePairsConfig(name="bin", layout="bin",
                      description="insightface .bin verification sets"),
      FacePairsConfig(name="pair_list", layout="pair_list",
                      description="'path1 path2 same [fold]' lists"),
      FacePairsConfig(name="numbered", layout="numbered",
                      description="CACD-VS-style numbered pair lists"),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  lfw: `<manual_dir>/pairs.txt` and `<manual_dir>/images/`. bin: the `.bin`
  files in `<manual_dir>/`. pair_list / numbered: `<manual_dir>/pairs.txt`
  with image paths relative to `<manual_dir>`.
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
        features=tfds_features.pair_features(),
        description="Face verification pairs.")

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = Path(dl_manager.manual_dir)
    if self.builder_config.layout != "bin":
      return {"test": self._generate_examples(manual_dir)}
    bin_files = sorted(manual_dir.glob("*.bin"))
    if not bin_files:
      raise FileNotFoundError(f"{manual_dir}: no .bin verification sets found")
    return {tfds_features.split_name(path.stem): self._generate_examples(path)
            for path in bin_files}

  def _generate_examples(self, source: Path):
    """Pairs of one ``.bin`` file, or of the list in the ``source`` folder."""
    if self.builder_config.layout == "bin":
      yield from self._generate_bin_pairs(source)
    else:
      yield from self._generate_list_pairs(source)

  def _generate_list_pairs(self, manual_dir: Path):
    layout = self.builder_config.layout
    skip = self._skip_bad_examples
    pairs, parse_report = _LIST_PARSERS[layout](manual_dir / "pairs.txt",
                                                manual_dir, skip)
    report = tfds_features.example_report(parse_report)
    self.reports["test"] = report
    lfw_style = layout == "lfw"
    for key, pair in enumerate(pairs):
      # Count the pair once: decode both images with a scratch report.
      scratch = parse_report_lib.ParseReport()
      jpegs = [tfds_features.load_face_jpeg(path, lfw_style, skip, scratch)
               for path in (pair.path1, pair.path2)]
      report.skipped.extend(scratch.skipped)
      if None in jpegs:
        continue
      report.add_ok()
      yield key, {"image1": jpegs[0], "image2": jpegs[1],
                  "issame": pair.issame, "fold": pair.fold}
    tfds_features.log_report(str(manual_dir / "pairs.txt"), report)

  def _generate_bin_pairs(self, path: Path):
    report = parse_report_lib.ParseReport()
    self.reports[tfds_features.split_name(path.stem)] = report
    for key, image1, image2, issame, fold in binset.iter_bin_pairs(
        path, skip_bad_examples=self._skip_bad_examples, report=report):
      yield key, {"image1": tfds_features.face_jpeg(image1),
                  "image2": tfds_features.face_jpeg(image2),
                  "issame": issame, "fold": fold}
    tfds_features.log_report(str(path), report)
