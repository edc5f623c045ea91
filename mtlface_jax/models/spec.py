"""Which model a checkpoint holds, and how to build it: the one owner of that fact.

A :class:`ModelSpec` describes every MTLFace network by plain JSON-ready
fields. It comes from a training config (:func:`from_config`), from a
checkpoint's metadata (:func:`from_meta`: a training run's config, a PyTorch
conversion, or an exported bundle's ``model``), and is written into the
metadata of conversions and bundles (:meth:`ModelSpec.to_dict`), so training,
evaluation, export and conversion all rebuild the same modules with
:func:`build`. :func:`init_variables` and :func:`abstract_variables` are the
one table of how each module is initialised.

Families: ``cvpr`` (the CVPR 2021 model: ICM + decoder generator) and
``tpami`` (the released TPAMI 2022 model: attention v2, normalised
embedding, StyleGAN2 generator driven by identity-conditioned style codes).
Every generator is called the same way::

  generator.apply(variables, images, x2, x3, x4, x_id, target_group, train=False)
"""

import dataclasses
import importlib
import json
from typing import Any, NamedTuple, Optional, Sequence

import flax
import jax
import jax.numpy as jnp

from mtlface_jax.models import discriminator as discriminator_lib
from mtlface_jax.models import generator as generator_lib
from mtlface_jax.models import heads
from mtlface_jax.models import iresnet

FAMILIES = ("cvpr", "tpami")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
BACKBONES = {"ir34": 34, "ir50": 50, "ir64": 64, "ir101": 101}
REFERENCE_IMAGE_SIZE = 112  # The published models are defined on 112x112 faces.
MODULES = ("encoder", "head", "age", "da_age", "generator", "discriminator")
# The generator's collection holding the moving average of its parameters
# (training config ``fas_ema_decay`` > 0); inference uses it as ``params``.
GENERATOR_EMA = "params_ema"

# The encoder of each family as published (docs/architecture.md sections 1 and T1.1): the
# released TPAMI model uses attention v2, dropout 0.4 and a normalised embedding.
ENCODER_PRESETS = {
    "cvpr": {"attention_version": 1, "dropout_rate": 0.5, "normalize_embedding": False},
    "tpami": {"attention_version": 2, "dropout_rate": 0.4, "normalize_embedding": True},
}
CVPR_GENERATOR = {"unit_count": 128, "decoder_features": [256, 128, 64, 32]}
CVPR_DISCRIMINATOR = {"features": [64, 128, 256, 512, 512]}
# family -> (module path, class name) of its generator; imported when built.
GENERATOR_CLASSES = {
    "cvpr": ("mtlface_jax.models.generator", "Generator"),
    "tpami": ("mtlface_jax.models.tpami_generator", "TPAMIGenerator"),
}


class MTLFaceModels(NamedTuple):
  """The six modules of MTLFace; ``da_age`` is the domain-adversarial estimator.

  A field is None when the spec has no such module (e.g. no CosFace head in a
  converted TPAMI model).
  """
  encoder: Any
  head: Any
  age: Any
  da_age: Any
  generator: Any
  discriminator: Any


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Everything needed to rebuild the networks of a checkpoint.

  Attributes:
    family: "cvpr" or "tpami" (see the module docstring).
    image_size: input side S of the [B, S, S, 3] faces.
    age_group: number of age groups G.
    encoder: :class:`~mtlface_jax.models.iresnet.Encoder` fields
      (``num_layers``, ``units``, ``depths``, ``attention_version``,
      ``dropout_rate``, ``normalize_embedding``).
    num_classes: CosFace identities; None for a model without a head.
    head_s: CosFace scale.
    head_m: CosFace margin.
    generator: the family's generator fields; None for no generator.
    discriminator: ``{'features': [...], 'conditioning': "concat" | "classifier"}``;
      None for no discriminator.
  """
  family: str = "cvpr"
  image_size: int = REFERENCE_IMAGE_SIZE
  age_group: int = 7
  encoder: dict = dataclasses.field(default_factory=dict)
  num_classes: Optional[int] = None
  head_s: float = 64.0
  head_m: float = 0.35
  generator: Optional[dict] = None
  discriminator: Optional[dict] = None

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"model family must be one of {FAMILIES}, got {self.family!r}")

  def to_dict(self) -> dict:
    """A JSON-ready dict (what conversions and bundles store as ``meta['model']``)."""
    return json.loads(json.dumps(dataclasses.asdict(self)))

  @classmethod
  def from_dict(cls, fields: dict) -> "ModelSpec":
    """Inverse of :meth:`to_dict`; also reads the older bundle ``model`` dicts."""
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in fields.items() if k in known})


def encoder_fields(num_layers: int = 50, family: str = "cvpr", **overrides) -> dict:
  """The encoder fields of a family's published encoder, with ``overrides``."""
  fields = {"num_layers": int(num_layers), "units": None,
            "depths": list(iresnet.STAGE_DEPTHS), **ENCODER_PRESETS[family]}
  fields.update(overrides)
  return fields


