"""Loads a checkpoint for evaluation: its Flax modules, variables and facts.

Two kinds of checkpoint directory are understood (both written by
:class:`mtlface_jax.training.checkpoint.Checkpointer`):

* a TRAINING checkpoint (``train.py``): state ``{'step', 'variables',
  'opt_states', ...}`` and a JSON meta whose ``config`` is the training
  ConfigDict as JSON; the modules are rebuilt with
  :func:`mtlface_jax.models.mtlface.build_models`;
* a CONVERTED PyTorch checkpoint (``python -m mtlface_jax.convert``): state
  ``{'variables'}`` and a meta with ``converted_from: 'pytorch'``, ``layout``,
  ``age_group``, ``modules`` and, when an encoder was converted, ``num_layers``,
  ``attention_version``, ``dropout_rate``, ``normalize_embedding`` (and
  ``num_classes`` with a CosFace head). Converted models use the reference
  sizes at 112x112.

Either way :func:`load_model` returns a :class:`LoadedModel` whose variables
are host (NumPy) arrays and whose shapes were checked against the modules.
"""

import json
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mtlface_jax import inference as inference_lib
from mtlface_jax.models import discriminator
from mtlface_jax.models import generator
from mtlface_jax.models import heads
from mtlface_jax.models import iresnet
from mtlface_jax.models import mtlface
from mtlface_jax.training import checkpoint as checkpoint_lib

CONVERTED_IMAGE_SIZE = 112  # The reference models are defined on 112x112 faces.
DTYPES = ("float32", "bfloat16")


class LoadedModel(NamedTuple):
  """What evaluation needs from a checkpoint (unpacks as a 3-tuple).

  Attributes:
    models: an :class:`~mtlface_jax.models.mtlface.MTLFaceModels`; fields of
      modules that cannot be built from the checkpoint (e.g. ``head`` of a
      converted checkpoint without one) are None.
    variables: module name -> Flax collections, only for the modules the
      checkpoint holds (e.g. no ``generator`` for an AIFR-only run).
    info: JSON-ready facts: ``checkpoint`` (path or "in-process"), ``kind``
      ("training" / "converted" / "in-process"), ``step``, ``image_size``,
      ``age_group``, ``modules`` (sorted names with variables), ``dtype``,
      plus ``task`` (training) or ``layout`` (converted).
  """
  models: mtlface.MTLFaceModels
  variables: dict
  info: dict


def config_from_meta(meta: dict) -> ml_collections.ConfigDict:
  """Rebuilds the training ConfigDict stored in a training checkpoint's meta.

  Args:
    meta: the checkpoint's JSON meta (its ``config`` is ``config.to_json()``).

  Returns:
    The ConfigDict (tuples come back as lists; the model builders accept both).

  Raises:
    ValueError: if the meta has no usable ``config``.
  """
  text = meta.get("config")
  if not isinstance(text, str):
    raise ValueError(f"checkpoint meta has no 'config' JSON string (keys: {sorted(meta)})")
  try:
    return ml_collections.ConfigDict(json.loads(text))
  except json.JSONDecodeError as error:
    raise ValueError(f"checkpoint meta 'config' is not valid JSON: {error}") from error


def models_from_config(config, dtype: str = "float32") -> mtlface.MTLFaceModels:
  """The modules of a training config, computing in ``dtype``."""
  _check_dtype(dtype)
  config = ml_collections.ConfigDict(config.to_dict())  # Never mutate the caller's.
  config.dtype = dtype
  return mtlface.build_models(config)


def models_from_conversion_meta(meta: dict, dtype: str = "float32") -> mtlface.MTLFaceModels:
  """The modules a converted PyTorch checkpoint's variables belong to.

  Mirrors ``mtlface_jax.convert``'s module specs (reference sizes).

  Args:
    meta: the meta written by ``mtlface_jax.convert``.
    dtype: compute dtype of the encoder and generator.

  Returns:
    The models; ``head`` is None without ``num_classes``, ``encoder`` is None
    when no encoder was converted.
  """
  _check_dtype(dtype)
  compute = mtlface.compute_dtype(dtype)
  num_groups = int(meta.get("age_group", 7))
  encoder = None
  if "num_layers" in meta:
    encoder = iresnet.Encoder(int(meta["num_layers"]),
                              attention_version=int(meta.get("attention_version", 1)),
                              dropout_rate=float(meta.get("dropout_rate", 0.5)),
                              normalize_embedding=bool(meta.get("normalize_embedding", False)),
                              dtype=compute)
  head = (heads.CosFace(int(meta["num_classes"]), dtype=compute)
          if meta.get("num_classes") else None)
  age = heads.AgeEstimator(num_groups, dtype=jnp.float32)
  return mtlface.MTLFaceModels(
      encoder=encoder, head=head, age=age, da_age=age,
      generator=generator.Generator(num_groups, dtype=compute),
      discriminator=discriminator.PatchDiscriminator(num_groups, dtype=compute))


