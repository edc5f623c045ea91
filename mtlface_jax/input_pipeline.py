"""tf.data input pipelines that yield the MTLFace batch contract.

Batches are dicts of NumPy arrays (one host's share of the global batch); the
step's keys and dtypes are those of :mod:`mtlface_jax.batch` (the contract),
``index`` is host-side bookkeeping::

  image   float32 [b, S, S, 3] in [-1, 1]   ((x / 255 - 0.5) / 0.5), RGB
  id      int32   [b]   identity, -1 unknown
  age     float32 [b]   years, -1 unknown
  group   int32   [b]   age group (ages.age_to_group), -1 unknown
  gender  int32   [b]   1 male, 0 female, -1 unknown
  index   int32   [b]   position of the example in its source
  # with fas_targets=True:
  target_group  int32   [b]  uniform over the groups present in the source
  target_image  float32 [b, S, S, 3]  a random image of that group
  # eval batches only:
  mask    bool    [b]   False for the padding of the last batch

Sources (random access by index): decoded images in memory
(:func:`source_from_arrays`, :func:`source_from_synthetic`), encoded bytes in
memory (:func:`source_from_tfds`) or image files (:func:`source_from_records`,
fed by the parsers of :mod:`mtlface_jax.formats`).

Order. Training order is a pure function of (seed, step): epoch ``e`` is one
fixed permutation of the examples drawn from (seed, e) (the remainder that
does not fill a global batch is dropped, like the reference sampler); global
batch ``s`` is ``perm[s*B:(s+1)*B]`` and host ``p`` of ``P`` reads its slice
``[p*B/P, (p+1)*B/P)``. Flips and FAS targets come from stateless RNG keyed by
(seed, step) and drawn for the whole global batch, so a run restarted at step
N sees exactly the batches of an uninterrupted one, whatever the host count.

Bad examples: an unreadable or missing file raises :class:`BadExampleError`
naming it; with ``skip_bad_examples=True`` every file is decoded once up front
(:func:`validate_source`), bad ones are dropped before the order is drawn and
counted in ``pipeline.report`` (a ``ParseReport``), and logged.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import tensorflow as tf

from mtlface_jax import ages as ages_lib
from mtlface_jax.formats.parse_report import ParseReport

try:
  # JAX owns the accelerators; TF only decodes on the CPU.
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # Devices were already initialised by the caller.
  pass

AUTOTUNE = tf.data.AUTOTUNE
_STREAM_PERMUTATION, _STREAM_FLIP, _STREAM_TARGET, _STREAM_CROP = 1, 2, 3, 4
_MAX_AGE = ages_lib.MAX_AGE  # Shared with evaluation (formats.lists).


class BadExampleError(ValueError):
  """An example that cannot be decoded or whose labels are invalid."""


@dataclasses.dataclass
class Source:
  """Labelled examples with random access by index.

  Exactly one of ``images`` (uint8 [N, H, W, 3]), ``encoded`` (object array
  of encoded image bytes) and ``paths`` (str array of image files) is set.
  ``names`` identify examples in error messages.
  """

  ids: np.ndarray
  ages: np.ndarray
  genders: np.ndarray
  images: np.ndarray | None = None
  encoded: np.ndarray | None = None
  paths: np.ndarray | None = None
  names: np.ndarray | None = None
  report: ParseReport = dataclasses.field(default_factory=ParseReport)

  def __post_init__(self):
    self.ids = np.asarray(self.ids, np.int32).reshape(-1)
    self.ages = np.asarray(self.ages, np.float32).reshape(-1)
    self.genders = np.asarray(self.genders, np.int32).reshape(-1)
    set_fields = [f for f in ("images", "encoded", "paths")
                  if getattr(self, f) is not None]
    if len(set_fields) != 1:
      raise ValueError(f"a Source needs exactly one of images/encoded/paths, "
                       f"got {set_fields or 'none'}")
    n = len(self.ids)
    for name in ("ages", "genders", set_fields[0]):
      if len(getattr(self, name)) != n:
        raise ValueError(f"Source: {name} has {len(getattr(self, name))} "
                         f"entries, ids has {n}")
    if self.names is None:
      self.names = (self.paths if self.paths is not None
                    else np.array([f"example {i}" for i in range(n)], object))

  def __len__(self) -> int:
    return len(self.ids)

  @property
  def kind(self) -> str:
    """'arrays', 'encoded' or 'files'."""
    if self.images is not None:
      return "arrays"
    return "encoded" if self.encoded is not None else "files"

  def subset(self, indices: np.ndarray) -> "Source":
    """The examples at ``indices``, keeping the report."""
    pick = lambda x: None if x is None else x[indices]
    return Source(ids=self.ids[indices], ages=self.ages[indices],
                  genders=self.genders[indices], images=pick(self.images),
                  encoded=pick(self.encoded), paths=pick(self.paths),
                  names=pick(self.names), report=self.report)


def _check_labels(ids, ages, genders, names, skip_bad_examples: bool,
                  report: ParseReport) -> np.ndarray:
  """Indices of examples with valid labels; raises or counts the others."""
  ids, ages, genders = (np.asarray(x, np.float64) for x in (ids, ages, genders))
  problems = [
      (~np.isfinite(ids) | (ids < -1) | (ids != np.round(ids)),
       "identity label must be an integer >= -1"),
      (~np.isfinite(ages) | ((ages < 0) & (ages != -1)) | (ages > _MAX_AGE),
       f"age must be -1 (unknown) or in [0, {_MAX_AGE}]"),
      (~np.isin(genders, (-1, 0, 1)), "gender must be -1, 0 or 1"),
  ]
  bad = np.zeros(len(ids), bool)
  for mask, reason in problems:
    for i in np.flatnonzero(mask & ~bad):
      values = f"id={ids[i]:g} age={ages[i]:g} gender={genders[i]:g}"
      if not skip_bad_examples:
        raise BadExampleError(f"{names[i]}: {reason} ({values})")
      report.skip(names[i], f"{reason} ({values})")
    bad |= mask
  return np.flatnonzero(~bad)


def source_from_arrays(images: np.ndarray, ids, ages, genders,
                       names: Sequence[str] | None = None) -> Source:
  """A source of decoded images held in memory.

  Args:
    images: uint8 [N, H, W, 3] (or [N, H, W] / [N, H, W, 1] grayscale, made
      RGB) images.
    ids, ages, genders: labels, -1 where unknown.
    names: optional example names for error messages.

  Returns:
    The Source.

  Raises:
    BadExampleError: on invalid labels; ValueError on bad shapes/dtypes.
  """
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(f"images must be uint8, got {images.dtype}")
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"images must be [N, H, W, 3], got {images.shape}")
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  names = None if names is None else np.asarray(names, object)
  source = Source(ids=ids, ages=ages, genders=genders, images=images,
                  names=names)
  _check_labels(source.ids, source.ages, source.genders, source.names,
                False, source.report)
  source.report.num_ok = len(source)
  return source


def source_from_synthetic(split) -> Source:
  """A source over one split of ``mtlface_jax.synthetic.make_dataset``."""
  return source_from_arrays(split.images, split.ids, split.ages, split.genders)


def concatenate(sources: Sequence[Source]) -> Source:
  """Every example of ``sources``, in order, as one Source (reports merged).

  Sources of one kind are joined as they are ('arrays' must share a shape:
  resize first). An 'arrays' source joined with 'encoded' ones is encoded as
  PNG first (lossless), so the encoded examples stay byte for byte what they
  were, e.g. the real-data shards plus synthesized faces.

  Args:
    sources: the sources, at least one.

  Returns:
    The joined Source.

  Raises:
    ValueError: for 'files' joined with another kind, or arrays of different
      shapes.
  """
  from mtlface_jax.formats import images as images_lib  # pylint: disable=g-import-not-at-top
  kinds = {s.kind for s in sources}
  if len(kinds) > 1 and kinds != {"arrays", "encoded"}:
    raise ValueError(f"cannot join sources of kinds {sorted(kinds)}")
  field = "images" if kinds == {"arrays"} else ("paths" if kinds == {"files"} else "encoded")

  def values(s: Source) -> np.ndarray:
    if field == "encoded" and s.kind == "arrays":
      return np.array([images_lib.encode_png(image) for image in s.images], object)
    return getattr(s, field)

  joined = lambda get: np.concatenate([get(s) for s in sources])
  report = ParseReport()
  for s in sources:
    report.merge(s.report)
  return Source(ids=joined(lambda s: s.ids), ages=joined(lambda s: s.ages),
                genders=joined(lambda s: s.genders), names=joined(lambda s: s.names),
                report=report, **{field: joined(values)})


def source_from_records(records: Iterable[Any], root: str | None = None,
                        skip_bad_examples: bool = False) -> Source:
  """A source over image files listed as (path, id, age, gender) records.

  Args:
    records: tuples ``(path, id, age, gender)`` or objects with those
      attributes (e.g. ``formats.lists.FaceRecord``; records inside a
      container, ``index >= 0``, are not plain files and are refused).
    root: directory that relative paths are joined to.
    skip_bad_examples: count and drop records with invalid labels instead of
      raising (unreadable files are found by :func:`validate_source`).

  Returns:
    The Source; ``source.report`` counts the skipped records.

  Raises:
    BadExampleError: naming the record, on invalid labels (unless skipping).
  """
  paths, labels = [], []
  for record in records:
    if isinstance(record, (tuple, list)):
      path, identity, age, gender = record
    else:
      if getattr(record, "index", -1) >= 0:
        raise ValueError(f"{record.path}: record {record.index} lives inside "
                         "a container; read it with mtlface_jax.formats")
      path, identity, age, gender = (record.path, record.id, record.age,
                                     record.gender)
    path = os.fspath(path)
    paths.append(os.path.join(root, path) if root else path)
    labels.append((identity, age, gender))
  paths = np.array(paths, dtype=object)
  labels = np.array(labels, np.float64).reshape(-1, 3)
  report = ParseReport()
  keep = _check_labels(labels[:, 0], labels[:, 1], labels[:, 2], paths,
                       skip_bad_examples, report)
  report.num_ok = len(keep)
  return Source(ids=labels[keep, 0], ages=labels[keep, 1],
                genders=labels[keep, 2], paths=paths[keep].astype(str),
                names=paths[keep], report=report)


def source_from_tfds(name: str, split: str, data_dir: str | None = None,
                     prepare: bool = True, decode: bool = False) -> Source:
  """A source over a TFDS face dataset (features image/id/age/gender).

  The split's encoded images are held in memory (about 20 kB each for the
  synthetic faces), ordered by the ``index`` feature where there is one.

  Args:
    name: e.g. ``'synthetic_faces/default'`` (import its ``data`` package
      first so that it is registered).
    split: e.g. ``'train'``.
    data_dir: TFDS data directory.
    prepare: build the dataset if it is not yet (no downloads for ours).
    decode: decode every image up front into a uint8 array (faster batches,
      4x-8x more memory).

  Returns:
    The Source.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(name, data_dir=data_dir)
  if prepare:
    builder.download_and_prepare()
  dataset = builder.as_dataset(split=split, shuffle_files=False,
                               decoders={"image": tfds.decode.SkipDecoding()})
  columns = collections.defaultdict(list)
  for example in dataset.as_numpy_iterator():
    for key in ("image", "id", "age", "gender", "index", "filename"):
      if key in example:
        columns[key].append(example[key])
  order = (np.argsort(columns["index"], kind="stable") if columns["index"]
           else np.arange(len(columns["image"])))
  encoded = np.array(columns["image"], object)[order]
  names = (np.array([n.decode() for n in columns["filename"]], object)[order]
           if columns["filename"] else None)
  labels = [np.asarray(columns[k])[order] for k in ("id", "age", "gender")]
  if decode:
    images = np.stack([tf.io.decode_image(e, channels=3).numpy()
                       for e in encoded])
    return source_from_arrays(images, *labels, names=names)
  source = Source(*labels, encoded=encoded, names=names)
  source.report.num_ok = len(source)
  return source


