"""The FAS decoder: four upsampling blocks with encoder skips, residual image out.

Reference: docs/architecture.md section 7 ("Decoder").
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtlface_jax.models import layers


class ConvStack(nn.Module):
  """BN -> PReLU -> conv3x3 -> BN -> PReLU -> conv3x3 (all convs with bias)."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for i in (1, 2):
      x = layers.BatchNorm(dtype=self.dtype, name=f"bn{i}")(x, train)
      x = layers.PReLU(name=f"prelu{i}")(x)
      x = layers.conv(self.features, 3, padding=1, use_bias=True,
                      kernel_init=layers.generator_normal, dtype=self.dtype, name=f"conv{i}")(x)
    return x


class UpBlock(nn.Module):
  """Upsample x (if smaller than skip), fuse with skip, two residual conv stacks.

  p = conv_a(concat[x, skip]) + conv1x1(x);  returns p + conv_b(p).
  """
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, skip: jax.Array, train: bool) -> jax.Array:
    if x.shape[1] < skip.shape[1]:
      x = layers.upsample_bilinear_2x(x)
    skip = skip.astype(x.dtype)
    p = ConvStack(self.features, dtype=self.dtype, name="conv_a")(
        jnp.concatenate([x, skip], axis=-1), train)
    p = p + layers.conv(self.features, 1, use_bias=True, kernel_init=layers.generator_normal,
                        dtype=self.dtype, name="shortcut")(x)
    return p + ConvStack(self.features, dtype=self.dtype, name="conv_b")(p, train)


class Decoder(nn.Module):
  """U1(x4) -> U2(x3) -> U3(x2) -> U4(image) -> 1x1 conv to RGB, added to the image."""
  features: Sequence[int] = (256, 128, 64, 32)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array, image: jax.Array, x2: jax.Array, x3: jax.Array,
               x4: jax.Array, train: bool) -> jax.Array:
    for i, (features, skip) in enumerate(zip(self.features, (x4, x3, x2, image))):
      h = UpBlock(features, dtype=self.dtype, name=f"up{i + 1}")(h, skip, train)
    residual = layers.conv(3, 1, use_bias=True, kernel_init=layers.generator_normal,
                           dtype=self.dtype, name="to_rgb")(h)
    return image + residual.astype(image.dtype)
