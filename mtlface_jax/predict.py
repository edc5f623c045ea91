"""Predictions of a model in this process: the one encoder of faces, and synthesis.

* :func:`encode` is THE face encoding every consumer uses (evaluation,
  the training-time verification hook, exported bundles, the CLI): the
  released TPAMI model's test-time encoding, ``normalize(e(x) + e(mirror x))``
  as the identity embedding, and the mean expected (DEX) age and mean
  age-group logits of both views. ``flip=False`` encodes the image alone.
* :func:`synthesize` / :func:`synthesize_all_groups` age faces with the
  generator; :func:`progression_grid` tiles the results.
* :func:`load` reads a checkpoint (training workdir, converted PyTorch
  weights, a bundle's ``variables/``) into a :class:`LoadedModel`: the Flax
  modules its spec describes, host variables checked against them, and facts.

Inputs are float32 NHWC faces in [-1, 1] at the model's input side.
"""

import functools
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtlface_jax import checkpoint_io
from mtlface_jax import inference
from mtlface_jax.models import heads
from mtlface_jax.models import spec as spec_lib


# The type lives with the bundle loader, which must not import Flax.
Encoding = inference.Encoding


def encode_views(models, variables: dict, images: jax.Array, flip: bool = True):
  """:func:`encode`, also returning the encoder's and age estimator's raw outputs.

  With ``flip`` the images and their mirrors (flipped along the width) run as
  one batch of 2N, so the encoder is traced and compiled once.

  Args:
    models: has ``encoder`` and ``age`` Flax modules (``MTLFaceModels``).
    variables: module name -> Flax collections, with ``encoder`` and ``age``.
    images: [N, S, S, 3] faces in [-1, 1].
    flip: average with the mirrored views.

  Returns:
    (:class:`Encoding`, encoder outputs, age outputs); with ``flip`` rows
    N..2N-1 of the raw outputs are the mirrored views.
  """
  n = images.shape[0]
  views = jnp.concatenate([images, jnp.flip(images, axis=2)], axis=0) if flip else images
  features = models.encoder.apply(variables["encoder"], views, train=False)
  ages = models.age.apply(variables["age"], features.x_age, False)
  embedding = features.embedding.astype(jnp.float32)
  group_logits = ages.group_logits.astype(jnp.float32)
  age = ages.expected_age.astype(jnp.float32)
  if flip:
    embedding = embedding[:n] + embedding[n:]
    age = 0.5 * (age[:n] + age[n:])
    group_logits = 0.5 * (group_logits[:n] + group_logits[n:])
  return Encoding(heads.l2_normalize(embedding), age, group_logits), features, ages


def encode(models, variables: dict, images: jax.Array, flip: bool = True) -> Encoding:
  """The :class:`Encoding` of faces (pure; jit it). See :func:`encode_views`."""
  return encode_views(models, variables, images, flip)[0]


def embed(encoder, encoder_variables: dict, images: jax.Array, flip: bool = True) -> jax.Array:
  """Only the embedding of :func:`encode` (no age estimator needed).

  Args:
    encoder: the encoder module.
    encoder_variables: its variables.
    images: [N, S, S, 3] faces in [-1, 1].
    flip: sum with the mirrored view's embedding before normalising.

  Returns:
    float32 [N, D], L2-normalised.
  """
  n = images.shape[0]
  views = jnp.concatenate([images, jnp.flip(images, axis=2)], axis=0) if flip else images
  embedding = encoder.apply(encoder_variables, views, train=False).embedding
  embedding = embedding.astype(jnp.float32)
  if flip:
    embedding = embedding[:n] + embedding[n:]
  return heads.l2_normalize(embedding)


def synthesize(models, variables: dict, images: jax.Array,
               target_group: jax.Array) -> jax.Array:
  """Ages ``images`` [N,S,S,3] in [-1,1] to ``target_group`` [N] (inference mode)."""
  out = models.encoder.apply(variables["encoder"], images, train=False)
  return models.generator.apply(variables["generator"], images, out.x2, out.x3, out.x4,
                                out.x_id, target_group, train=False)