def decode_image(contents: tf.Tensor, image_size: int) -> tf.Tensor:
  """Decodes JPEG/PNG/GIF/BMP bytes to uint8 [S, S, 3] RGB.

  Grayscale becomes RGB. Large JPEGs are decoded at a reduced scale (1/2,
  1/4 or 1/8, in the DCT: much cheaper) as long as the result stays
  >= ``image_size``; then anything not already S x S is resized.
  """
  return _resize(_decode_unresized(contents, image_size), image_size)


def _decode_unresized(contents: tf.Tensor, image_size: int) -> tf.Tensor:
  """Decodes like :func:`decode_image` without the final resize."""
  def jpeg():
    shape = tf.io.extract_jpeg_shape(contents)
    shrink = tf.minimum(shape[0], shape[1]) // image_size
    branch = (tf.cast(shrink >= 2, tf.int32) + tf.cast(shrink >= 4, tf.int32)
              + tf.cast(shrink >= 8, tf.int32))
    # A scaled decode already approximates; the fast IDCT costs nothing more.
    return tf.switch_case(branch, [
        lambda: tf.io.decode_jpeg(contents, channels=3)] + [
            lambda r=r: tf.io.decode_jpeg(contents, channels=3, ratio=r,
                                          dct_method="INTEGER_FAST")
            for r in (2, 4, 8)])

  def other():
    return tf.io.decode_image(contents, channels=3, expand_animations=False)

  image = tf.cond(tf.io.is_jpeg(contents), jpeg, other)
  image.set_shape([None, None, 3])
  return image


