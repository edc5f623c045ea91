"""Jitted, data-parallel inference of a loaded model: embeddings, ages, synthesis.

:class:`ModelRunner` wraps a :class:`~mtlface_jax.evaluation.loading.LoadedModel`.
Its programs take the variables as arguments (so large models compile fast)
and are cached per module configuration, so evaluating the same model twice
in one process, e.g. several protocols, compiles each program once per batch
shape. Batches are split over all devices along the batch axis; the
variables are replicated once.

Inputs are float32 faces in [-1, 1] (the batch contract's scaling). They should
already have the model's input side (``loaded.info['image_size']``; see
:func:`array_faces` and ``runner.load_face``); other sizes are resized on the
device (bilinear, antialiased), which compiles a program per input size.
"""

import functools
from typing import Any, Callable, Iterable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mtlface_jax import ages as ages_lib
from mtlface_jax import synthesis
from mtlface_jax.evaluation import loading
from mtlface_jax.evaluation import report
from mtlface_jax.evaluation import runner
from mtlface_jax.formats import images as images_lib

GROUP_SOURCES = ("head", "age")


def array_faces(images: Iterable[np.ndarray], image_size: int) -> Iterator[np.ndarray]:
  """uint8 [H, W, 3] faces (already aligned) -> model inputs at ``image_size``.

  Args:
    images: e.g. a synthetic split's ``images`` array (112x112 faces).
    image_size: the model's input side.

  Yields:
    float32 [image_size, image_size, 3] in [-1, 1].
  """
  for image in images:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f"expected uint8 [H, W, 3] faces, got {image.dtype} {image.shape}")
    yield runner.to_model_input(images_lib.resize_image(image, image_size))


def file_faces(paths: Iterable[str], image_size: int,
               lfw_style: bool = False) -> Iterator[np.ndarray]:
  """Decodes image files lazily into model inputs (see ``runner.load_face``)."""
  for path in paths:
    yield runner.load_face(path, lfw_style, image_size)


def _fit(images: jax.Array, image_size: int) -> jax.Array:
  """Resizes a batch to the model's side when it differs (decided at trace time)."""
  images = images.astype(jnp.float32)
  if images.shape[1:3] == (image_size, image_size):
    return images
  shape = (images.shape[0], image_size, image_size, images.shape[3])
  return jax.image.resize(images, shape, method="bilinear", antialias=True)


@functools.lru_cache(maxsize=32)
def embedding_program(encoder, flip: bool, image_size: int) -> Callable:
  """jitted ``(encoder variables, images) -> float32 [B, D]`` embeddings.

  With ``flip`` the embedding of each image and of its mirror are summed
  (the reference's test-time augmentation; cosine scoring ignores the scale).
  """
  def single(variables, images):
    return encoder.apply(variables, images, train=False).embedding.astype(jnp.float32)

  @jax.jit
  def embed(variables, images):
    images = _fit(images, image_size)
    if flip:
      return report.flip_sum_embeddings(lambda x: single(variables, x), images)
    return single(variables, images)

  return embed


@functools.lru_cache(maxsize=32)
def age_program(encoder, age_module, image_size: int) -> Callable:
  """jitted ``(encoder vars, age vars, images) -> {'age', 'group'}``.

  ``age`` is the DEX expected age in years; ``group`` the argmax of the
  estimator's age-group head.
  """
  @jax.jit
  def estimate(encoder_variables, age_variables, images):
    out = encoder.apply(encoder_variables, _fit(images, image_size), train=False)
    ages = age_module.apply(age_variables, out.x_age.astype(jnp.float32), False)
    return {"age": ages.expected_age,
            "group": jnp.argmax(ages.group_logits, axis=-1).astype(jnp.int32)}

  return estimate


@functools.lru_cache(maxsize=32)
def synthesis_program(models, num_groups: int, image_size: int) -> Callable:
  """jitted ``(variables, images) -> float32 [B, G, S, S, 3]``: every age group."""
  @jax.jit
  def synthesize(variables, images):
    out = synthesis.synthesize_all_groups(models, variables, _fit(images, image_size),
                                          num_groups)
    return out.astype(jnp.float32)

  return synthesize


class ModelRunner:
  """Batched inference of one loaded model over all (or given) devices.

  Args:
    loaded: the model.
    batch_size: images per device call (rounded up to a multiple of the
      device count); the last batch is padded, so each program compiles once.
    flip: flip-sum embeddings (test-time augmentation).
    sharding: batch sharding; default ``runner.data_parallel_sharding()`` over
      all devices.
    progress: show progress bars.
  """

  def __init__(self, loaded: loading.LoadedModel, batch_size: int = 64, flip: bool = True,
               sharding: Optional[jax.sharding.NamedSharding] = None, progress: bool = True):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.loaded = loaded
    self.batch_size = batch_size
    self.flip = flip
    self.sharding = sharding if sharding is not None else runner.data_parallel_sharding()
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

  def embed_fn(self) -> runner.EmbedFn:
    """``images [B, H, W, 3] -> [B, D]`` for ``runner.verify_pair_list`` & co."""
    loading.require_modules(self.loaded, ("encoder",), "face embedding")
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
      ``{'age': float32 [N] DEX expected age, 'group': int32 [N] argmax of
      the age-group head}``.
    """
    loading.require_modules(self.loaded, ("encoder", "age"), "age estimation")
    models = self.loaded.models
    program = age_program(models.encoder, models.age, self.image_size)
    encoder_vars, age_vars = self._variables("encoder"), self._variables("age")
    return self._run(lambda images: program(encoder_vars, age_vars, images), faces, total,
                     description, progress)

  def synthesize(self, faces: Iterable[np.ndarray], total: Optional[int] = None,
                 description: str = "synthesis",
                 progress: Optional[bool] = None) -> np.ndarray:
    """Each face synthesized at every age group (arguments as :meth:`embed`).

    Returns:
      float32 [N, G, S, S, 3] in [-1, 1], S the model's input side.
    """
    loading.require_modules(self.loaded, ("encoder", "generator"), "face age synthesis")
    program = synthesis_program(self.loaded.models, self.num_groups, self.image_size)
    variables = {name: self._variables(name) for name in ("encoder", "generator")}
    return self._run(lambda images: program(variables, images), faces, total, description,
                     progress)

  def _run(self, fn, faces, total, description, progress):
    show = self.progress if progress is None else progress
    return report.extract_embeddings(fn, faces, self.batch_size, sharding=self.sharding,
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
