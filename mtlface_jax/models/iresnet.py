"""IR (improved residual) backbones IR-34/50/64/101 with AFD and embedding head.

Reference: docs/architecture.md sections 1-3. The encoder returns its intermediates
as an :class:`EncoderOutputs` structure; the FAS generator consumes x2..x4 and
x_id from it, the age estimator x_age.
"""

from typing import Any, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtlface_jax.models import attention
from mtlface_jax.models import heads
from mtlface_jax.models import layers

STAGE_DEPTHS = (64, 128, 256, 512)
UNITS_PER_STAGE = {
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    64: (3, 4, 10, 3),
    101: (3, 13, 30, 3),
}


class EncoderOutputs(NamedTuple):
  """Everything the encoder computes for a batch of NHWC images.

  ``x1``..``x5`` are the input layer and four stage outputs (112, 56, 28, 14 and
  7 pixels square for 112x112 inputs); ``x_id``/``x_age`` the AFD halves of x5;
  ``embedding`` the identity embedding of ``x_id`` (L2-normalised only in the
  TPAMI variant, as in the reference).
  """
  embedding: jax.Array
  x_id: jax.Array
  x_age: jax.Array
  x1: jax.Array
  x2: jax.Array
  x3: jax.Array
  x4: jax.Array
  x5: jax.Array


class IRUnit(nn.Module):
  """BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus shortcut."""
  depth: int
  stride: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    bn = lambda name: layers.BatchNorm(dtype=self.dtype, name=name)
    conv = lambda stride, name: layers.conv(self.depth, 3, stride=stride, padding=1,
                                            dtype=self.dtype, name=name)
    h = bn("bn1")(x, train)
    h = conv(1, "conv1")(h)
    h = bn("bn2")(h, train)
    h = layers.PReLU(name="prelu")(h)
    h = conv(self.stride, "conv2")(h)
    h = bn("bn3")(h, train)
    if x.shape[-1] == self.depth:
      # A 1x1 max-pool with stride s just keeps every s-th pixel.
      shortcut = x[:, ::self.stride, ::self.stride, :]
    else:
      shortcut = layers.conv(self.depth, 1, stride=self.stride, dtype=self.dtype,
                             name="shortcut_conv")(x)
      shortcut = bn("shortcut_bn")(shortcut, train)
    return h + shortcut


def units_for(num_layers: int) -> tuple[int, ...]:
  """IR units per stage for a depth (34, 50, 64 or 101)."""
  if num_layers not in UNITS_PER_STAGE:
    raise ValueError(f"num_layers must be one of {sorted(UNITS_PER_STAGE)}, got {num_layers}")
  return UNITS_PER_STAGE[num_layers]


class IResNet(nn.Module):
  """The convolutional trunk: input layer and four IR stages.

  Returns the five feature maps (x1..x5). ``units``/``depths`` override the
  reference sizes for reduced models (tests and the CPU demo).
  """
  num_layers: int = 50
  units: Optional[Sequence[int]] = None
  depths: Sequence[int] = STAGE_DEPTHS
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, ...]:
    units_per_stage = self.units or units_for(self.num_layers)
    x = layers.conv(self.depths[0], 3, padding=1, dtype=self.dtype, name="input_conv")(
        x.astype(self.dtype))
    x = layers.BatchNorm(dtype=self.dtype, name="input_bn")(x, train)
    x = layers.PReLU(name="input_prelu")(x)
    features = [x]
    for stage, (depth, units) in enumerate(zip(self.depths, units_per_stage)):
      for unit in range(units):
        x = IRUnit(depth, stride=2 if unit == 0 else 1, dtype=self.dtype,
                   name=f"block{stage + 1}_{unit}")(x, train)
      features.append(x)
    return tuple(features)


class Encoder(nn.Module):
  """IR backbone + attention decomposition + identity embedding head.

  Attributes:
    num_layers: 34, 50, 64 or 101.
    units: units per stage overriding ``num_layers`` (reduced models only).
    depths: stage widths (reference: 64, 128, 256, 512).
    attention_version: 1 for the CVPR model, 2 for the released TPAMI model.
    dropout_rate: dropout before the embedding Linear (0.5 CVPR, 0.4 TPAMI).
    normalize_embedding: L2-normalise the embedding (the TPAMI model does).
    dtype: computation dtype (bfloat16 on accelerators); params stay float32.
  """
  num_layers: int = 50
  units: Optional[Sequence[int]] = None
  depths: Sequence[int] = STAGE_DEPTHS
  attention_version: int = 1
  dropout_rate: float = 0.5
  normalize_embedding: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> EncoderOutputs:
    x1, x2, x3, x4, x5 = IResNet(self.num_layers, self.units, self.depths, dtype=self.dtype,
                                     name="trunk")(images, train)
    x_id, x_age = attention.AttentionDecomposition(self.attention_version, dtype=self.dtype,
                                                   name="fsm")(x5, train)
    embedding = heads.EmbeddingHead(self.dropout_rate, dtype=self.dtype,
                                    name="output_layer")(x_id, train)
    if self.normalize_embedding:
      embedding = heads.l2_normalize(embedding)
    return EncoderOutputs(embedding, x_id, x_age, x1, x2, x3, x4, x5)