def _resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
  """uint8 [..., H, W, 3] -> uint8 [..., S, S, 3] unless already S x S.

  Bilinear; antialiased only when shrinking by 2x or more (after a scaled
  JPEG decode it never is, and the antialiasing kernel costs ~3x more).
  """
  shape = tf.shape(image)
  height, width = shape[-3], shape[-2]

  def resize(antialias):
    resized = tf.image.resize(image, [image_size, image_size],
                              method="bilinear", antialias=antialias)
    return tf.cast(tf.round(tf.clip_by_value(resized, 0, 255)), tf.uint8)

  same = tf.logical_and(tf.equal(height, image_size),
                        tf.equal(width, image_size))
  large = tf.minimum(height, width) >= 2 * image_size
  out = tf.case([(same, lambda: image), (large, lambda: resize(True))],
                default=lambda: resize(False))
  return tf.ensure_shape(out, image.shape[:-3] + (image_size, image_size, 3))


def validate_source(source: Source, image_size: int = 112,
                    num_parallel_calls: int = AUTOTUNE) -> Source:
  """Decodes every image once; drops and counts the ones that fail.

  Args:
    source: an 'encoded' or 'files' source ('arrays' are returned as is).
    image_size: the pipeline's image size (picks the JPEG decode scale).
    num_parallel_calls: decoding parallelism.

  Returns:
    The source without the bad examples; each is in ``report.skipped`` with
    the reason, and ``report.num_ok`` is the number kept.
  """
  if source.kind == "arrays":
    return source
  read = _reader(source)
  checked = tf.data.Dataset.range(len(source)).map(
      lambda i: (i, tf.shape(_decode_unresized(read(i), image_size))),
      num_parallel_calls=num_parallel_calls, deterministic=False)
  good = [indices for indices, _ in
          checked.ignore_errors().batch(4096).as_numpy_iterator()]
  good = np.sort(np.concatenate(good)) if good else np.zeros(0, np.int64)
  bad = np.setdiff1d(np.arange(len(source)), good)
  for index in bad:
    source.report.skip(source.names[index], _decode_error(source, index,
                                                          image_size))
  source.report.num_ok = len(good)
  if len(bad):
    logging.warning("skipped %d of %d examples that cannot be decoded:\n%s",
                    len(bad), len(source), source.report.summary())
  return source.subset(good)


