"""Attention-based feature decomposition (AFD, the reference's ``fsm``).

Splits the last feature map x5 into an age part and an identity part with a
channel attention (spatial pyramid pooling) and a spatial attention.
Reference: docs/architecture.md section 2 (CVPR, ``version=1``) and section 10
(released TPAMI model, ``version=2``).
"""

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtlface_jax.models import layers

PYRAMID_LEVELS = (1, 2, 3)


class Decomposition(NamedTuple):
  """The two halves of x5; ``x_id + x_age == x`` in both versions."""
  x_id: jax.Array
  x_age: jax.Array


class ChannelAttention(nn.Module):
  """SPP(avg) and SPP(max) -> 1x1 conv -> ReLU -> 1x1 conv -> BN -> sigmoid.

  Version 1 sums the avg and max pyramids (7168 values for 512 channels);
  version 2 concatenates them [avg, max] (14336 values) and is twice as wide.
  """
  version: int = 1
  kernel_init: Any = layers.xavier_uniform
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    channels = x.shape[-1]
    avg = layers.spatial_pyramid(x, PYRAMID_LEVELS, jnp.mean)
    mx = layers.spatial_pyramid(x, PYRAMID_LEVELS, jnp.max)
    pooled = avg + mx if self.version == 1 else jnp.concatenate([avg, mx], -1)
    hidden = 448 * self.version * channels // 512
    dense = lambda n, name: nn.Dense(n, use_bias=False, kernel_init=self.kernel_init,
                                     dtype=self.dtype, param_dtype=jnp.float32, name=name)
    h = nn.relu(dense(hidden, "fc1")(pooled))
    h = dense(channels, "fc2")(h)
    h = layers.BatchNorm(decay=layers.torch_momentum(0.01), dtype=self.dtype, name="bn")(h, train)
    return nn.sigmoid(h)[:, None, None, :]  # N, 1, 1, C


class SpatialAttention(nn.Module):
  """concat(max_c, mean_c) -> 7x7 conv (no bias) -> BN -> sigmoid."""
  kernel_init: Any = layers.xavier_uniform
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    stats = jnp.concatenate([jnp.max(x, axis=-1, keepdims=True),
                             jnp.mean(x, axis=-1, keepdims=True)], axis=-1)
    h = layers.conv(1, 7, padding=3, kernel_init=self.kernel_init,
                    dtype=self.dtype, name="conv")(stats)
    h = layers.BatchNorm(decay=layers.torch_momentum(0.01), dtype=self.dtype, name="bn")(h, train)
    return nn.sigmoid(h)  # N, H, W, 1


class AttentionDecomposition(nn.Module):
  """AFD: returns (x_id, x_age) from x5.

  Attributes:
    version: 1 (CVPR: x_age = 0.5 (x cs + x ss), x_id = x - x_age) or
      2 (TPAMI release: x_id = x * 0.5 (cs + ss), x_age = x - x_id).
    dtype: computation dtype.
  """
  version: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> Decomposition:
    channel_scale = ChannelAttention(self.version, dtype=self.dtype, name="channel")(x, train)
    spatial_scale = SpatialAttention(dtype=self.dtype, name="spatial")(x, train)
    if self.version == 1:
      x_age = 0.5 * (x * channel_scale + x * spatial_scale)
      return Decomposition(x_id=x - x_age, x_age=x_age)
    x_id = x * (0.5 * (channel_scale + spatial_scale))
    return Decomposition(x_id=x_id, x_age=x - x_id)
