"""The released TPAMI encoder's style path: IR-50 features -> 12 age-conditioned latents.

Reference: ``docs/architecture.md`` sections T1.2 and T1.6 (the original is
``Encoder.get_conditions`` in Hzzone/MTLFace ``python_package/mtlface/modules.py``).
With the encoder outputs of a 112 px face (``x2`` = c1 56x56x64, ``x3`` = c2
28x28x128, ``x4`` = c3 14x14x256, ``x_id`` 7x7x512):

* latents 0-2 (coarse): a :class:`StyleBlock` each on ``x_id``, not age-conditioned;
* latents 3-6 (middle): ``c4 = aging1(x_id)``; ``p3 = upsample1(c4, c3)``;
  a StyleBlock each on ``latlayer1(p3)`` (14 px);
* latents 7-11 (fine): ``p3 = aging2(p3)``; ``p4 = upsample2(p3, c2)``;
  ``p4 = aging3(p4)``; ``p4 = upsample3(p4, c1)``; a StyleBlock each on
  ``latlayer2(p4)`` (56 px).

Widths follow the inputs' channels, so reduced models (tests) only need
narrower inputs and a smaller ``style_dim``.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtlface_jax.models import icm_v2
from mtlface_jax.models import layers

COARSE_END = 3   # latents [0, 3) from x_id
MIDDLE_END = 7   # latents [3, 7) from the 14 px map; the rest from the 56 px map


def num_styles(image_size: int = 112) -> int:
  """Latents the encoder predicts: ``ceil(log2(size)) * 2 - 2`` (12 for 112 px)."""
  return math.ceil(math.log2(image_size)) * 2 - 2


class StyleBlock(nn.Module):
  """``int(log2 spatial)`` x (conv3x3 stride 2 + LReLU 0.2), global mean, Linear.

  Convs are ``conv0``, ``conv1``, ... (PyTorch ``convs.0``, ``convs.2``, ...),
  the Linear ``linear``. Spatial 7 -> 4 -> 2, 14 -> 7 -> 4 -> 2, 56 -> ... -> 2.
  """
  features: int = 512
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(int(math.log2(x.shape[1]))):
      x = layers.torch_default_conv(self.features, 3, x.shape[-1], stride=2, padding=1,
                                    dtype=self.dtype, name=f"conv{i}")(x)
      x = icm_v2.leaky_relu(x)
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return layers.torch_default_dense(self.features, self.features, dtype=jnp.float32,
                                      name="linear")(pooled)


class UpsampleBlock(nn.Module):
  """x2 bilinear (align_corners=False) when smaller, p = conv_a(cat[x, up]) + 1x1(x); p + conv_b(p).

  ``conv_a``/``conv_b`` are IN -> LReLU -> conv3x3 -> IN -> LReLU -> conv3x3
  (PyTorch ``conv.{2,5}`` / ``conv2.{2,5}``); ``shortcut`` is the 1x1 conv.
  """
  features: int
  dtype: Any = jnp.float32

  def _convs(self, x: jax.Array, name: str) -> jax.Array:
    for i in (1, 2):
      x = icm_v2.leaky_relu(icm_v2.instance_norm(x))
      x = layers.torch_default_conv(self.features, 3, x.shape[-1], padding=1, dtype=self.dtype,
                                    name=f"{name}_conv{i}")(x)
    return x

  @nn.compact
  def __call__(self, x: jax.Array, up: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    if x.shape[1] < up.shape[1]:
      x = layers.upsample_bilinear_2x(x)
    p = self._convs(jnp.concatenate([x, up.astype(self.dtype)], axis=-1), "conv_a")
    p = p + layers.torch_default_conv(self.features, 1, x.shape[-1], dtype=self.dtype,
                                      name="shortcut")(x)
    return p + self._convs(p, "conv_b")


class StyleEncoder(nn.Module):
  """The style path: (x2, x3, x4, x_id, target_group) -> latents [B, 12, style_dim].

  Submodules ``styles_0``..``styles_11``, ``aging1``..``aging3``
  (:class:`~mtlface_jax.models.icm_v2.ConditionalModuleV2`),
  ``upsample1``..``upsample3`` and ``latlayer1``/``latlayer2`` (conv3x3 with
  bias) mirror the PyTorch ``encoder.*`` names.

  Attributes:
    num_groups: age groups (7).
    style_dim: latent width (512).
    image_size: input face size; fixes the number of latents (12 for 112).
    dtype: computation dtype; latents are float32.
  """
  num_groups: int = 7
  style_dim: int = 512
  image_size: int = 112
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x2: jax.Array, x3: jax.Array, x4: jax.Array, x_id: jax.Array,
               target_group: jax.Array) -> jax.Array:
    """Returns float32 latents [B, n_styles, style_dim] (offsets from ``latent_avg``)."""
    dtype = self.dtype
    style = lambda j, x: StyleBlock(self.style_dim, dtype=dtype, name=f"styles_{j}")(x)
    aging = lambda i, x: icm_v2.ConditionalModuleV2(self.num_groups, dtype=dtype,
                                                    name=f"aging{i}")(x, target_group)
    upsample = lambda i, x, up: UpsampleBlock(up.shape[-1], dtype=dtype,
                                              name=f"upsample{i}")(x, up)
    lateral = lambda i, x: layers.torch_default_conv(self.style_dim, 3, x.shape[-1], padding=1,
                                                     dtype=dtype, name=f"latlayer{i}")(x)
    x_id = x_id.astype(dtype)
    latents = [style(j, x_id) for j in range(COARSE_END)]
    p3 = upsample(1, aging(1, x_id), x4)
    middle = lateral(1, p3)
    latents += [style(j, middle) for j in range(COARSE_END, MIDDLE_END)]
    p4 = upsample(2, aging(2, p3), x3)
    p4 = upsample(3, aging(3, p4), x2)
    fine = lateral(2, p4)
    latents += [style(j, fine) for j in range(MIDDLE_END, num_styles(self.image_size))]
    return jnp.stack(latents, axis=1).astype(jnp.float32)
