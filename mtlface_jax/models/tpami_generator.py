"""The released TPAMI 2022 face age synthesis: style path + StyleGAN2 decoder.

Reference: ``docs/architecture.md`` sections T1.1-T1.4. The original
(``MTLFace.aging`` in Hzzone/MTLFace ``python_package/mtlface/modules.py``)
predicts 12 latents from the encoder's features and the target age group,
adds ``latent_avg``, synthesises a 128 px image with a StyleGAN2 generator,
resizes it to 112 px (bilinear, ``align_corners=True``) and clamps it to
[-1, 1]. The output is a *full image* from the StyleGAN2 (background and all),
not a residual added to the input face.

:class:`TPAMIGenerator` follows the generator contract of the CVPR model
(``generator.apply(vars, images, x2, x3, x4, x_id, target_group, train=False)``
-> images like ``images``), so synthesis, evaluation and export use either.
"""

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtlface_jax.models import style_encoder
from mtlface_jax.models import stylegan2

Array = jax.Array


def align_corners_matrix(out_size: int, in_size: int) -> np.ndarray:
  """(out, in) bilinear interpolation weights with ``align_corners=True``.

  Output pixel d samples the input at ``d * (in - 1) / (out - 1)`` (corner
  pixels aligned, no antialiasing), as ``F.interpolate(..., align_corners=True)``.
  ``jax.image.resize`` uses half-pixel centres and differs by up to 0.37 on the
  128 -> 112 step (docs/architecture.md section T1.4).
  """
  # float32 coordinate arithmetic, as PyTorch's CPU kernel computes it.
  scale = np.float32((in_size - 1) / (out_size - 1) if out_size > 1 else 0.0)
  source = np.arange(out_size, dtype=np.float32) * scale
  low = np.clip(np.floor(source).astype(np.int64), 0, in_size - 1)
  high = np.minimum(low + 1, in_size - 1)
  frac = (source - low.astype(np.float32)).astype(np.float64)
  matrix = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  np.add.at(matrix, (rows, low), 1.0 - frac)
  np.add.at(matrix, (rows, high), frac)
  return matrix.astype(np.float32)


def resize_align_corners(images: Array, size: int) -> Array:
  """Bilinear resize of NHWC ``images`` to ``size`` x ``size``, align_corners=True."""
  if images.shape[1] == size and images.shape[2] == size:
    return images
  rows = jnp.asarray(align_corners_matrix(size, images.shape[1]), images.dtype)
  cols = jnp.asarray(align_corners_matrix(size, images.shape[2]), images.dtype)
  precision = jax.lax.Precision.HIGHEST  # Tiny matmuls: keep them exact on GPUs too.
  out = jnp.einsum("oh,bhwc->bowc", rows, images, precision=precision)
  return jnp.einsum("pw,bowc->bopc", cols, out, precision=precision)


def synthesis_size(image_size: int) -> int:
  """The StyleGAN2 resolution for a face size: ``2 ** ceil(log2(size))`` (128 for 112)."""
  return 2 ** math.ceil(math.log2(image_size))


class StyleGAN2Decoder(nn.Module):
  """``codes + latent_avg`` -> StyleGAN2 synthesis -> resize to ``image_size``.

  The original's ``Decoder``: ``mapping`` holds the (inference-unused) mapping
  network ``decoder.style.*``, ``synthesis`` the rest of ``decoder.decoder.*``;
  ``latent_avg`` [1, 1, style_dim] is in the ``buffers`` collection with the
  noise buffers. The output is not clamped.

  Attributes:
    image_size: output size (112).
    style_dim: latent width (512).
    channels: synthesis widths at 4..128 px (None = channel multiplier table).
    channel_multiplier: 2 in MTLFace.
    mapping_layers: mapping MLP depth (8).
    lr_mlp: mapping learning-rate multiplier (0.01).
    dtype: computation dtype of the synthesis convolutions.
  """
  image_size: int = 112
  style_dim: int = 512
  channels: Optional[Sequence[int]] = None
  channel_multiplier: int = 2
  mapping_layers: int = 8
  lr_mlp: float = 0.01
  dtype: Any = jnp.float32

  def setup(self):
    self.mapping = stylegan2.MappingNetwork(self.style_dim, self.mapping_layers, self.lr_mlp)
    self.synthesis = stylegan2.SynthesisNetwork(
        synthesis_size(self.image_size), self.channels, self.channel_multiplier, self.dtype)
    self.latent_avg = self.variable(stylegan2.BUFFERS, "latent_avg", jnp.zeros,
                                    (1, 1, self.style_dim), jnp.float32)

  def __call__(self, codes: Array, noise: Optional[Sequence[Array]] = None,
               randomize_noise: bool = False) -> Array:
    """Decodes latent offsets [B, 12, style_dim] to [B, image_size, image_size, 3] images."""
    if self.is_initializing():
      # Create the mapping network's parameters (the forward pass skips it).
      self.mapping(jnp.zeros((1, self.style_dim), jnp.float32))
    w = codes.astype(jnp.float32) + self.latent_avg.value
    images = self.synthesis(w, noise, randomize_noise)
    return resize_align_corners(images, self.image_size)

  def map_latents(self, z: Array) -> Array:
    """The mapping network z -> w (for truncation or mean-w estimates)."""
    return self.mapping(z)