def load_model(path, dtype: str = "float32", step: Optional[int] = None,
               validate: bool = True) -> LoadedModel:
  """Loads a training or converted checkpoint for evaluation.

  Args:
    path: a training workdir, its ``checkpoints/`` folder, or a converted
      checkpoint folder.
    dtype: compute dtype of the encoder/generator ("float32" or "bfloat16");
      parameters stay float32.
    step: which checkpoint; the latest if None.
    validate: check every module's variable shapes against the rebuilt
      modules (a clear error instead of a failure deep inside Flax).

  Returns:
    The :class:`LoadedModel`.

  Raises:
    FileNotFoundError: if there is no checkpoint at ``path``.
    ValueError: on an unknown meta, a checkpoint without variables, or
      variables that do not fit the modules (naming module and parameter).
  """
  directory = checkpoint_lib.checkpoint_dir(path)
  try:
    # Only the variables are read (not the optimizer states), as host NumPy
    # arrays whatever devices saved them.
    variables, meta, saved_step = inference_lib.restore_variables(directory, step)
  except inference_lib.BundleError as e:
    raise ValueError(str(e)) from e
  if not variables:
    raise ValueError(f"checkpoint {directory} holds no 'variables'")
  if meta.get("converted_from"):
    models = models_from_conversion_meta(meta, dtype)
    info = {"kind": "converted", "layout": meta.get("layout"),
            "image_size": CONVERTED_IMAGE_SIZE, "age_group": int(meta.get("age_group", 7)),
            "step": int(meta.get("step", 0))}
  else:
    config = config_from_meta(meta)
    models = models_from_config(config, dtype)
    info = {"kind": "training", "task": meta.get("task"), "image_size": int(config.image_size),
            "age_group": int(config.age_group), "step": int(meta.get("step", saved_step))}
  info.update(checkpoint=str(Path(directory).absolute()), modules=sorted(variables), dtype=dtype)
  loaded = LoadedModel(models, variables, info)
  if validate:
    check_variables(loaded)
  return loaded


def from_variables(models: mtlface.MTLFaceModels, variables: dict, config,
                   dtype: Optional[str] = None) -> LoadedModel:
  """Wraps in-process models and variables (e.g. a training run's state).

  Args:
    models: from ``build_models(config)``.
    variables: module name -> collections (device or host arrays).
    config: the training config (image size, age groups).
    dtype: rebuild the modules in this compute dtype; None keeps ``models``.

  Returns:
    A :class:`LoadedModel` with host copies of the variables.
  """
  if dtype is not None:
    models = models_from_config(config, dtype)
  variables = jax.tree_util.tree_map(np.asarray, jax.device_get(dict(variables)))
  info = {"kind": "in-process", "checkpoint": "in-process", "image_size": int(config.image_size),
          "age_group": int(config.age_group), "modules": sorted(variables),
          "dtype": dtype or str(config.get("dtype", "float32"))}
  return LoadedModel(models, variables, info)


def require_modules(loaded: LoadedModel, names: Sequence[str], purpose: str) -> None:
  """Raises a clear error if the checkpoint lacks a module ``purpose`` needs.

  Args:
    loaded: the loaded model.
    names: module names needed (e.g. ``("encoder", "generator")``).
    purpose: what they are needed for, for the message.

  Raises:
    ValueError: naming the checkpoint, the missing modules and those present.
  """
  missing = [n for n in names if n not in loaded.variables or getattr(loaded.models, n) is None]
  if missing:
    hint = (" (train with config.train_fas=True for a generator)"
            if "generator" in missing else "")
    raise ValueError(f"{purpose} needs module(s) {missing}, but checkpoint "
                     f"{loaded.info.get('checkpoint')} has {loaded.info.get('modules')}{hint}")


def check_variables(loaded: LoadedModel) -> None:
  """Checks each module's variables have the structure and shapes it expects.

  Args:
    loaded: the loaded model.

  Raises:
    ValueError: naming the module and the first missing, unexpected or
      misshaped variable.
  """
  expected = _expected_shapes(loaded.models, loaded.info["image_size"], loaded.variables)
  for name, shapes in expected.items():
    got = {path: tuple(np.shape(leaf)) for path, leaf in _flat(loaded.variables[name])}
    for path, shape in shapes.items():
      if path not in got:
        raise ValueError(f"checkpoint {loaded.info.get('checkpoint')}: module {name!r} lacks "
                         f"{'/'.join(path)} (shape {shape}); it does not match this model")
      if got[path] != shape:
        raise ValueError(f"checkpoint {loaded.info.get('checkpoint')}: {name}/{'/'.join(path)} "
                         f"has shape {got[path]}, the model expects {shape}")
    extra = sorted(set(got) - set(shapes))
    if extra:
      raise ValueError(f"checkpoint {loaded.info.get('checkpoint')}: module {name!r} has "
                       f"unexpected variable {'/'.join(extra[0])}")


def _expected_shapes(models, image_size: int, variables: dict) -> dict:
  """module -> {path: shape} for the modules in ``variables`` (nothing allocated)."""
  def init_all(images):
    key = jax.random.PRNGKey(0)
    out_vars = models.encoder.init({"params": key, "dropout": key}, images)
    out = models.encoder.apply(out_vars, images)
    groups = jnp.zeros((1,), jnp.int32)
    inits = {
        "encoder": lambda: out_vars,
        "head": lambda: models.head.init(key, out.embedding),
        "age": lambda: models.age.init(key, out.x_age, False),
        "da_age": lambda: models.da_age.init(key, out.x_id, False),
        "generator": lambda: models.generator.init(key, images, out.x2, out.x3, out.x4,
                                                   out.x_id, groups),
        "discriminator": lambda: models.discriminator.init(key, images, groups),
    }
    return {name: inits[name]() for name in variables
            if name in inits and getattr(models, name) is not None}

  if models.encoder is None:
    return {}  # Nothing to feed the other modules; they fail clearly when used.
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  shapes = jax.eval_shape(init_all, images)
  return {name: {path: tuple(leaf.shape) for path, leaf in _flat(tree)}
          for name, tree in shapes.items()}


def _flat(tree: Any, prefix: tuple = ()):
  """Yields (path tuple, leaf) of a nested mapping."""
  if hasattr(tree, "items"):
    for key, value in tree.items():
      yield from _flat(value, prefix + (str(key),))
  else:
    yield prefix, tree


def _check_dtype(dtype: str) -> None:
  if dtype not in DTYPES:
    raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
