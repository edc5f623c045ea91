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
"""

import functools
import logging
from typing import Iterator

from mtlface_jax import batch as batch_lib
from mtlface_jax import input_pipeline
from mtlface_jax import synthetic


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
    records, report = lists.parse_mtlface_list(
        d.mtlface_list.file, d.mtlface_list.image_root or None,
        num_ids=config.model.num_classes, skip_bad_examples=d.skip_bad_examples)
    if report.num_skipped:
      logging.warning("%s: %s", d.mtlface_list.file, report)
    return input_pipeline.source_from_records(records, skip_bad_examples=d.skip_bad_examples)
  if d.name == "face_shards":
    return real_data_source(config)
  if d.name == "tfds":
    return input_pipeline.source_from_tfds(d.tfds.name, d.tfds.split,
                                           data_dir=d.tfds.data_dir or None)
  raise ValueError(f"unknown config.data.name {d.name!r}; use synthetic_faces, mtlface_list, "
                   "face_shards or tfds")


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


def train_batches(config, start_step: int) -> Iterator[dict]:
  """This process's share of each global batch, from ``start_step`` on.

  Args:
    config: training config (``batch_size`` is global).
    start_step: the step to resume from (0 for a new run).

  Returns:
    An iterator of NumPy batch dicts with the step's keys only
    (``batch.keys(config)``; the pipeline's bookkeeping stays host-side).
  """
  pipeline = input_pipeline.InputPipeline(
      train_source(config),
      input_pipeline.PipelineConfig(global_batch_size=config.batch_size, seed=config.seed,
                                    num_groups=config.age_group, image_size=config.image_size,
                                    fas_targets=bool(config.train_fas),
                                    crop_scale=config.data.crop_scale,
                                    skip_bad_examples=config.data.skip_bad_examples),
      start_step=start_step)
  keys = batch_lib.keys(config)
  try:
    for batch in pipeline:
      yield {k: batch[k] for k in keys}
  finally:
    if pipeline.report.num_skipped:
      logging.warning("input pipeline: %s", pipeline.report)