class TPAMIGenerator(nn.Module):
  """The released TPAMI face age synthesis: style path + StyleGAN2 decoder.

  ``style_encoder`` (:class:`~mtlface_jax.models.style_encoder.StyleEncoder`)
  and ``decoder`` (:class:`StyleGAN2Decoder`) hold the converted
  ``encoder.{styles,aging*,upsample*,latlayer*}`` and ``decoder.*`` tensors.
  Variables: ``params`` and ``buffers`` (noise maps, ``latent_avg``).

  Attributes:
    num_groups: age groups (7).
    image_size: face size (112); the synthesis runs at the next power of two.
    style_dim: latent width (512).
    channels: synthesis widths (None = the released table; reduced in tests).
    channel_multiplier: 2.
    mapping_layers: 8.
    lr_mlp: 0.01.
    dtype: computation dtype (bfloat16 on accelerators); params stay float32.
  """
  num_groups: int = 7
  image_size: int = 112
  style_dim: int = 512
  channels: Optional[Sequence[int]] = None
  channel_multiplier: int = 2
  mapping_layers: int = 8
  lr_mlp: float = 0.01
  dtype: Any = jnp.float32

  def setup(self):
    self.style_encoder = style_encoder.StyleEncoder(
        self.num_groups, self.style_dim, self.image_size, self.dtype)
    self.decoder = StyleGAN2Decoder(self.image_size, self.style_dim, self.channels,
                                    self.channel_multiplier, self.mapping_layers, self.lr_mlp,
                                    self.dtype)

  def __call__(self, images: Array, x2: Array, x3: Array, x4: Array, x_id: Array,
               target_group: Array, train: bool = False, randomize_noise: bool = False,
               return_latents: bool = False):
    """Ages faces to ``target_group`` (the generator contract).

    Args:
      images: [B, S, S, 3] input faces; they fix the output's size and dtype
        only (the output is synthesised whole, not added to them).
      x2, x3, x4, x_id: :class:`~mtlface_jax.models.iresnet.EncoderOutputs`
        fields of the (frozen) TPAMI encoder on ``images``.
      target_group: [B] int age groups.
      train: accepted for the contract; this generator has no batch statistics
        or dropout, so training and inference compute the same function.
      randomize_noise: fresh noise from the ``'noise'`` RNG stream instead of
        the checkpoint's noise buffers.
      return_latents: also return the latent offsets [B, 12, style_dim].

    Returns:
      Images in [-1, 1] shaped and typed like ``images``; with
      ``return_latents``, the pair (images, latents).
    """
    del train
    if images.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f"TPAMIGenerator makes {self.image_size} px faces, got input "
                       f"{images.shape}")
    latents = self.latents(x2, x3, x4, x_id, target_group)
    out = self.decode(latents, randomize_noise=randomize_noise).astype(images.dtype)
    return (out, latents) if return_latents else out

  def latents(self, x2: Array, x3: Array, x4: Array, x_id: Array,
              target_group: Array) -> Array:
    """The style path's float32 latent offsets [B, 12, style_dim] (before ``latent_avg``)."""
    return self.style_encoder(x2, x3, x4, x_id, target_group)

  def decode(self, latents: Array, noise: Optional[Sequence[Array]] = None,
             randomize_noise: bool = False) -> Array:
    """Latent offsets -> images clamped to [-1, 1] (``MTLFace.aging``'s last step)."""
    return jnp.clip(self.decoder(latents, noise, randomize_noise), -1.0, 1.0)