def _reader(source: Source):
  """A TF function index -> encoded bytes for 'encoded'/'files' sources."""
  if source.kind == "files":
    paths = tf.constant(source.paths.astype(str))
    return lambda i: tf.io.read_file(tf.gather(paths, i))
  encoded = source.encoded

  def fetch(i):
    # Looked up in Python: a constant holding every image would bloat the
    # graph past protobuf limits for large datasets.
    data = tf.numpy_function(lambda j: encoded[j], [i], tf.string,
                             stateful=False)
    return tf.ensure_shape(data, [])

  return fetch


def _decode_error(source: Source, index: int, image_size: int) -> str | None:
  """Why example ``index`` cannot be read and decoded (None if it can)."""
  try:
    if source.kind == "files":
      contents = tf.io.read_file(str(source.paths[index]))
    else:
      contents = tf.constant(source.encoded[index])
    _decode_unresized(contents, image_size)
  except (tf.errors.OpError, ValueError) as err:
    message = getattr(err, "message", str(err)).strip().splitlines()[0]
    if isinstance(err, tf.errors.NotFoundError):
      return f"missing file ({message})"
    return f"cannot decode image ({type(err).__name__}: {message})"
  return None


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """How batches are drawn.

  Attributes:
    global_batch_size: examples per step over all hosts.
    seed: order, flips and FAS targets are functions of (seed, step).
    num_groups: age groups (ages.thresholds_for).
    image_size: output size S (images are resized when they differ).
    train: shuffled epochs with flips and the remainder dropped; False gives
      every example once, in order, the last batch padded ('mask').
    flip: random horizontal flips (train only).
    crop_scale: < 1 adds random square crops (train only, not FAS targets)
      whose side is a uniform fraction in [crop_scale, 1] of the image, at a
      uniform position, resized back to S: scale and shift jitter for small
      real datasets. 1 (default) leaves images whole.
    fas_targets: add 'target_group' and 'target_image'.
    skip_bad_examples: decode everything once up front and drop what fails
      (counted in the report) instead of raising when it is met.
    num_parallel_calls: decoding parallelism.
    prefetch: batches prepared ahead.
    private_threadpool_size: > 0 gives tf.data its own threads.
  """

  global_batch_size: int
  seed: int = 0
  num_groups: int = 7
  image_size: int = 112
  train: bool = True
  flip: bool = True
  crop_scale: float = 1.0
  fas_targets: bool = False
  skip_bad_examples: bool = False
  num_parallel_calls: int = AUTOTUNE
  prefetch: int = AUTOTUNE
  private_threadpool_size: int = 0