def synthesize_all_groups(models, variables: dict, images: jax.Array,
                          num_groups: int) -> jax.Array:
  """[N, G, S, S, 3]: each input rendered at every age group.

  The encoder runs once per input; only the generator repeats per group.
  """
  out = models.encoder.apply(variables["encoder"], images, train=False)
  n = images.shape[0]

  def one_group(group):
    target = jnp.full((n,), group, jnp.int32)
    return models.generator.apply(variables["generator"], images, out.x2, out.x3, out.x4,
                                  out.x_id, target, train=False)

  return jnp.stack([one_group(g) for g in range(num_groups)], axis=1)


@functools.lru_cache(maxsize=8)
def jitted_all_groups(models, num_groups: int):
  """A cached jitted :func:`synthesize_all_groups` for ``models``."""
  return jax.jit(functools.partial(synthesize_all_groups, models, num_groups=num_groups))


def progression_grid(images: np.ndarray, synthesized: np.ndarray) -> np.ndarray:
  """Tiles rows of [input, group 0, ..., group G-1] into one uint8 HWC image.

  Args:
    images: [N, H, W, 3] inputs in [-1, 1].
    synthesized: [N, G, H, W, 3] outputs in [-1, 1].

  Returns:
    uint8 array of shape [N*H, (G+1)*W, 3].
  """
  rows = np.concatenate([np.asarray(images)[:, None], np.asarray(synthesized)], axis=1)
  n, cols, h, w, c = rows.shape
  grid = rows.transpose(0, 2, 1, 3, 4).reshape(n * h, cols * w, c)
  return np.clip((grid + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


# --- models from checkpoints ---------------------------------------------------


class LoadedModel(NamedTuple):
  """A model ready for prediction (unpacks as ``models, variables, info``).

  Attributes:
    models: the ``MTLFaceModels`` of its spec.
    variables: module name -> Flax collections (host arrays), only for the
      modules the checkpoint holds (e.g. no ``generator`` after AIFR only).
    info: JSON-ready facts: ``checkpoint`` (path or "in-process"), ``kind``
      ("training" / "converted" / "bundle" / "in-process"), ``step``,
      ``family``, ``image_size``, ``age_group``, ``modules``, ``dtype``,
      ``model`` (the spec as a dict), plus ``task`` (training) or ``layout``
      (converted).
  """
  models: spec_lib.MTLFaceModels
  variables: dict
  info: dict

  @property
  def spec(self) -> spec_lib.ModelSpec:
    """The :class:`~mtlface_jax.models.spec.ModelSpec` the models were built from."""
    return spec_lib.ModelSpec.from_dict(self.info["model"])


def _info(spec: spec_lib.ModelSpec, **facts) -> dict:
  return {**facts, "family": spec.family, "image_size": spec.image_size,
          "age_group": spec.age_group, "model": spec.to_dict()}


def load(path, dtype: str = "float32", step: Optional[int] = None,
         validate: bool = True) -> LoadedModel:
  """Loads a training, converted or bundle checkpoint (variables only).

  Args:
    path: a training workdir or its ``checkpoints/``, a converted checkpoint,
      or a bundle (its ``variables/``).
    dtype: compute dtype of the encoder/generator ("float32" or "bfloat16").
    step: which checkpoint; the latest if None.
    validate: check every module's variables against the rebuilt modules.

  Returns:
    The :class:`LoadedModel`.

  Raises:
    FileNotFoundError: if there is no checkpoint at ``path``.
    ValueError: on an unknown meta, no variables, or variables that do not
      fit the modules (naming module and parameter).
  """
  path = Path(path)
  if (path / "bundle.json").is_file():
    path = path / "variables"
  variables, meta, saved_step = checkpoint_io.restore_variables(path, step)
  directory = checkpoint_io.checkpoint_dir(path)
  averaged = spec_lib.GENERATOR_EMA in variables.get("generator", {})
  variables = spec_lib.inference_variables(variables)
  if not variables:
    raise checkpoint_io.CheckpointError(f"checkpoint {directory} holds no variables")
  spec = spec_lib.from_meta(meta)
  kind = spec_lib.kind_of(meta)
  info = _info(spec, checkpoint=str(directory), kind=kind,
               step=int(meta.get("step", saved_step)), modules=sorted(variables), dtype=dtype)
  if kind == "training":
    info["task"] = meta.get("task")
  if averaged:
    info["generator_weights"] = "moving average (fas_ema_decay)"
  if meta.get("layout"):
    info["layout"] = meta["layout"]
  loaded = LoadedModel(spec_lib.build(spec, dtype), variables, info)
  if validate:
    check_variables(loaded)
  return loaded


def from_variables(variables: dict, config, dtype: Optional[str] = None) -> LoadedModel:
  """Wraps a training run's in-process variables (host copies are taken).

  Args:
    variables: module name -> collections (device or host arrays).
    config: the training config.
    dtype: compute dtype; None keeps ``config.dtype``.

  Returns:
    A :class:`LoadedModel`.
  """
  spec = spec_lib.from_config(config)
  dtype = dtype or str(config.get("dtype", "float32"))
  variables = jax.tree_util.tree_map(
      np.asarray, jax.device_get(spec_lib.inference_variables(dict(variables))))
  info = _info(spec, checkpoint="in-process", kind="in-process", modules=sorted(variables),
               dtype=dtype)
  return LoadedModel(spec_lib.build(spec, dtype), variables, info)


def require_modules(loaded: LoadedModel, names: Sequence[str], purpose: str) -> None:
  """Raises a one-line error if the checkpoint lacks a module ``purpose`` needs."""
  missing = [n for n in names if n not in loaded.variables or getattr(loaded.models, n) is None]
  if missing:
    hint = (" (train with config.train_fas=True for a generator)"
            if "generator" in missing else "")
    raise ValueError(f"{purpose} needs module(s) {missing}, but checkpoint "
                     f"{loaded.info.get('checkpoint')} has {loaded.info.get('modules')}{hint}")


def check_variables(loaded: LoadedModel) -> None:
  """Checks each module's variables have the structure and shapes its module expects.

  Raises:
    ValueError: naming the module and the first missing, unexpected or
      misshaped variable.
  """
  where = f"checkpoint {loaded.info.get('checkpoint')}"
  unknown = [name for name in loaded.variables if getattr(loaded.models, name, None) is None]
  if unknown:
    raise ValueError(f"{where}: has variables for {unknown}, which its model spec lacks")
  expected = spec_lib.abstract_variables(loaded.models, loaded.spec.image_size,
                                         sorted(loaded.variables))
  for name, tree in expected.items():
    shapes = {path: tuple(leaf.shape) for path, leaf in _flat(tree)}
    got = {path: tuple(np.shape(leaf)) for path, leaf in _flat(loaded.variables[name])}
    for path, shape in shapes.items():
      if path not in got:
        raise ValueError(f"{where}: module {name!r} lacks {'/'.join(path)} (shape {shape}); "
                         "it does not match this model")
      if got[path] != shape:
        raise ValueError(f"{where}: {name}/{'/'.join(path)} has shape {got[path]}, the model "
                         f"expects {shape}")
    extra = sorted(set(got) - set(shapes))
    if extra:
      raise ValueError(f"{where}: module {name!r} has unexpected variable {'/'.join(extra[0])}")


def _flat(tree: Any, prefix: tuple = ()):
  """Yields (path tuple, leaf) of a nested mapping."""
  if hasattr(tree, "items"):
    for key, value in tree.items():
      yield from _flat(value, prefix + (str(key),))
  else:
    yield prefix, tree
