"""The TPAMI identity conditional module (ICM v2, the released ``AgingModule``).

Reference: ``docs/architecture.md`` section T1.2. Differences from the
CVPR ICM (:mod:`mtlface_jax.models.icm`): sigma 1/8 instead of 0.1, a unit of
``in_channels // 4`` channels per age group instead of 128, instance norm and
LeakyReLU(0.2) instead of BatchNorm and PReLU, and a plain 1x1 output conv.
The released encoder runs three of them, at 7, 14 and 28 px on 512, 256 and
128 channels (800, 400 and 200 routed channels).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtlface_jax.models import icm
from mtlface_jax.models import layers

SIGMA = 1.0 / 8.0
NEGATIVE_SLOPE = 0.2


def instance_norm(x: jax.Array, epsilon: float = 1e-5) -> jax.Array:
  """``InstanceNorm2d(affine=False)``: per sample and channel over H, W (biased variance).

  Statistics are computed in float32 whatever the input dtype.
  """
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=(1, 2), keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=(1, 2), keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + epsilon)).astype(x.dtype)


def leaky_relu(x: jax.Array) -> jax.Array:
  """LeakyReLU with the released model's slope 0.2."""
  return jax.nn.leaky_relu(x, NEGATIVE_SLOPE)


def v2_router_mask(num_groups: int, in_channels: int) -> np.ndarray:
  """The (G, C) router mask of an ICM v2 on ``in_channels`` (C = 800 for 512 in)."""
  if in_channels % 4:
    raise ValueError(f"ICM v2 needs channels divisible by 4, got {in_channels}")
  return icm.router_mask(num_groups, in_channels // 4, SIGMA)


class ConditionalBlockV2(nn.Module):
  """h = route(IN(conv(x))); LReLU; h = route(IN(conv(h))); LReLU(x + h)."""
  mask: np.ndarray
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, target_group: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    h = x
    for i in (1, 2):
      h = layers.torch_default_conv(channels, 3, channels, padding=1, dtype=self.dtype,
                                    name=f"conv{i}")(h)
      h = icm.route(instance_norm(h), target_group, self.mask)
      if i == 1:
        h = leaky_relu(h)
    return leaky_relu(x + h)


class ConditionalModuleV2(nn.Module):
  """conv1 (1x1, in -> C) -> IN -> LReLU -> route -> 4 blocks -> conv2 (1x1, C -> in).

  Submodules ``conv1``, ``block0``..``block3`` (each ``conv1``/``conv2``) and
  ``conv2`` correspond to PyTorch ``conv1.0``, ``transform.i.conv{1,2}.0`` and
  ``conv2.0``; the routers' ``_unit_mapping`` buffers are
  :func:`v2_router_mask`.

  Attributes:
    num_groups: age groups G (7).
    num_blocks: conditional residual blocks (4).
    dtype: computation dtype.
  """
  num_groups: int = 7
  num_blocks: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, target_group: jax.Array) -> jax.Array:
    in_channels = x.shape[-1]
    mask = v2_router_mask(self.num_groups, in_channels)
    h = layers.torch_default_conv(mask.shape[1], 1, in_channels, dtype=self.dtype,
                                  name="conv1")(x.astype(self.dtype))
    h = icm.route(leaky_relu(instance_norm(h)), target_group, mask)
    for i in range(self.num_blocks):
      h = ConditionalBlockV2(mask, dtype=self.dtype, name=f"block{i}")(h, target_group)
    return layers.torch_default_conv(in_channels, 1, mask.shape[1], dtype=self.dtype,
                                     name="conv2")(h)
