"""MTLFace networks in Flax linen (NHWC, float32 params, configurable compute dtype).

One file per component:
  iresnet.py        IR-34/50/64/101 encoder (returns :class:`EncoderOutputs`)
  attention.py      attention-based feature decomposition (AFD)
  heads.py          embedding head, age estimator, CosFace
  icm.py            identity conditional module and task router
  decoder.py        FAS decoder with skips
  generator.py      ICM + decoder (the reference's AgingModule)
  discriminator.py  spectral-norm patch discriminator
  layers.py         BatchNorm/PReLU with PyTorch semantics, pooling, GRL, upsampling
  spec.py           which model a checkpoint holds: ModelSpec, build, initialisers
"""

from mtlface_jax.models.attention import AttentionDecomposition
from mtlface_jax.models.decoder import Decoder
from mtlface_jax.models.discriminator import PatchDiscriminator
from mtlface_jax.models.generator import Generator
from mtlface_jax.models.heads import AgeEstimator, AgeOutputs, CosFace, EmbeddingHead, expected_age, l2_normalize
from mtlface_jax.models.icm import IdentityConditionalModule, router_mask
from mtlface_jax.models.iresnet import Encoder, EncoderOutputs, IResNet
from mtlface_jax.models.layers import gradient_reversal

__all__ = [
    "AgeEstimator", "AgeOutputs", "AttentionDecomposition", "CosFace", "Decoder", "EmbeddingHead",
    "Encoder", "EncoderOutputs", "Generator", "IResNet", "IdentityConditionalModule",
    "PatchDiscriminator", "expected_age", "gradient_reversal", "l2_normalize",
    "router_mask",
]
