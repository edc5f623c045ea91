"""Inference with MTLFace: the flip-averaged ``encode`` and exported bundles.

Two ways in:

* :func:`encode` runs in-process Flax modules on their variables: the
  released TPAMI model's test-time encoding, ``normalize(e(x) + e(mirror x))``
  as the identity embedding and the mean expected (DEX) age of both views.
  Evaluation, the export and the TPAMI parity test use it.
* :func:`load` opens an inference bundle written by
  ``python -m mtlface_jax.export`` and returns an :class:`InferenceModel`
  with ``embed``, ``age``, ``encode`` and (with a generator) ``synthesize``.
  It needs only the bundle, JAX, NumPy and orbax: the serialized
  ``jax.export`` programs replace the model code, so neither
  ``mtlface_jax.models`` nor the training code (nor Flax) is imported.

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
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

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


class InferenceModels(NamedTuple):
  """The Flax modules inference needs (``MTLFaceModels`` fits this too)."""
  encoder: Any
  age: Any
  generator: Any = None


class Encoding(NamedTuple):
  """Flip-averaged outputs for a batch of faces.

  Attributes:
    embedding: float32 [B, D], L2-normalised ``e(x) + e(mirror x)``.
    age: float32 [B], mean expected age (years) of both views.
    group_logits: float32 [B, G], mean age-group logits of both views.
  """
  embedding: Any
  age: Any
  group_logits: Any


def _l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """``x / max(||x||, eps)`` over the last axis, like ``F.normalize``."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


def encode_views(models, variables: dict, images: jax.Array):
  """:func:`encode`, also returning the outputs of both views.

  The images and their mirror images (flipped along the width of NHWC) run
  as one batch of 2N, so the encoder is traced and compiled once.

  Args:
    models: has ``encoder`` and ``age`` Flax modules (:class:`InferenceModels`
      or ``MTLFaceModels``).
    variables: module name -> Flax collections, with ``encoder`` and ``age``.
    images: [N, S, S, 3] faces in [-1, 1].

  Returns:
    (:class:`Encoding`, the encoder's outputs on the 2N views, the age
    estimator's outputs on them); rows N..2N-1 are the mirrored views.
  """
  n = images.shape[0]
  views = jnp.concatenate([images, jnp.flip(images, axis=2)], axis=0)
  features = models.encoder.apply(variables["encoder"], views, train=False)
  ages = models.age.apply(variables["age"], features.x_age, False)
  embedding = features.embedding.astype(jnp.float32)
  group_logits = ages.group_logits.astype(jnp.float32)
  encoding = Encoding(
      embedding=_l2_normalize(embedding[:n] + embedding[n:]),
      age=0.5 * (ages.expected_age[:n] + ages.expected_age[n:]).astype(jnp.float32),
      group_logits=0.5 * (group_logits[:n] + group_logits[n:]))
  return encoding, features, ages


def encode(models, variables: dict, images: jax.Array) -> Encoding:
  """Flip-averaged embedding and expected age (the released model's ``encode``).

  For the TPAMI model, whose embeddings are already normalised, this is its
  ``encode``; CVPR models get the same test-time augmentation (the sum of the
  raw embeddings, normalised). Jit it; it is pure.

  Args:
    models: has ``encoder`` and ``age`` Flax modules.
    variables: module name -> Flax collections, with ``encoder`` and ``age``.
    images: [N, S, S, 3] faces in [-1, 1].

  Returns:
    The :class:`Encoding`.
  """
  return encode_views(models, variables, images)[0]


# --- reading variables --------------------------------------------------------

def restore_variables(directory: str | Path, step: Optional[int] = None,
                      modules: Optional[tuple[str, ...]] = None) -> tuple[dict, dict, int]:
  """Reads only the variables of a checkpoint written by ``Checkpointer``.

  Works for training checkpoints (the optimizer states are left on disk),
  converted PyTorch checkpoints and a bundle's ``variables/``.

  Args:
    directory: the directory holding the step folders (``checkpoints/``).
    step: which step; the latest if None.
    modules: restore only these modules (those present); all if None.

  Returns:
    (module -> collections of NumPy arrays, the JSON meta, the step).

  Raises:
    FileNotFoundError: if ``directory`` holds no checkpoint (or not ``step``).
    BundleError: if the checkpoint has no ``variables``.
  """
  directory = Path(directory).absolute()
  if not directory.is_dir():
    raise FileNotFoundError(f"checkpoint directory not found: {directory}")
  manager = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(create=False),
      item_handlers={"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
  try:
    steps = manager.all_steps()
    step = manager.latest_step() if step is None else step
    if step is None or step not in steps:
      raise FileNotFoundError(f"no checkpoint{'' if step is None else f' at step {step}'} in "
                              f"{directory} (steps found: {sorted(steps)})")
    tree = manager.item_metadata(step)["state"].tree
    if not isinstance(tree, dict) or not isinstance(tree.get("variables"), dict):
      raise BundleError(f"checkpoint {directory}/{step} holds no 'variables'")
    stored = {name: value for name, value in tree["variables"].items()
              if modules is None or name in modules}
    # Partial restore: only the wanted subtree is read, as host NumPy arrays.
    item = {"variables": jax.tree_util.tree_map(lambda m: np.zeros((), m.dtype), stored)}
    restore_args = jax.tree_util.tree_map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item, restore_args=restore_args, partial_restore=True),
        meta=ocp.args.JsonRestore()))
  finally:
    manager.close()
  return dict(restored["state"]["variables"]), dict(restored["meta"] or {}), int(step)


# --- exported bundles ------------------------------------------------------------

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
    variables, _, _ = restore_variables(self.path / VARIABLES_DIR)
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
