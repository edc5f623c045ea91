"""Batched, data-parallel prediction of a loaded model: embeddings, ages, synthesis.

:class:`ModelRunner` wraps a :class:`~mtlface_jax.predict.LoadedModel`. Its
jitted programs are built from :mod:`mtlface_jax.predict` (the one encoder:
flip-averaged embedding, age and group logits), take the variables as
arguments (so large models compile fast) and are cached per module
configuration, so several protocols on one model compile each program once
per batch shape. Batches are split over all devices along the batch axis
(:func:`extract_embeddings` pads the last one); the variables are replicated
once.

Inputs are float32 faces in [-1, 1] (``datasets.to_model_input``) at the
model's input side; other sizes are resized on the device (bilinear,
antialiased), which compiles a program per input size.
"""

import functools
from typing import Any, Callable, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from mtlface_jax import ages as ages_lib
from mtlface_jax import predict

EmbedFn = Callable[[Any], Any]
GROUP_SOURCES = ("head", "age")


def data_parallel_sharding(devices: Optional[Sequence[jax.Device]] = None):
  """A sharding that splits the batch axis over ``devices`` (default: all).

  Args:
    devices: devices to use.

  Returns:
    ``NamedSharding(Mesh(devices, ("data",)), P("data"))``.
  """
  mesh = jax.sharding.Mesh(np.asarray(devices or jax.devices()), ("data",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))


def extract_embeddings(embed_fn: Callable[[Any], Any],
                       images: Iterable[Any],
                       batch_size: int,
                       sharding: Optional[jax.sharding.Sharding] = None,
                       input_dtype=np.float32,
                       progress: bool = True,
                       description: str = "embeddings",
                       total: Optional[int] = None) -> Any:
  """Runs ``embed_fn`` over images in fixed-size batches and gathers outputs.

  Every batch has exactly ``batch_size`` images (the last one is zero-padded
  and the padding dropped from the outputs), so a jitted ``embed_fn`` compiles
  once. Device work overlaps with loading the next batch because outputs are
  copied to the host one batch late.

  Args:
    embed_fn: maps an [B, H, W, C] batch to an array [B, ...] or a pytree of
      such arrays (e.g. embeddings and ages).
    images: iterable of single images [H, W, C] (a NumPy array [N, H, W, C]
      works, as does a generator that decodes files lazily).
    batch_size: images per call. With ``sharding`` it is rounded up to a
      multiple of the sharding's device count.
    sharding: optional ``jax.sharding.Sharding`` to place each batch with,
      e.g. ``NamedSharding(Mesh(jax.devices(), ("data",)), P("data"))`` for
      data parallelism over all devices.
    input_dtype: dtype of the batches fed to ``embed_fn`` (e.g. bfloat16).
    progress: show a tqdm progress bar.
    description: progress bar label.
    total: number of images for the progress bar (default ``len(images)``).

  Returns:
    The outputs for all images, concatenated along axis 0, as NumPy arrays with
    ``embed_fn``'s pytree structure.

  Raises:
    ValueError: on an empty input, a non-positive batch size, or an image
      whose shape differs from the first one (its index is named).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if sharding is not None:
    num_devices = len(sharding.device_set)
    batch_size = -(-batch_size // num_devices) * num_devices
  if total is None and hasattr(images, "__len__"):
    total = len(images)
  gathered, pending = [], None
  with tqdm(total=total, desc=description, unit="img", disable=not progress) as bar:
    for batch, num_valid in _padded_batches(images, batch_size, input_dtype):
      if sharding is not None:
        batch = jax.device_put(batch, sharding)
      outputs = embed_fn(batch)  # Dispatched asynchronously.
      if pending is not None:
        gathered.append(_to_host(*pending))
      pending = (outputs, num_valid)
      bar.update(num_valid)
  if pending is None:
    raise ValueError("no images to embed")
  gathered.append(_to_host(*pending))
  return jax.tree_util.tree_map(lambda *parts: np.concatenate(parts, axis=0), *gathered)


def _padded_batches(images: Iterable[Any], batch_size: int, dtype):
  """Yields (batch [batch_size, H, W, C], number of real images in it)."""
  buffer, filled, shape = None, 0, None
  for index, image in enumerate(images):
    image = np.asarray(image)
    if shape is None:
      shape = image.shape
      if image.ndim != 3:
        raise ValueError(f"image 0 must be [H, W, C], got shape {image.shape}")
    elif image.shape != shape:
      raise ValueError(f"image {index} has shape {image.shape}, expected {shape} "
                       "like image 0")
    if buffer is None:
      # A fresh buffer per batch: the previous one may still be read by an
      # asynchronously running computation.
      buffer = np.zeros((batch_size, *shape), dtype)
    buffer[filled] = image
    filled += 1
    if filled == batch_size:
      yield buffer, filled
      buffer, filled = None, 0
  if filled:
    yield buffer, filled


def _to_host(outputs: Any, num_valid: int) -> Any:
  """Copies outputs to NumPy, dropping the padding rows."""
  return jax.tree_util.tree_map(lambda leaf: np.asarray(leaf)[:num_valid], outputs)


def _fit(images: jax.Array, image_size: int) -> jax.Array:
  """Resizes a batch to the model's side when it differs (decided at trace time)."""
  images = images.astype(jnp.float32)
  if images.shape[1:3] == (image_size, image_size):
    return images
  shape = (images.shape[0], image_size, image_size, images.shape[3])
  return jax.image.resize(images, shape, method="bilinear", antialias=True)


