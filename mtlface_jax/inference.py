"""Exported inference bundles: load and run them without the model code.

:func:`load` opens an inference bundle written by ``python -m
mtlface_jax.export`` and returns an :class:`InferenceModel` with ``embed``,
``age``, ``encode`` and (with a generator) ``synthesize``. It needs only the
bundle, JAX, NumPy and orbax: the serialized ``jax.export`` programs replace
the model code, so neither ``mtlface_jax.models`` nor the training code (nor
Flax) is imported. In-process prediction with Flax modules is
:mod:`mtlface_jax.predict`, whose ``encode`` the bundle's programs were
exported from.

A bundle is a directory::

  bundle.json            manifest: format, image size, groups, dtype, platforms
  config.json            the source checkpoint's config (or conversion metadata)
  variables/             orbax checkpoint, step 0: {'variables': {module: collections}}
  encode.jaxexport       (variables, images[b,S,S,3]) -> embedding, age, group_logits
  synthesize.jaxexport   (variables, images[b,S,S,3], groups[b]) -> images (optional)

The programs take the variables as their first argument rather than holding
them as constants, so the weights are stored once (in ``variables/``) and the
programs stay small.
"""

import json
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from mtlface_jax import checkpoint_io

BUNDLE_FORMAT = "mtlface-jax-inference-bundle"
BUNDLE_VERSION = 1
MANIFEST_FILE = "bundle.json"
CONFIG_FILE = "config.json"
VARIABLES_DIR = "variables"
ENCODE_FILE = "encode.jaxexport"
SYNTHESIZE_FILE = "synthesize.jaxexport"
INFERENCE_MODULES = ("encoder", "age", "generator")


class BundleError(ValueError):
  """An inference bundle that is incomplete, corrupt or of another format."""


class Encoding(NamedTuple):
  """The encoding of a batch of faces (``mtlface_jax.predict.encode``'s output).

  Attributes:
    embedding: float32 [B, D], L2-normalised (``e(x) + e(mirror x)`` with flip).
    age: float32 [B], expected age in years (mean of both views with flip).
    group_logits: float32 [B, G] age-group logits (mean of both views with flip).
  """
  embedding: Any
  age: Any
  group_logits: Any


def _read_json(path: Path) -> dict:
  try:
    value = json.loads(path.read_text())
  except FileNotFoundError:
    raise
  except (OSError, ValueError) as error:
    raise BundleError(f"{path}: unreadable JSON ({error})") from error
  if not isinstance(value, dict):
    raise BundleError(f"{path}: expected a JSON object")
  return value


def _deserialize(path: Path) -> jax.export.Exported:
  if not path.is_file():
    raise BundleError(f"{path}: missing exported program")
  try:
    return jax.export.deserialize(bytearray(path.read_bytes()))
  except Exception as error:  # pylint: disable=broad-except  (flatbuffers raise many kinds)
    raise BundleError(f"{path}: not a serialized jax.export program "
                      f"({type(error).__name__}: {error})") from error