def reference_spec(family: str, num_layers: int = 50, age_group: int = 7,
                   num_classes: Optional[int] = None,
                   generator: Optional[dict] = None) -> ModelSpec:
  """A published model at 112x112 (what a PyTorch conversion holds)."""
  if generator is None and family == "cvpr":
    generator = dict(CVPR_GENERATOR)
  return ModelSpec(family=family, age_group=age_group,
                   encoder=encoder_fields(num_layers, family), num_classes=num_classes,
                   generator=generator,
                   discriminator=dict(CVPR_DISCRIMINATOR) if family == "cvpr" else None)


def from_config(config) -> ModelSpec:
  """The spec of a training config (``configs/common.py``)."""
  m = config.model
  if m.backbone_name not in BACKBONES:
    raise ValueError(f"config.model.backbone_name must be one of {sorted(BACKBONES)}, "
                     f"got {m.backbone_name!r}")
  family = m.get("family", "cvpr")
  encoder = encoder_fields(BACKBONES[m.backbone_name], family,
                           units=list(m.units) or None, depths=list(m.depths),
                           dropout_rate=float(m.dropout_rate))
  if family == "cvpr":
    generator = {"unit_count": int(m.icm_unit_count),
                 "decoder_features": list(m.decoder_features)}
  else:
    generator = m.tpami_generator.to_dict()
    # () in a config means "StyleGAN2's own schedule" (a plain value, so
    # ConfigDict.update copies it; a None FieldReference cannot be updated).
    generator["channels"] = tuple(generator["channels"]) or None
  return ModelSpec(family=family, image_size=int(config.image_size),
                   age_group=int(config.age_group), encoder=encoder,
                   num_classes=int(m.num_classes), head_s=float(config.head_s),
                   head_m=float(config.head_m), generator=generator,
                   discriminator={"features": list(m.discriminator_features),
                                  "conditioning": m.get("discriminator_conditioning", "concat")})


def config_from_meta(meta: dict):
  """The training ConfigDict stored in a training checkpoint's meta (``config`` JSON)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  text = meta.get("config")
  if not isinstance(text, str):
    raise ValueError(f"checkpoint meta has no 'config' JSON string (keys: {sorted(meta)})")
  try:
    return ml_collections.ConfigDict(json.loads(text))
  except json.JSONDecodeError as error:
    raise ValueError(f"checkpoint meta 'config' is not valid JSON: {error}") from error


def _from_conversion_meta(meta: dict) -> ModelSpec:
  """Conversions written before metas carried ``model`` (their flat fields)."""
  family = meta.get("layout", "cvpr") if meta.get("layout") in FAMILIES else "cvpr"
  spec = reference_spec(family, int(meta.get("num_layers", 50)), int(meta.get("age_group", 7)),
                        int(meta["num_classes"]) if meta.get("num_classes") else None)
  encoder = dict(spec.encoder)
  for key in ("attention_version", "dropout_rate", "normalize_embedding"):
    if key in meta:
      encoder[key] = type(encoder[key])(meta[key])
  return dataclasses.replace(spec, encoder=encoder)


def from_meta(meta: dict) -> ModelSpec:
  """The spec of any checkpoint this project writes, from its JSON meta.

  Args:
    meta: a bundle's or conversion's meta (``model`` dict), a training run's
      (``config`` JSON) or an older conversion's (``converted_from``).

  Returns:
    The spec.

  Raises:
    ValueError: if the meta describes no known kind of checkpoint.
  """
  if isinstance(meta.get("model"), dict):
    return ModelSpec.from_dict(meta["model"])
  if isinstance(meta.get("config"), str):
    return from_config(config_from_meta(meta))
  if meta.get("converted_from") == "pytorch":
    return _from_conversion_meta(meta)
  raise ValueError("cannot tell which model the checkpoint holds: its meta has no 'model', "
                   f"'config' or 'converted_from' (keys: {sorted(meta)})")


def kind_of(meta: dict) -> str:
  """"bundle", "converted" or "training": where a checkpoint's meta came from."""
  if meta.get("exported_from"):
    return "bundle"
  return "converted" if meta.get("converted_from") else "training"


def compute_dtype(name: str) -> Any:
  """``'bfloat16'`` / ``'float32'`` / ``'float16'`` -> the JAX dtype."""
  if name not in DTYPES:
    raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
  return DTYPES[name]