def _stream_seed(seed: int, stream: int) -> int:
  """A distinct int64 seed per random stream (permutation, flips, ...)."""
  return (seed * 1_000_003 + stream * 7_919) % (1 << 62)


class InputPipeline:
  """Per-host batches of the contract, in a resumable order.

  Iterating yields NumPy batch dicts and advances ``step``; a new pipeline
  built with ``start_step=N`` yields exactly the batches an uninterrupted one
  yields from step N on. ``dataset()`` is the underlying ``tf.data.Dataset``.
  """

  def __init__(self, source: Source, config: PipelineConfig, *,
               start_step: int = 0, num_steps: int | None = None,
               process_index: int | None = None,
               process_count: int | None = None):
    """Creates the pipeline.

    Args:
      source: the examples.
      config: see PipelineConfig.
      start_step: first step to yield (resume point).
      num_steps: steps to yield (default: unbounded for training, one pass
        for evaluation).
      process_index, process_count: this host and the number of hosts
        (default: jax.process_index() / jax.process_count()).

    Raises:
      ValueError: on batch sizes that do not divide or exceed the data, or
        a FAS pipeline over a source without ages.
    """
    if process_index is None or process_count is None:
      import jax  # pylint: disable=g-import-not-at-top
      process_index, process_count = jax.process_index(), jax.process_count()
    self.config, self.process_index = config, process_index
    self.process_count = process_count
    batch = config.global_batch_size
    if batch <= 0 or batch % process_count:
      raise ValueError(f"global_batch_size {batch} must be a positive "
                       f"multiple of the {process_count} processes")
    self.per_host_batch_size = batch // process_count
    if config.skip_bad_examples:
      source = validate_source(source, config.image_size,
                               config.num_parallel_calls)
    self.source, self.report = source, source.report
    self._read = None if source.kind == "arrays" else _reader(source)
    n = len(source)
    if config.train and n < batch:
      raise ValueError(f"{n} examples cannot fill a global batch of {batch}")
    self.steps_per_epoch = n // batch if config.train else -(-n // batch)
    if num_steps is None and not config.train:
      num_steps = max(self.steps_per_epoch - start_step, 0)
    self.step, self.num_steps = start_step, num_steps
    self.groups = ages_lib.groups_of(source.ages, config.num_groups)
    if config.fas_targets:
      self._build_target_tables()

  def _build_target_tables(self) -> None:
    """Examples sorted by age group, for sampling a target of a group."""
    known = np.flatnonzero(self.groups >= 0)
    if not len(known):
      raise ValueError("fas_targets needs examples with known ages")
    order = known[np.argsort(self.groups[known], kind="stable")]
    counts = np.bincount(self.groups[known], minlength=self.config.num_groups)
    self._present_groups = np.flatnonzero(counts).astype(np.int32)
    if len(self._present_groups) < self.config.num_groups:
      logging.warning("age groups %s have no examples; FAS targets are drawn "
                      "from groups %s only", np.flatnonzero(counts == 0),
                      self._present_groups)
    self._by_group = order.astype(np.int64)
    self._group_offsets = (np.cumsum(counts) - counts).astype(np.int64)
    self._group_counts = counts.astype(np.int64)

  def plan(self, step) -> dict[str, tf.Tensor]:
    """Which examples (and flips, targets) this host reads at ``step``."""
    cfg, n = self.config, len(self.source)
    batch, step = cfg.global_batch_size, tf.cast(step, tf.int64)
    positions = tf.range(batch, dtype=tf.int64)
    if cfg.train:
      epoch = step // self.steps_per_epoch
      positions += (step % self.steps_per_epoch) * batch
      seed = tf.stack([tf.constant(_stream_seed(cfg.seed, _STREAM_PERMUTATION),
                                   tf.int64), epoch])
      index = tf.random.experimental.index_shuffle(
          positions, seed, tf.constant(n - 1, tf.int64))
      mask = tf.ones([batch], tf.bool)
    else:
      positions += step * batch
      mask = positions < n
      index = tf.minimum(positions, n - 1)
    flip_seed = tf.stack([tf.constant(_stream_seed(cfg.seed, _STREAM_FLIP),
                                      tf.int64), step])
    flips = tf.random.stateless_uniform([2, batch], flip_seed) < 0.5
    if not (cfg.train and cfg.flip):
      flips = tf.zeros_like(flips)
    plan = {"index": index, "flip": flips[0], "mask": mask}
    if cfg.train and cfg.crop_scale < 1:
      plan["crop_box"] = self._plan_crops(step, batch)
    if cfg.fas_targets:
      plan.update(self._plan_targets(step, batch))
      plan["target_flip"] = flips[1]
    start = self.process_index * self.per_host_batch_size
    end = start + self.per_host_batch_size
    return {k: v[start:end] for k, v in plan.items()}

  def _plan_targets(self, step, batch: int) -> dict[str, tf.Tensor]:
    """Uniform target groups and a uniform example of each."""
    seed = tf.stack([tf.constant(_stream_seed(self.config.seed, _STREAM_TARGET),
                                 tf.int64), step])
    pick = tf.random.stateless_uniform(
        [batch], seed, 0, len(self._present_groups), dtype=tf.int32)
    group = tf.gather(self._present_groups, pick)
    draw = tf.random.stateless_uniform([batch], seed + [0, 1 << 40], None, None,
                                       dtype=tf.int64)
    within = tf.math.floormod(draw, tf.gather(self._group_counts, group))
    index = tf.gather(self._by_group,
                      tf.gather(self._group_offsets, group) + within)
    return {"target_group": group, "target_index": index}

  def _plan_crops(self, step, batch: int) -> tf.Tensor:
    """Normalised [y0, x0, y1, x1] boxes of random squares (see crop_scale)."""
    seed = tf.stack([tf.constant(_stream_seed(self.config.seed, _STREAM_CROP), tf.int64), step])
    draws = tf.random.stateless_uniform([3, batch], seed)
    side = self.config.crop_scale + (1.0 - self.config.crop_scale) * draws[0]
    top, left = draws[1] * (1.0 - side), draws[2] * (1.0 - side)
    return tf.stack([top, left, top + side, left + side], axis=1)

  def plan_numpy(self, step: int) -> dict[str, np.ndarray]:
    """:meth:`plan` evaluated eagerly (for tests and error reports)."""
    return {k: v.numpy() for k, v in self.plan(step).items()}

  def dataset(self) -> tf.data.Dataset:
    """Batches from ``self.step`` on (for ``num_steps`` steps if set)."""
    cfg = self.config
    end = (self.step + self.num_steps if self.num_steps is not None
           else np.iinfo(np.int64).max)
    plans = tf.data.Dataset.range(self.step, end).map(self.plan)
    if self.source.kind == "arrays":
      batches = plans.map(self._load_batch,
                          num_parallel_calls=cfg.num_parallel_calls,
                          deterministic=True)
    else:
      batches = plans.unbatch().map(
          self._load_element, num_parallel_calls=cfg.num_parallel_calls,
          deterministic=True).batch(self.per_host_batch_size)
    batches = batches.map(self._finish,
                          num_parallel_calls=cfg.num_parallel_calls,
                          deterministic=True).prefetch(cfg.prefetch)
    options = tf.data.Options()
    options.deterministic = True
    options.threading.max_intra_op_parallelism = 1
    if cfg.private_threadpool_size > 0:
      options.threading.private_threadpool_size = cfg.private_threadpool_size
    return batches.with_options(options)

  def _load_batch(self, plan):
    """Gathers in-memory images of a whole batch (arrays sources)."""
    images = self.source.images
    plan = dict(plan)
    keys = ["index"] + (["target_index"] if self.config.fas_targets else [])
    for key in keys:
      gathered = tf.numpy_function(lambda i: images[i], [plan[key]], tf.uint8,
                                   stateful=False)
      gathered = tf.ensure_shape(gathered, [None] + list(images.shape[1:]))
      name = "image" if key == "index" else "target_image"
      plan[name] = _resize(gathered, self.config.image_size)
    return plan

  def _load_element(self, plan):
    """Reads and decodes one example (and its FAS target)."""
    read = self._read
    plan = dict(plan)
    plan["image"] = decode_image(read(plan["index"]), self.config.image_size)
    if self.config.fas_targets:
      plan["target_image"] = decode_image(read(plan["target_index"]),
                                          self.config.image_size)
    return plan

  def _finish(self, plan):
    """Flips, scales to [-1, 1] and attaches the labels."""
    index = plan["index"]
    image = plan["image"]
    if "crop_box" in plan:
      image = _crop_and_resize(image, plan["crop_box"])
    out = {
        "image": _flip_and_scale(image, plan["flip"]),
        "id": tf.gather(self.source.ids, index),
        "age": tf.gather(self.source.ages, index),
        "group": tf.gather(self.groups, index),
        "gender": tf.gather(self.source.genders, index),
        "index": tf.cast(index, tf.int32),
    }
    if self.config.fas_targets:
      out["target_group"] = plan["target_group"]
      out["target_image"] = _flip_and_scale(plan["target_image"],
                                            plan["target_flip"])
    if not self.config.train:
      out["mask"] = plan["mask"]
    return out

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    iterator = self.dataset().as_numpy_iterator()
    while True:
      try:
        batch = next(iterator)
      except StopIteration:
        return
      except tf.errors.OpError as err:
        raise self._explain(err) from err
      self.step += 1
      yield batch

  def _explain(self, err: tf.errors.OpError) -> Exception:
    """Names the example behind a failed step, if one can be found."""
    plan = self.plan_numpy(self.step)
    indices = list(plan["index"]) + list(plan.get("target_index", []))
    for index in dict.fromkeys(int(i) for i in indices):
      reason = (None if self.source.kind == "arrays"
                else _decode_error(self.source, index, self.config.image_size))
      if reason is not None:
        return BadExampleError(
            f"{self.source.names[index]}: {reason} (step {self.step}; pass "
            "skip_bad_examples=True to skip and count bad examples)")
    return err


def _crop_and_resize(images: tf.Tensor, boxes: tf.Tensor) -> tf.Tensor:
  """Crops each uint8 image to its box and resizes it back (bilinear)."""
  size = tf.shape(images)[1:3]
  crops = tf.image.crop_and_resize(tf.cast(images, tf.float32), boxes,
                                   tf.range(tf.shape(images)[0]), size)
  return tf.cast(tf.clip_by_value(tf.round(crops), 0, 255), tf.uint8)


def _flip_and_scale(images: tf.Tensor, flip: tf.Tensor) -> tf.Tensor:
  """Horizontal flip where ``flip``; uint8 -> float32 (x / 255 - 0.5) / 0.5."""
  images = tf.where(flip[:, None, None, None], tf.reverse(images, [2]), images)
  return (tf.cast(images, tf.float32) / 255.0 - 0.5) / 0.5