class InferenceModel:
  """Callables over an exported bundle; see :func:`load`.

  Attributes:
    path: the bundle directory.
    manifest: ``bundle.json``.
    config: ``config.json`` (the source checkpoint's config or conversion meta).
    image_size: S of the [B, S, S, 3] inputs.
    num_groups: age groups G (targets of :meth:`synthesize`).
    embedding_size: D of the embeddings.
    has_generator: whether :meth:`synthesize` is available.
  """

  def __init__(self, path: str | Path):
    self.path = Path(path).absolute()
    manifest_path = self.path / MANIFEST_FILE
    if not manifest_path.is_file():
      raise FileNotFoundError(
          f"no inference bundle at {self.path}: {MANIFEST_FILE} is missing "
          "(write a bundle with python -m mtlface_jax.export)")
    self.manifest = _read_json(manifest_path)
    if (self.manifest.get("format") != BUNDLE_FORMAT
        or self.manifest.get("version") != BUNDLE_VERSION):
      raise BundleError(f"{manifest_path}: not a version-{BUNDLE_VERSION} {BUNDLE_FORMAT} "
                        f"(format={self.manifest.get('format')!r}, "
                        f"version={self.manifest.get('version')!r})")
    config_path = self.path / CONFIG_FILE
    self.config = _read_json(config_path) if config_path.is_file() else {}
    try:
      self.image_size = int(self.manifest["image_size"])
      self.num_groups = int(self.manifest["num_groups"])
      functions = dict(self.manifest["functions"])
    except (KeyError, TypeError, ValueError) as error:
      raise BundleError(f"{manifest_path}: incomplete manifest ({error!r})") from error
    if "encode" not in functions:
      raise BundleError(f"{manifest_path}: lists no 'encode' program")
    encode_program = _deserialize(self.path / functions["encode"]["file"])
    self._encode = jax.jit(encode_program.call)
    self._synthesize = None
    if "synthesize" in functions:
      self._synthesize = jax.jit(_deserialize(self.path / functions["synthesize"]["file"]).call)
    variables, _, _ = checkpoint_io.restore_variables(self.path / VARIABLES_DIR)
    # On the device once; every call then passes references, not 100s of MB.
    self._variables = jax.device_put(variables)
    outputs = jax.tree_util.tree_unflatten(encode_program.out_tree, encode_program.out_avals)
    self.embedding_size = int(outputs["embedding"].shape[-1])

  @property
  def has_generator(self) -> bool:
    return self._synthesize is not None

  def _check_images(self, images: Any) -> np.ndarray:
    images = np.asarray(images, np.float32)
    expected = (self.image_size, self.image_size, 3)
    if images.ndim != 4 or images.shape[1:] != expected:
      raise ValueError(f"images must be float [B, {self.image_size}, {self.image_size}, 3] "
                       f"(NHWC RGB in [-1, 1]), got shape {images.shape}"
                       + ("; add a batch axis with images[None]"
                          if images.shape == expected else ""))
    if images.shape[0] == 0:
      raise ValueError("images is an empty batch")
    return images

  def encode(self, images: Any) -> Encoding:
    """Flip-averaged :class:`Encoding` (NumPy arrays) of [B, S, S, 3] faces in [-1, 1]."""
    out = self._encode(self._variables, self._check_images(images))
    return Encoding(np.asarray(out["embedding"]), np.asarray(out["age"]),
                    np.asarray(out["group_logits"]))

  def embed(self, images: Any) -> np.ndarray:
    """L2-normalised flip-averaged embeddings, float32 [B, D]."""
    return self.encode(images).embedding

  def age(self, images: Any) -> np.ndarray:
    """Expected ages in years (mean of both views), float32 [B]."""
    return self.encode(images).age

  def synthesize(self, images: Any, groups: Any) -> np.ndarray:
    """Renders each face at its target age group.

    Args:
      images: [B, S, S, 3] faces in [-1, 1].
      groups: int target group per face ([B]), or one int for all.

    Returns:
      float32 [B, S, S, 3] synthesised faces in [-1, 1].

    Raises:
      ValueError: if the bundle has no generator, or on bad shapes or groups.
    """
    if self._synthesize is None:
      raise ValueError(f"bundle {self.path} has no generator (exported from a checkpoint "
                       "without face age synthesis); only embed/age/encode are available")
    images = self._check_images(images)
    groups = np.asarray(groups)
    if not np.issubdtype(groups.dtype, np.integer):
      raise ValueError(f"groups must be integers, got dtype {groups.dtype}")
    if groups.ndim == 0:
      groups = np.full(images.shape[:1], groups)
    groups = groups.astype(np.int32)
    if groups.shape != images.shape[:1]:
      raise ValueError(f"groups must have shape [{images.shape[0]}], got {groups.shape}")
    if groups.min() < 0 or groups.max() >= self.num_groups:
      raise ValueError(f"groups must be in [0, {self.num_groups}), got {groups.tolist()}")
    return np.asarray(self._synthesize(self._variables, images, groups))


def load(path: str | Path) -> InferenceModel:
  """Opens an inference bundle written by ``python -m mtlface_jax.export``.

  Args:
    path: the bundle directory.

  Returns:
    An :class:`InferenceModel`; each program compiles on first use per batch
    size (any batch size works).

  Raises:
    FileNotFoundError: if ``path`` is not a bundle (no ``bundle.json``).
    BundleError: if the bundle is of another format or a file is corrupt.
  """
  return InferenceModel(path)