def _generator(spec: ModelSpec, dtype) -> Any:
  if spec.generator is None:
    return None
  module_path, class_name = GENERATOR_CLASSES[spec.family]
  cls = getattr(importlib.import_module(module_path), class_name)
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.generator.items()}
  return cls(spec.age_group, dtype=dtype, **fields)


def build(spec: ModelSpec, dtype: str = "float32") -> MTLFaceModels:
  """The Flax modules of ``spec``, computing in ``dtype``.

  The backbone and generator compute in ``dtype``; the age estimators stay
  float32 (the reference's AMP kept the heads in fp32). Parameters are
  float32 either way.
  """
  compute = compute_dtype(dtype)
  e = spec.encoder
  encoder = iresnet.Encoder(
      int(e["num_layers"]), units=tuple(e["units"]) if e.get("units") else None,
      depths=tuple(e["depths"]), attention_version=int(e["attention_version"]),
      dropout_rate=float(e["dropout_rate"]),
      normalize_embedding=bool(e["normalize_embedding"]), dtype=compute)
  head = (heads.CosFace(spec.num_classes, scale=spec.head_s, margin=spec.head_m, dtype=compute)
          if spec.num_classes else None)
  age = heads.AgeEstimator(spec.age_group, dtype=jnp.float32)
  discriminator = (discriminator_lib.PatchDiscriminator(
      spec.age_group, features=tuple(spec.discriminator["features"]),
      conditioning=spec.discriminator.get("conditioning", "concat"), dtype=compute)
                   if spec.discriminator else None)
  return MTLFaceModels(encoder=encoder, head=head, age=age, da_age=age,
                       generator=_generator(spec, compute), discriminator=discriminator)


def build_from_config(config) -> MTLFaceModels:
  """:func:`build` of a training config in its ``config.dtype``."""
  return build(from_config(config), config.dtype)


def _initialisers(models: MTLFaceModels, image_size: int, rngs: dict) -> dict:
  """module name -> a thunk returning its initial variables (traceable)."""
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  groups = jnp.zeros((1,), jnp.int32)
  key = lambda name: rngs.get(name, rngs["encoder"])
  encoder_vars = models.encoder.init({"params": key("encoder"), "dropout": key("encoder")},
                                     images)
  out = models.encoder.apply(encoder_vars, images)
  return {
      "encoder": lambda: encoder_vars,
      "head": lambda: models.head.init(key("head"), out.embedding),
      "age": lambda: models.age.init(key("age"), out.x_age, False),
      "da_age": lambda: models.da_age.init(key("da_age"), out.x_id, False),
      "generator": lambda: models.generator.init(key("generator"), images, out.x2, out.x3,
                                                 out.x4, out.x_id, groups),
      "discriminator": lambda: models.discriminator.init(key("discriminator"), images, groups),
  }


def init_variables(models: MTLFaceModels, image_size: int, modules: Sequence[str],
                   rng: jax.Array) -> dict:
  """Initial variables of ``modules`` (module name -> collections).

  Args:
    models: from :func:`build`.
    image_size: the model's input side.
    modules: names to initialise (each must be built, i.e. not None).
    rng: one key, split into one per module in ``MODULES`` order.

  Returns:
    module name -> mutable dict of collections.
  """
  rngs = dict(zip(MODULES, jax.random.split(rng, len(MODULES))))
  missing = [name for name in modules if getattr(models, name) is None]
  if missing:
    raise ValueError(f"the model has no {missing} (not in its spec)")
  thunks = _initialisers(models, image_size, rngs)
  return {name: flax.core.unfreeze(thunks[name]()) for name in modules}


def inference_variables(variables: dict) -> dict:
  """The variables a model predicts with: the generator's moving average if it has one.

  A FAS run with ``fas_ema_decay`` > 0 keeps ``generator/params_ema`` next to
  the trained ``params``; the average is the generator that is evaluated,
  exported and previewed (it does not carry the GAN's step-to-step swing).

  Args:
    variables: module name -> collections (a checkpoint's or a run's).

  Returns:
    The same mapping, with ``generator`` holding ``params`` = the average and
    no ``params_ema`` (unchanged when there is none).
  """
  generator = variables.get("generator")
  if not generator or GENERATOR_EMA not in generator:
    return variables
  averaged = {k: v for k, v in generator.items() if k != GENERATOR_EMA}
  averaged["params"] = generator[GENERATOR_EMA]
  return {**variables, "generator": averaged}


def abstract_variables(models: MTLFaceModels, image_size: int,
                       modules: Sequence[str]) -> dict:
  """Shapes/dtypes (``jax.ShapeDtypeStruct``) of ``modules``' variables; nothing allocated."""
  modules = [name for name in modules if getattr(models, name, None) is not None]
  return jax.eval_shape(lambda rng: init_variables(models, image_size, modules, rng),
                        jax.random.PRNGKey(0))
