"""Held-out verification while training: ``config.eval_every`` and ``config.eval``.

Like arcface_torch's verification callback: the sets are read once when the
run starts, and every ``eval_every`` steps (and at the last step) the current
encoder, in inference mode and flip-averaged, embeds them; the 10-fold
verification protocol (``evaluation.verification.evaluate_verification``)
scores them and ``eval/<set>/accuracy``, ``accuracy_std`` and ``auc`` go to
TensorBoard and ``metrics.jsonl``. Sets (``configs/common.py``):

  * ``eval.bins``: insightface ``.bin`` files (AgeDB-30, CALFW, CPLFW, LFW...),
    ``eval.num_folds`` contiguous folds;
  * ``eval.pair_lists``: ``"format:path"`` with format ``lfw`` (``pairs.txt``,
    images under ``eval.images_root`` or ``<pairs dir>/images``), ``generic``
    (``path1 path2 same [fold]``) or ``numbered`` (CACD-VS);
  * ``eval.synthetic``: the held-out pairs of ``data.synthetic_faces`` (needs
    ``data.name == "synthetic_faces"`` and a test split).

Only runs that train the encoder evaluate: a FAS-only run keeps it frozen, so
its accuracy could not change. Only the main process evaluates, on its own
devices with its own copy of the encoder, so the other processes just go on
to the next step (which then waits for it).
"""

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import numpy as np

from mtlface_jax import predict
from mtlface_jax.evaluation import datasets
from mtlface_jax.evaluation import protocols
from mtlface_jax.evaluation import runner
from mtlface_jax.evaluation import verification
from mtlface_jax.formats import images as images_lib

EmbedFn = Callable[[Any], Any]
ENCODE_MODULES = ("encoder", "age")


@dataclasses.dataclass(frozen=True)
class HeldOutSet:
  """One verification set: ``verify(embed_fn, batch_size, sharding) -> result``."""
  name: str
  verify: Callable[[EmbedFn, int, Any], verification.VerificationResult]


def bin_set(path: str, num_folds: int, image_size: int) -> HeldOutSet:
  """An insightface ``.bin`` set (checked to exist now, read at each evaluation)."""
  if not Path(path).is_file():
    raise FileNotFoundError(f"config.eval.bins: {path} not found")
  return HeldOutSet(Path(path).stem, lambda embed, batch_size, sharding: protocols.score_bin(
      embed, path, batch_size, num_folds, sharding=sharding, progress=False,
      image_size=image_size))


def pair_list_set(entry: str, images_root: str, lfw_crop: bool, num_folds: int,
                  max_pairs_per_fold: int, image_size: int) -> HeldOutSet:
  """A ``"format:path"`` pair list, parsed and its image files checked now.

  Args:
    entry: ``lfw:.../pairs.txt``, ``generic:list.txt`` or ``numbered:list.txt``;
      a bare path is a generic list.
    images_root: folder the list's names are relative to ("": lfw lists use
      ``<pairs dir>/images`` when it exists, else the pairs' folder).
    lfw_crop: apply the fixed LFW crop (raw deep-funneled LFW).
    num_folds: contiguous folds of a list without fold labels.
    max_pairs_per_fold: keep the first N matched and mismatched pairs (0: all).
    image_size: the model's input side.

  Returns:
    The set, named like ``eval.py`` names it (the LFW folder, or the list's stem).
  """
  pair_format, _, path = entry.partition(":")
  if pair_format not in datasets.PAIR_FORMATS:
    pair_format, path = "generic", entry
  root = images_root or None
  if pair_format == "lfw" and not root:
    folder = Path(path).parent
    root = str(folder / "images") if (folder / "images").is_dir() else str(folder)
  pairs, _ = datasets.load_pairs(path, pair_format, root, num_folds)
  pairs = datasets.limit_pairs_per_fold(datasets.with_contiguous_folds(pairs, num_folds),
                                        max_pairs_per_fold)
  datasets.check_pair_files(pairs)
  name = Path(path).parent.name if pair_format == "lfw" else Path(path).stem
  return HeldOutSet(name, lambda embed, batch_size, sharding: protocols.score_pair_list(
      embed, pairs, batch_size, lfw_crop, sharding=sharding, progress=False,
      image_size=image_size))


def synthetic_set(data, max_pairs_per_fold: int, image_size: int) -> HeldOutSet:
  """The held-out pairs of a ``synthetic.SyntheticFaces``; faces resized once, now."""
  pairs, used, row = protocols.synthetic_pair_rows(data, max_pairs_per_fold)
  if not len(pairs):
    raise ValueError("config.eval.synthetic: the synthetic faces have no test pairs "
                     "(data.synthetic_faces.test_fraction=0?)")
  faces = np.stack([images_lib.resize_image(image, image_size)
                    for image in data.test.images[used]])

  def verify(embed, batch_size, sharding):
    embeddings = runner.extract_embeddings(embed, datasets.array_faces(faces, image_size),
                                           batch_size, sharding=sharding, progress=False,
                                           total=len(faces))
    return verification.evaluate_verification(pairs[:, 2].astype(bool), embeddings[row[:, 0]],
                                              embeddings[row[:, 1]], folds=pairs[:, 3])

  return HeldOutSet("synthetic", verify)