@functools.lru_cache(maxsize=32)
def embedding_program(encoder, flip: bool, image_size: Optional[int] = None) -> Callable:
  """jitted ``(encoder variables, images) -> float32 [B, D]``: :func:`predict.embed`."""
  @jax.jit
  def embed(variables, images):
    if image_size is not None:
      images = _fit(images, image_size)
    return predict.embed(encoder, variables, images, flip)

  return embed


@functools.lru_cache(maxsize=32)
def encode_program(models, flip: bool, image_size: int) -> Callable:
  """jitted ``(variables, images) -> {'embedding', 'age', 'group'}``: :func:`predict.encode`.

  ``age`` is the expected age in years, ``group`` the argmax of the
  (flip-averaged) age-group logits.
  """
  @jax.jit
  def encode(variables, images):
    out = predict.encode(models, variables, _fit(images, image_size), flip)
    return {"embedding": out.embedding, "age": out.age,
            "group": jnp.argmax(out.group_logits, axis=-1).astype(jnp.int32)}

  return encode


@functools.lru_cache(maxsize=32)
def synthesis_program(models, num_groups: int, image_size: int) -> Callable:
  """jitted ``(variables, images) -> float32 [B, G, S, S, 3]``: every age group."""
  @jax.jit
  def synthesize(variables, images):
    out = predict.synthesize_all_groups(models, variables, _fit(images, image_size),
                                        num_groups)
    return out.astype(jnp.float32)

  return synthesize


def embed_fn(encoder, variables, flip: bool = True,
             sharding: Optional[jax.sharding.NamedSharding] = None) -> EmbedFn:
  """``images [B, H, W, 3] -> [B, D]`` embeddings of any encoder-like module.

  Args:
    encoder: a Flax module whose output has an ``embedding`` (``Encoder``).
    variables: its variables.
    flip: flip-average (:func:`predict.embed`).
    sharding: the batches' data-parallel sharding; the variables are then
      replicated over its mesh once, here.

  Returns:
    The embedding function (jitted; variables are an argument, not constants).
  """
  program = embedding_program(encoder, flip)
  if sharding is not None:
    replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    variables = jax.device_put(variables, replicated)
  return lambda images: program(variables, images)


