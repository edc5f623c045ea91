"""The FAS generator (the reference's ``AgingModule``): ICM followed by the decoder."""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtlface_jax.models import decoder
from mtlface_jax.models import icm


class Generator(nn.Module):
  """Synthesises ``image`` at ``target_group`` from the frozen encoder's features.

  Attributes:
    num_groups: age groups G (7).
    unit_count: ICM channels per age group (128; smaller for reduced models).
    decoder_features: widths of the four upsampling blocks (256, 128, 64, 32).
    dtype: computation dtype; the returned image has the input image's dtype.
  """
  num_groups: int = 7
  unit_count: int = 128
  decoder_features: Sequence[int] = (256, 128, 64, 32)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image: jax.Array, x2: jax.Array, x3: jax.Array, x4: jax.Array,
               x_id: jax.Array, target_group: jax.Array, train: bool = False) -> jax.Array:
    """Returns the synthesised NHWC image (same shape and dtype as ``image``)."""
    h = icm.IdentityConditionalModule(self.num_groups, self.unit_count, dtype=self.dtype,
                                      name="icm")(
        x_id, target_group, train)
    return decoder.Decoder(self.decoder_features, dtype=self.dtype, name="decoder")(h, image, x2, x3, x4, train)