def sets_from_config(config) -> list[HeldOutSet]:
  """Every set ``config.eval`` names, read and checked (fails before training starts)."""
  e, size = config.eval, config.image_size
  sets = [bin_set(path, e.num_folds, size) for path in e.bins]
  sets += [pair_list_set(entry, e.images_root, e.lfw_crop, e.num_folds, e.max_pairs_per_fold,
                         size) for entry in e.pair_lists]
  if e.synthetic:
    if config.data.name != "synthetic_faces":
      raise ValueError("config.eval.synthetic needs config.data.name='synthetic_faces', "
                       f"got {config.data.name!r}")
    from mtlface_jax import data_sources  # pylint: disable=g-import-not-at-top
    sets.append(synthetic_set(data_sources.synthetic_for(config), e.max_pairs_per_fold, size))
  names = [s.name for s in sets]
  if len(set(names)) != len(names):
    raise ValueError(f"config.eval names two sets alike: {names}")
  return sets


class VerificationHook:
  """Scores the held-out sets with a training state's encoder (see the module doc).

  Args:
    sets: the held-out sets.
    models: the run's models (``encoder`` and ``age`` are used).
    mesh: the training mesh; this process's devices of it do the work.
    every: evaluate when the step is a multiple of it.
    last_step: also evaluate at this step (the run's end).
    batch_size: images per device call.
  """

  def __init__(self, sets: list[HeldOutSet], models, mesh: jax.sharding.Mesh, every: int,
               last_step: int, batch_size: int):
    self.sets, self.every, self.last_step, self.batch_size = sets, every, last_step, batch_size
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    self._sharding = runner.data_parallel_sharding(local)
    self._replicated = jax.sharding.NamedSharding(self._sharding.mesh,
                                                  jax.sharding.PartitionSpec())
    # The one flip-averaged encoder of the package (inference mode).
    self._embed = jax.jit(lambda variables, images: predict.encode(
        models, variables, images, flip=True).embedding)

  def due(self, step: int) -> bool:
    """Whether to evaluate after ``step`` steps."""
    return step % self.every == 0 or step == self.last_step

  def _local_variables(self, variables: dict) -> dict:
    """This process's copy of the encode modules, replicated over its devices."""
    picked = {name: variables[name] for name in ENCODE_MODULES}
    # A replicated global array holds the whole value on each of its devices.
    local = jax.tree_util.tree_map(lambda a: a.addressable_data(0), picked)
    return jax.device_put(local, self._replicated)

  def __call__(self, variables: dict, step: int) -> dict[str, float]:
    """Scores every set with ``variables``; returns the scalars to log (none off process 0).

    Args:
      variables: the training state's variables (replicated over the mesh).
      step: the step they are from (for the log line).

    Returns:
      ``eval/<set>/accuracy``, ``.../accuracy_std``, ``.../auc`` and ``eval/seconds``.
    """
    if jax.process_index() != 0:
      return {}
    start = time.perf_counter()
    local = self._local_variables(variables)
    embed = lambda images: self._embed(local, images)
    scalars = {}
    for held_out in self.sets:
      result = held_out.verify(embed, self.batch_size, self._sharding)
      scalars.update({f"eval/{held_out.name}/accuracy": result.accuracy_mean,
                      f"eval/{held_out.name}/accuracy_std": result.accuracy_std,
                      f"eval/{held_out.name}/auc": result.auc})
      logging.info("step %d: %s verification %.4f +- %.4f (AUC %.4f, %d pairs)", step,
                   held_out.name, result.accuracy_mean, result.accuracy_std, result.auc,
                   result.num_pairs)
    scalars["eval/seconds"] = time.perf_counter() - start
    return scalars


def from_config(config, models, mesh: jax.sharding.Mesh) -> Optional[VerificationHook]:
  """The hook ``config`` asks for, or None (``eval_every`` 0, or the encoder is frozen).

  Raises:
    ValueError: ``eval_every`` is set but ``config.eval`` names no set, or a
      set is malformed; FileNotFoundError for a missing file. Both before
      any training step.
  """
  if config.eval_every <= 0:
    return None
  if not config.train_fr:
    logging.info("eval_every: a FAS-only run keeps the encoder frozen; not evaluating")
    return None
  sets = sets_from_config(config)
  if not sets:
    raise ValueError(f"config.eval_every={config.eval_every} but config.eval names no set: "
                     "set eval.bins, eval.pair_lists or eval.synthetic (or eval_every=0)")
  return VerificationHook(sets, models, mesh, config.eval_every, config.num_iter,
                          config.eval.batch_size)
