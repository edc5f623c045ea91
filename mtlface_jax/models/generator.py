"""The FAS generator (the reference's ``AgingModule``): ICM followed by the decoder."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtlface_jax.models import decoder
from mtlface_jax.models import icm


class Generator(nn.Module):
  """Synthesises ``image`` at ``target_group`` from the frozen encoder's features.

  Attributes:
    num_groups: age groups G (7).
    dtype: computation dtype; the returned image has the input image's dtype.
  """
  num_groups: int = 7
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image: jax.Array, x2: jax.Array, x3: jax.Array, x4: jax.Array,
               x_id: jax.Array, target_group: jax.Array, train: bool = False) -> jax.Array:
    """Returns the synthesised NHWC image (same shape and dtype as ``image``)."""
    h = icm.IdentityConditionalModule(self.num_groups, dtype=self.dtype, name="icm")(
        x_id, target_group, train)
    return decoder.Decoder(dtype=self.dtype, name="decoder")(h, image, x2, x3, x4, train)
