"""Identity conditional module (ICM): the age-conditioned transform of x_id.

Reference: docs/architecture.md section 7. A fixed 0/1 task router selects, per
sample, the channels of its target age group; neighbouring groups overlap so
that weights are shared between adjacent ages.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtlface_jax.models import layers


def icm_channels(num_groups: int, unit_count: int = 128, sigma: float = 0.1) -> int:
  """Channel width C = int((G - (G - 1) sigma) * unit_count); 819 for G = 7."""
  return int((num_groups - (num_groups - 1) * sigma) * unit_count)


def router_mask(num_groups: int, unit_count: int = 128, sigma: float = 0.1) -> np.ndarray:
  """The task router's fixed (G, C) 0/1 mask.

  Row g is 1 on [start_g, start_g + unit_count) with start_0 = 0 and
  start_{g+1} = int(start_g + (1 - sigma) unit_count), i.e. 0, 115, 230, ... .

  Returns:
    float32 array of shape (num_groups, icm_channels(...)).
  """
  mask = np.zeros((num_groups, icm_channels(num_groups, unit_count, sigma)), np.float32)
  start = 0
  for group in range(num_groups):
    mask[group, start:start + unit_count] = 1.0
    start = int(start + (1 - sigma) * unit_count)
  return mask


def route(x: jax.Array, target_group: jax.Array, mask: np.ndarray) -> jax.Array:
  """Multiplies each sample's NHWC map by its target group's router row."""
  rows = jnp.asarray(mask, x.dtype)[target_group]  # N, C
  return x * rows[:, None, None, :]


class ConditionalBlock(nn.Module):
  """h = route(BN(conv(x))); h = PReLU(h); h = route(BN(conv(h))); PReLU(x + h)."""
  mask: np.ndarray
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, target_group: jax.Array, train: bool) -> jax.Array:
    channels = x.shape[-1]
    h = x
    for i in (1, 2):
      h = layers.conv(channels, 3, padding=1, use_bias=True, kernel_init=layers.generator_normal,
                      dtype=self.dtype, name=f"conv{i}")(h)
      h = layers.BatchNorm(dtype=self.dtype, name=f"bn{i}")(h, train)
      h = route(h, target_group, self.mask)
      if i == 1:
        h = layers.PReLU(name="prelu1")(h)
    return layers.PReLU(name="prelu2")(x + h)


class IdentityConditionalModule(nn.Module):
  """conv1 (1x1 512->C) -> 4 conditional blocks -> conv2 (1x1 C->512).

  Attributes:
    num_groups: age groups G.
    unit_count: channels per group (128).
    sigma: overlap between neighbouring groups (0.1).
    num_blocks: conditional blocks (4).
    dtype: computation dtype.
  """
  num_groups: int = 7
  unit_count: int = 128
  sigma: float = 0.1
  num_blocks: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_id: jax.Array, target_group: jax.Array, train: bool) -> jax.Array:
    mask = router_mask(self.num_groups, self.unit_count, self.sigma)
    out_channels = x_id.shape[-1]

    def conv_bn_prelu(h, features, name):
      h = layers.conv(features, 1, use_bias=True, kernel_init=layers.generator_normal,
                      dtype=self.dtype, name=f"{name}_conv")(h)
      h = layers.BatchNorm(dtype=self.dtype, name=f"{name}_bn")(h, train)
      return layers.PReLU(name=f"{name}_prelu")(h)

    h = route(conv_bn_prelu(x_id.astype(self.dtype), mask.shape[1], "conv1"), target_group, mask)
    for i in range(self.num_blocks):
      h = ConditionalBlock(mask, dtype=self.dtype, name=f"block{i}")(h, target_group, train)
    return conv_bn_prelu(h, out_channels, "conv2")
