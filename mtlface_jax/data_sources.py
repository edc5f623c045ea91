"""From a config's ``data`` section to training batches.

``config.data.name`` selects the examples; each source reads its own section
``config.data.<name>`` (declared in configs/common.py):
  - ``synthetic_faces``: the embedded procedural dataset (mtlface_jax/synthetic.py);
  - ``mtlface_list``: an ``id filename age gender`` list (``file``) over ``image_root``;
  - ``face_shards``: the LFW + UTKFace shards of mtlface_jax/real_data.py (``dir``);
  - ``tfds``: any TFDS dataset with image/id/age/gender features (``name``,
    ``split``, ``data_dir``).
``data.crop_scale`` and ``data.skip_bad_examples`` apply to every source.
Batches follow the contract of mtlface_jax/batch.py and resume exactly from
any step.

Bad input is found before the first step: every line of an ``mtlface_list``
is parsed and every file it names is checked (``config.data.verify_images``:
``header`` opens each image's header, ``full`` decodes it, ``off`` skips the
check); errors name ``list:line``. With ``skip_bad_examples`` the skipped
entries (here and the pipeline's own) are in ``TrainBatches.report``, which
the training loop writes to the run summary, metrics and ``skipped.jsonl``.
"""

import concurrent.futures
import functools
import logging
import os
from typing import Iterator, Optional

import numpy as np

from mtlface_jax import batch as batch_lib
from mtlface_jax import input_pipeline
from mtlface_jax import synthetic
from mtlface_jax.formats.parse_report import ParseReport

VERIFY_MODES = ("off", "header", "full")


@functools.lru_cache(maxsize=2)
def synthetic_dataset(num_identities: int, images_per_identity: int, seed: int,
                      test_fraction: float, num_folds: int,
                      pairs_per_fold: int) -> synthetic.SyntheticFaces:
  """Renders (once per process) the synthetic faces a config asks for."""
  return synthetic.make_dataset(num_identities, images_per_identity, seed,
                                test_fraction=test_fraction, num_folds=num_folds,
                                pairs_per_fold=pairs_per_fold)


def synthetic_for(config) -> synthetic.SyntheticFaces:
  """The synthetic dataset of ``config.data.synthetic_faces``."""
  d = config.data.synthetic_faces
  return synthetic_dataset(d.num_identities, d.images_per_identity, d.seed, d.test_fraction,
                           d.num_folds, d.pairs_per_fold)


def train_source(config) -> input_pipeline.Source:
  """The training examples of ``config.data``."""
  d = config.data
  if d.name == "synthetic_faces":
    return input_pipeline.source_from_synthetic(synthetic_for(config).train)
  if d.name == "mtlface_list":
    from mtlface_jax.formats import lists  # pylint: disable=g-import-not-at-top
    try:
      records, report = lists.parse_mtlface_list(
          d.mtlface_list.file, d.mtlface_list.image_root or None, num_ids=config.model.num_classes,
          skip_bad_examples=d.skip_bad_examples)
      records = check_image_files(records, d.get("verify_images", "header"),
                                  d.skip_bad_examples, report)
    except ValueError as error:  # Already one line naming list:line.
      raise input_pipeline.BadExampleError(str(error)) from None
    if report.num_skipped:
      logging.warning("%s: %s", d.mtlface_list.file, report.summary())
    source = input_pipeline.source_from_records(records, skip_bad_examples=d.skip_bad_examples)
    # Name examples by list line too, so decode errors and skips point at it.
    line_of = {r.path: r.source for r in reversed(records)}
    source.names = np.array([f"{line_of[n]} ({n})" if n in line_of else n for n in source.names],
                            object)
    list_report = ParseReport(skipped=list(report.skipped))
    list_report.merge(source.report)
    source.report = list_report
    return source
  if d.name == "face_shards":
    return real_data_source(config)
  if d.name == "tfds":
    return input_pipeline.source_from_tfds(d.tfds.name, d.tfds.split,
                                           data_dir=d.tfds.data_dir or None)
  raise ValueError(f"unknown config.data.name {d.name!r}; use synthetic_faces, mtlface_list, "
                   "face_shards or tfds")