class ModelRunner:
  """Batched inference of one loaded model over all (or given) devices.

  Args:
    loaded: the model.
    batch_size: images per device call (rounded up to a multiple of the
      device count); the last batch is padded, so each program compiles once.
    flip: flip-average the encoding (test-time augmentation).
    sharding: batch sharding; default :func:`data_parallel_sharding` over
      all devices.
    progress: show progress bars.
  """

  def __init__(self, loaded: predict.LoadedModel, batch_size: int = 64, flip: bool = True,
               sharding: Optional[jax.sharding.NamedSharding] = None, progress: bool = True):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.loaded = loaded
    self.batch_size = batch_size
    self.flip = flip
    self.sharding = sharding if sharding is not None else data_parallel_sharding()
    self.progress = progress
    self.image_size = int(loaded.info["image_size"])
    self.num_groups = int(loaded.info["age_group"])
    self._replicated = {}

  @property
  def num_devices(self) -> int:
    """Devices the batches are split over."""
    return len(self.sharding.device_set)

  def _variables(self, name: str) -> Any:
    """The module's variables, replicated on the mesh (once)."""
    if name not in self._replicated:
      replicated = jax.sharding.NamedSharding(self.sharding.mesh, jax.sharding.PartitionSpec())
      self._replicated[name] = jax.device_put(self.loaded.variables[name], replicated)
    return self._replicated[name]

  def embed_fn(self) -> EmbedFn:
    """``images [B, H, W, 3] -> [B, D]`` for ``protocols.score_pair_list`` & co."""
    predict.require_modules(self.loaded, ("encoder",), "face embedding")
    program = embedding_program(self.loaded.models.encoder, self.flip, self.image_size)
    variables = self._variables("encoder")
    return lambda images: program(variables, images)

  def embed(self, faces: Iterable[np.ndarray], total: Optional[int] = None,
            description: str = "embedding", progress: Optional[bool] = None) -> np.ndarray:
    """Embeddings [N, D] of float32 faces in [-1, 1].

    Args:
      faces: float32 [H, W, 3] faces (an array [N, H, W, 3] or an iterator).
      total: number of faces, for the progress bar.
      description: progress bar label.
      progress: overrides the runner's progress setting.

    Returns:
      float32 [N, D].
    """
    return self._run(self.embed_fn(), faces, total, description, progress)

  def estimate_ages(self, faces: Iterable[np.ndarray], total: Optional[int] = None,
                    description: str = "age estimation",
                    progress: Optional[bool] = None) -> dict[str, np.ndarray]:
    """Age estimates of faces (arguments as :meth:`embed`).

    Returns:
      ``{'embedding': float32 [N, D], 'age': float32 [N] DEX expected age,
      'group': int32 [N] argmax of the age-group logits}``, flip-averaged
      with ``flip`` (:func:`predict.encode`, the same numbers as a bundle's
      ``encode``).
    """
    predict.require_modules(self.loaded, ("encoder", "age"), "age estimation")
    program = encode_program(self.loaded.models, self.flip, self.image_size)
    variables = {name: self._variables(name) for name in ("encoder", "age")}
    return self._run(lambda images: program(variables, images), faces, total,
                     description, progress)

  def synthesize(self, faces: Iterable[np.ndarray], total: Optional[int] = None,
                 description: str = "synthesis",
                 progress: Optional[bool] = None) -> np.ndarray:
    """Each face synthesized at every age group (arguments as :meth:`embed`).

    Returns:
      float32 [N, G, S, S, 3] in [-1, 1], S the model's input side.
    """
    predict.require_modules(self.loaded, ("encoder", "generator"), "face age synthesis")
    program = synthesis_program(self.loaded.models, self.num_groups, self.image_size)
    variables = {name: self._variables(name) for name in ("encoder", "generator")}
    return self._run(lambda images: program(variables, images), faces, total, description,
                     progress)

  def _run(self, fn, faces, total, description, progress):
    show = self.progress if progress is None else progress
    return extract_embeddings(fn, faces, self.batch_size, sharding=self.sharding,
                                     progress=show, description=description, total=total)


def estimated_groups(ages: dict[str, np.ndarray], num_groups: int,
                     group_from: str = "head") -> np.ndarray:
  """The age group of each estimate: the group head, or the expected age's group.

  Args:
    ages: from :meth:`ModelRunner.estimate_ages`.
    num_groups: number of age groups.
    group_from: "head" (argmax of the estimator's group classifier) or "age"
      (``ages.age_to_group`` of the expected age).

  Returns:
    int [N] groups.
  """
  if group_from not in GROUP_SOURCES:
    raise ValueError(f"group_from must be one of {GROUP_SOURCES}, got {group_from!r}")
  if group_from == "head":
    return np.asarray(ages["group"])
  return np.asarray(ages_lib.age_to_group(np.asarray(ages["age"]), num_groups))
