"""All MTLFace networks built from one config (the reference's ``MTLFace`` model)."""

from typing import Any, NamedTuple

import jax.numpy as jnp

from mtlface_jax.models import discriminator
from mtlface_jax.models import generator
from mtlface_jax.models import heads
from mtlface_jax.models import iresnet

BACKBONES = {"ir34": 34, "ir50": 50, "ir64": 64, "ir101": 101}


class MTLFaceModels(NamedTuple):
  """The six modules of MTLFace; ``da_age`` is the domain-adversarial estimator."""
  encoder: iresnet.Encoder
  head: heads.CosFace
  age: heads.AgeEstimator
  da_age: heads.AgeEstimator
  generator: generator.Generator
  discriminator: discriminator.PatchDiscriminator


def compute_dtype(name: str) -> Any:
  """``'bfloat16'`` / ``'float32'`` / ``'float16'`` -> the JAX dtype."""
  return {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}[name]


def build_models(config) -> MTLFaceModels:
  """Builds the modules from a training config (see ``configs/common.py``).

  The backbone and generator compute in ``config.dtype``; the heads (CosFace,
  age estimators) and the discriminator's outputs stay float32, as the
  reference's AMP setup kept the heads in fp32.

  Args:
    config: a ConfigDict with ``model``, ``dtype``, ``age_group``, ``head_s``, ``head_m``.

  Returns:
    The :class:`MTLFaceModels`.
  """
  dtype = compute_dtype(config.dtype)
  m = config.model
  if m.backbone_name not in BACKBONES:
    raise ValueError(f"backbone_name must be one of {sorted(BACKBONES)}, got {m.backbone_name!r}")
  encoder = iresnet.Encoder(BACKBONES[m.backbone_name], units=tuple(m.units) or None,
                            depths=tuple(m.depths), dropout_rate=m.dropout_rate, dtype=dtype)
  age = heads.AgeEstimator(config.age_group, dtype=jnp.float32)
  return MTLFaceModels(
      encoder=encoder,
      head=heads.CosFace(m.num_classes, scale=config.head_s, margin=config.head_m, dtype=dtype),
      age=age,
      da_age=age,
      generator=generator.Generator(config.age_group, unit_count=m.icm_unit_count,
                                    decoder_features=tuple(m.decoder_features), dtype=dtype),
      discriminator=discriminator.PatchDiscriminator(
          config.age_group, features=tuple(m.discriminator_features),
          conditioning=m.get("discriminator_conditioning", "concat"), dtype=dtype),
  )