def _image_problem(path: str, mode: str) -> Optional[str]:
  """Why the image at ``path`` cannot be used (None if it can)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    return f"image file {path} not found"
  try:
    with Image.open(path) as image:  # Reads the header only.
      if mode == "full":
        image.load()
  except Exception as error:  # pylint: disable=broad-except
    # PIL raises many types for damaged files; all mean "cannot be read".
    return f"image file {path} cannot be read ({type(error).__name__}: {error})"
  return None


def check_image_files(records: list, mode: str, skip_bad_examples: bool,
                      report: ParseReport, threads: int = 16) -> list:
  """Checks that every record's file exists and is a readable image.

  Args:
    records: ``formats.lists.FaceRecord``s (``source`` is ``list:line``).
    mode: ``"header"`` (open the header), ``"full"`` (decode) or ``"off"``.
    skip_bad_examples: count bad records in ``report`` instead of raising.
    report: where skips are recorded.
    threads: files checked in parallel (the check waits on the disk).

  Returns:
    The records that passed, in order.

  Raises:
    ValueError: ``list:line: image file ... not found`` (or cannot be read)
      for the first bad record, unless skipping.
  """
  if mode not in VERIFY_MODES:
    raise ValueError(f"config.data.verify_images must be one of {VERIFY_MODES}, got {mode!r}")
  if mode == "off" or not records:
    return records
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    problems = list(pool.map(lambda r: _image_problem(r.path, mode), records))
  kept = []
  for record, problem in zip(records, problems):
    if problem is None:
      kept.append(record)
      continue
    if not skip_bad_examples:
      raise ValueError(f"{record.source}: {problem} (set config.data.skip_bad_examples=True "
                       "to skip and count bad examples)")
    report.skip(record.source, problem)
    report.num_ok -= 1
  return kept


def real_data_source(config) -> input_pipeline.Source:
  """The training split of the LFW + UTKFace shards (``configs/real_lfw_utkface.py``)."""
  from mtlface_jax import real_data  # pylint: disable=g-import-not-at-top
  shards = real_data.ShardSet(config.data.face_shards.dir)
  if shards.num_classes != config.model.num_classes:
    raise ValueError(f"{config.data.face_shards.dir} has {shards.num_classes} training identities "
                     f"but config.model.num_classes is {config.model.num_classes}; pass "
                     f"--config.model.num_classes={shards.num_classes}")
  return shard_train_source(shards)


def shard_train_source(shards) -> input_pipeline.Source:
  """The training split of a ``real_data.ShardSet`` as a Source of encoded faces."""
  train = shards.select(split="train")
  source = input_pipeline.Source(ids=shards.ids[train], ages=shards.ages[train],
                                 genders=shards.genders[train], encoded=shards.encoded(train),
                                 names=shards.names[train])
  source.report.num_ok = len(source)
  return source


class TrainBatches:
  """This process's share of each global batch from ``start_step`` on (an iterator).

  The source and the pipeline are built (and bad input found) when this is
  created, before the first step. ``report`` holds every skipped example:
  list entries, files that failed the up-front check and examples the
  pipeline could not decode.

  Args:
    config: training config (``batch_size`` is global).
    start_step: the step to resume from (0 for a new run).
    source: the examples; default :func:`train_source` of ``config`` (e.g.
      the selective fine-tuning recipe passes its real + synthesized faces).
  """

  def __init__(self, config, start_step: int, source: Optional[input_pipeline.Source] = None):
    source = train_source(config) if source is None else source
    earlier = list(source.report.skipped)
    self._pipeline = input_pipeline.InputPipeline(
        source,
        input_pipeline.PipelineConfig(global_batch_size=config.batch_size, seed=config.seed,
                                      num_groups=config.age_group, image_size=config.image_size,
                                      fas_targets=bool(config.train_fas),
                                      crop_scale=config.data.crop_scale,
                                      skip_bad_examples=config.data.skip_bad_examples),
        start_step=start_step)
    self.report = self._pipeline.report
    if self.report.skipped[:len(earlier)] != earlier:  # Pipeline made its own report.
      merged = ParseReport(skipped=earlier)
      merged.merge(self.report)
      self.report = merged
    self._keys = batch_lib.keys(config)
    self._batches = iter(self._pipeline)

  def __iter__(self) -> "TrainBatches":
    return self

  def __next__(self) -> dict:
    batch = next(self._batches)
    return {k: batch[k] for k in self._keys}

  def close(self) -> None:
    """Stops the pipeline (its prefetching threads end with the generator)."""
    self._batches.close()


def train_batches(config, start_step: int) -> Iterator[dict]:
  """This process's share of each global batch, from ``start_step`` on.

  Args:
    config: training config (``batch_size`` is global).
    start_step: the step to resume from (0 for a new run).

  Returns:
    A :class:`TrainBatches` iterator of NumPy batch dicts with the step's
    keys only; its ``report`` lists the skipped examples.
  """
  return TrainBatches(config, start_step)
