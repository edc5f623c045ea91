"""StyleGAN2 generator with the semantics of rosinality's stylegan2-pytorch, NHWC.

Reference: ``docs/architecture.md`` sections T1.3, T6 and T7. This is the
decoder of the released TPAMI 2022 MTLFace model (128 px, channel multiplier 2,
style dim 512, 8 mapping layers, 12 latents).

Parameters keep PyTorch's *stored* values and the equalized-learning-rate
factors (``1/sqrt(fan_in)``, ``lr_mul``) are applied at run time, so every
PyTorch tensor maps 1:1 to a Flax leaf and training sees the same dynamics.

XLA-friendly forms (docs/architecture.md section T7), mathematically identical to the
per-sample grouped convolutions of the original:

* modulation scales the *input* by ``s[b, i]``, one dense convolution with the
  shared weight runs on the whole batch, and demodulation multiplies the
  *output* by ``d[b, o] = rsqrt(sum_{i,kh,kw} (w s)^2 + 1e-8)``;
* the upsampling convolution is a stride-2 transposed convolution, written as
  a convolution of the zero-dilated input (``lhs_dilation``) with the flipped
  kernel, followed by the [1, 3, 3, 1] blur;
* ``upfirdn2d`` with the separable [1, 3, 3, 1] kernel runs as two 1-D passes
  of shifted multiply-adds, which XLA fuses into one elementwise loop.

Noise: the checkpoint's ``noises.noise_i`` buffers live in the non-trainable
collection ``buffers``; by default they are used (the original's
``randomize_noise=False``, deterministic). ``randomize_noise=True`` draws fresh
N(0, 1) noise per sample from the ``'noise'`` RNG stream, which the caller
passes explicitly (``apply(..., rngs={'noise': key})``).
"""

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
SQRT2 = math.sqrt(2.0)
BLUR_KERNEL = (1, 3, 3, 1)
NEGATIVE_SLOPE = 0.2
DEMOD_EPS = 1e-8
BUFFERS = "buffers"  # Non-trainable collection: noise buffers and latent_avg.
_CONV_DIMS = ("NHWC", "HWIO", "NHWC")


def stylegan2_channels(size: int, channel_multiplier: int = 2) -> tuple[int, ...]:
  """Feature channels at 4, 8, ..., ``size`` px (rosinality's table).

  Args:
    size: output resolution, a power of two from 4 to 1024.
    channel_multiplier: 2 in MTLFace (the default of ``Generator``).

  Returns:
    One width per resolution, e.g. (512, 512, 512, 512, 512, 256) for 128 px.
  """
  cm = channel_multiplier
  table = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * cm, 128: 128 * cm,
           256: 64 * cm, 512: 32 * cm, 1024: 16 * cm}
  log_size = int(math.log2(size))
  if 2 ** log_size != size or size not in table:
    raise ValueError(f"StyleGAN2 size must be a power of two in [4, 1024], got {size}")
  return tuple(table[2 ** r] for r in range(2, log_size + 1))


def blur_kernel_2d(kernel: Sequence[int] = BLUR_KERNEL, gain: float = 1.0) -> np.ndarray:
  """The 2-D FIR kernel ``outer(k, k) / sum * gain`` (the PyTorch ``kernel`` buffers)."""
  k = np.asarray(kernel, np.float64)
  k2 = np.outer(k, k)
  return (k2 / k2.sum() * gain).astype(np.float32)


def _fir_1d(x: Array, taps: np.ndarray, up: int, pad: tuple[int, int], axis: int) -> Array:
  """Zero-insert upsampling, padding and a correlation with ``taps`` along ``axis``."""
  n = x.shape[axis]
  if up > 1:
    # Each sample is followed by up-1 zeros, as in upfirdn2d (trailing ones too).
    x = jnp.stack([x] + [jnp.zeros_like(x)] * (up - 1), axis=axis + 1)
    shape = list(x.shape[:axis + 1]) + list(x.shape[axis + 2:])
    shape[axis] = n * up
    x = x.reshape(shape)
  widths = [(0, 0)] * x.ndim
  widths[axis] = pad
  x = jnp.pad(x, widths)
  length = x.shape[axis] - len(taps) + 1
  out = None
  for i, tap in enumerate(taps):
    term = float(tap) * jax.lax.slice_in_dim(x, i, i + length, axis=axis)
    out = term if out is None else out + term
  return out


def upfirdn2d(x: Array, kernel: Sequence[int] = BLUR_KERNEL, up: int = 1,
              pad: tuple[int, int] = (0, 0), gain: float = 1.0) -> Array:
  """rosinality's ``upfirdn2d`` (down = 1) of NHWC ``x`` with a separable kernel.

  Per channel: insert ``up - 1`` zeros after every sample, pad ``pad[0]``
  before and ``pad[1]`` after, and *convolve* (kernel flipped) with
  ``outer(k, k) / sum * gain``; output size ``n * up + pad0 + pad1 - len(k) + 1``.

  Args:
    x: [N, H, W, C].
    kernel: the 1-D taps k (the 2-D kernel is their outer product).
    up: upsampling factor.
    pad: non-negative (before, after) padding, the same on both axes.
    gain: overall kernel gain (``up ** 2`` when upsampling).

  Returns:
    The filtered [N, H', W', C] array, same dtype.
  """
  if min(pad) < 0:
    raise ValueError(f"negative padding is not supported, got {pad}")
  taps = np.asarray(kernel, np.float64)
  # The 2-D kernel is separable: each axis takes sqrt(gain) of the normalisation.
  taps = (taps / taps.sum() * math.sqrt(gain))[::-1]
  for axis in (1, 2):
    x = _fir_1d(x, taps, up, pad, axis)
  return x


def pixel_norm(x: Array) -> Array:
  """``x * rsqrt(mean(x^2, -1) + 1e-8)``."""
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + 1e-8)


def scaled_leaky_relu(x: Array) -> Array:
  """``leaky_relu(x, 0.2) * sqrt(2)``, the activation of every StyleGAN2 layer."""
  return jax.nn.leaky_relu(x, NEGATIVE_SLOPE) * SQRT2


class EqualLinear(nn.Module):
  """Equalized-LR linear layer: ``x @ (W lr_mul / sqrt(in)) + b lr_mul``.

  ``kernel`` is stored as PyTorch stores ``weight`` (transposed to [in, out]),
  initialised N(0, 1/lr_mul^2); ``bias`` starts at ``bias_init``. Always runs
  in float32 (styles and modulations are tiny and feed the demodulation).

  Attributes:
    features: output width.
    lr_mul: learning-rate multiplier (0.01 in the mapping network).
    bias_init: initial bias (1 for the modulation layers).
    activation: apply ``leaky_relu(., 0.2) * sqrt(2)`` after the bias.
  """
  features: int
  lr_mul: float = 1.0
  bias_init: float = 0.0
  activation: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    in_features = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.normal(1.0 / self.lr_mul),
                        (in_features, self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.constant(self.bias_init), (self.features,),
                      jnp.float32)
    y = x.astype(jnp.float32) @ (kernel * (self.lr_mul / math.sqrt(in_features)))
    y = y + bias * self.lr_mul
    return scaled_leaky_relu(y) if self.activation else y


class MappingNetwork(nn.Module):
  """z -> w: PixelNorm and ``num_layers`` EqualLinear(lr_mul) + scaled leaky ReLU.

  Its layers are ``dense1`` .. ``dense8`` (PyTorch ``style.1`` .. ``style.8``;
  ``style.0`` is the parameter-free PixelNorm). MTLFace feeds latents directly
  to the synthesis network, so this is only needed for training and truncation.
  """
  style_dim: int = 512
  num_layers: int = 8
  lr_mul: float = 0.01

  @nn.compact
  def __call__(self, z: Array) -> Array:
    x = pixel_norm(z.astype(jnp.float32))
    for i in range(1, self.num_layers + 1):
      x = EqualLinear(self.style_dim, lr_mul=self.lr_mul, activation=True, name=f"dense{i}")(x)
    return x


class ModulatedConv2d(nn.Module):
  """Modulated (optionally demodulated, optionally 2x upsampling) convolution.

  ``weight`` [k, k, I, O] is the PyTorch (1, O, I, k, k) weight in HWIO order;
  ``modulation`` maps the style w to per-input-channel scales (bias init 1).

  Attributes:
    features: output channels O.
    kernel_size: k (3, or 1 for ToRGB).
    demodulate: normalise each output channel's modulated weight.
    upsample: stride-2 transposed convolution followed by the [1,3,3,1] blur.
    dtype: computation dtype of the convolution.
  """
  features: int
  kernel_size: int
  demodulate: bool = True
  upsample: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, w: Array) -> Array:
    k, in_features = self.kernel_size, x.shape[-1]
    weight = self.param("weight", nn.initializers.normal(1.0),
                        (k, k, in_features, self.features), jnp.float32)
    s = EqualLinear(in_features, bias_init=1.0, name="modulation")(w)  # [B, I] float32
    kernel = weight * (1.0 / math.sqrt(in_features * k * k))
    h = x.astype(self.dtype) * s[:, None, None, :].astype(self.dtype)
    if self.upsample:
      # conv_transpose(stride 2, pad 0) == conv of the zero-dilated input with
      # the spatially flipped kernel and k-1 padding: output 2H + 1.
      h = jax.lax.conv_general_dilated(
          h, kernel[::-1, ::-1].astype(self.dtype), (1, 1), ((k - 1, k - 1), (k - 1, k - 1)),
          lhs_dilation=(2, 2), dimension_numbers=_CONV_DIMS)
    else:
      h = jax.lax.conv_general_dilated(
          h, kernel.astype(self.dtype), (1, 1), ((k // 2, k // 2), (k // 2, k // 2)),
          dimension_numbers=_CONV_DIMS)
    if self.demodulate:
      # sum_{i,kh,kw} (kernel s_i)^2 = sum_i s_i^2 sum_{kh,kw} kernel^2.
      energy = jnp.einsum("io,bi->bo", jnp.sum(jnp.square(kernel), axis=(0, 1)), jnp.square(s))
      h = h * jax.lax.rsqrt(energy + DEMOD_EPS)[:, None, None, :].astype(self.dtype)
    if self.upsample:
      # Blur with pad (1, 1): 2H + 1 + 2 - 4 + 1 = 2H.
      h = upfirdn2d(h, pad=(1, 1), gain=4.0)
    return h


class NoiseInjection(nn.Module):
  """``x + weight * noise`` with one learnable scalar (initially 0)."""

  @nn.compact
  def __call__(self, x: Array, noise: Array) -> Array:
    weight = self.param("weight", nn.initializers.zeros, (1,), jnp.float32)
    return x + (weight * noise).astype(x.dtype)


class FusedLeakyReLU(nn.Module):
  """``leaky_relu(x + bias, 0.2) * sqrt(2)`` with a per-channel bias."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],), jnp.float32)
    return scaled_leaky_relu(x + bias.astype(x.dtype))


class StyledConv(nn.Module):
  """ModulatedConv2d -> NoiseInjection -> FusedLeakyReLU (``conv``/``noise``/``activate``)."""
  features: int
  upsample: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, w: Array, noise: Array) -> Array:
    h = ModulatedConv2d(self.features, 3, upsample=self.upsample, dtype=self.dtype,
                        name="conv")(x, w)
    h = NoiseInjection(name="noise")(h, noise)
    return FusedLeakyReLU(name="activate")(h)


class ToRGB(nn.Module):
  """1x1 modulated conv to RGB (no demodulation) + bias, plus the upsampled skip.

  The 3-channel skip path is accumulated in float32 whatever ``dtype`` (it is
  the image, and cheap), so bfloat16 compute does not round the sum per level.
  """
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, w: Array, skip: Optional[Array] = None) -> Array:
    out = ModulatedConv2d(3, 1, demodulate=False, dtype=self.dtype, name="conv")(x, w)
    bias = self.param("bias", nn.initializers.zeros, (1, 1, 1, 3), jnp.float32)
    out = out.astype(jnp.float32) + bias
    if skip is not None:
      out = out + upfirdn2d(skip, up=2, pad=(2, 1), gain=4.0)
    return out


class ConstantInput(nn.Module):
  """The learned 4x4 input, tiled over the batch."""
  features: int

  @nn.compact
  def __call__(self, batch: int, dtype: Any) -> Array:
    value = self.param("input", nn.initializers.normal(1.0), (1, 4, 4, self.features),
                       jnp.float32)
    return jnp.broadcast_to(value.astype(dtype), (batch, 4, 4, self.features))


def num_noise_layers(size: int) -> int:
  """Noise inputs of the synthesis network: one per StyledConv (11 at 128 px)."""
  return (int(math.log2(size)) - 2) * 2 + 1


def num_latents(size: int) -> int:
  """Latents the synthesis network reads (12 at 128 px)."""
  return int(math.log2(size)) * 2 - 2


def noise_shapes(size: int) -> list[tuple[int, int, int, int]]:
  """NHWC shapes of the ``noise_i`` buffers: (1, r, r, 1), r = 4, 8, 8, 16, 16, ..."""
  return [(1, 2 ** ((i + 5) // 2), 2 ** ((i + 5) // 2), 1) for i in range(num_noise_layers(size))]


class SynthesisNetwork(nn.Module):
  """StyleGAN2 synthesis: constant input, styled convs, ToRGB skips; latents -> image.

  Latent index use (docs/architecture.md section T1.3): 0 ``conv1``; 1 ``to_rgb1``; then
  per resolution 8..size the upsampling conv reads i, the second conv i + 1 and
  ToRGB i + 2, with i = 1, 3, 5, ... . Submodules are named as the PyTorch
  ones (``convs_j`` for ``convs.j``); the ``noise_i`` buffers are in the
  ``buffers`` collection.

  Attributes:
    size: output resolution (128 for MTLFace).
    channels: widths at 4, 8, ..., size px; None = :func:`stylegan2_channels`
      (reduced widths are for tests).
    channel_multiplier: used when ``channels`` is None.
    dtype: computation dtype of the convolutions.
  """
  size: int = 128
  channels: Optional[Sequence[int]] = None
  channel_multiplier: int = 2
  dtype: Any = jnp.float32

  def widths(self) -> tuple[int, ...]:
    """The widths per resolution actually used."""
    if self.channels is None:
      return stylegan2_channels(self.size, self.channel_multiplier)
    expected = int(math.log2(self.size)) - 1
    if len(self.channels) != expected:
      raise ValueError(f"channels needs {expected} widths (4..{self.size} px), "
                       f"got {tuple(self.channels)}")
    return tuple(self.channels)

  def _noise(self, batch: int, noise: Optional[Sequence[Array]], randomize: bool) -> list:
    """The noise maps per layer: given, random (rng 'noise'), or the buffers."""
    shapes = noise_shapes(self.size)
    buffers = [self.variable(BUFFERS, f"noise_{i}",
                             lambda s=shape: jax.random.normal(self.make_rng("params"), s))
               for i, shape in enumerate(shapes)]
    if noise is not None:
      if len(noise) != len(shapes):
        raise ValueError(f"expected {len(shapes)} noise maps, got {len(noise)}")
      return list(noise)
    if randomize:
      keys = jax.random.split(self.make_rng("noise"), len(shapes))
      return [jax.random.normal(key, (batch, *shape[1:])) for key, shape in zip(keys, shapes)]
    return [b.value for b in buffers]

  @nn.compact
  def __call__(self, latents: Array, noise: Optional[Sequence[Array]] = None,
               randomize_noise: bool = False) -> Array:
    """Synthesises images from per-layer latents.

    Args:
      latents: [B, n_latent, style_dim] W+ codes (12 at 128 px).
      noise: optional explicit noise maps, [B or 1, r, r, 1] per layer.
      randomize_noise: draw N(0, 1) noise from the ``'noise'`` RNG stream
        instead of using the buffers (ignored when ``noise`` is given).

    Returns:
      [B, size, size, 3] float32 images (unbounded).
    """
    widths = self.widths()
    if latents.shape[1] != num_latents(self.size):
      raise ValueError(f"expected {num_latents(self.size)} latents, got {latents.shape}")
    batch = latents.shape[0]
    noise = self._noise(batch, noise, randomize_noise)
    out = ConstantInput(widths[0], name="input")(batch, self.dtype)
    out = StyledConv(widths[0], dtype=self.dtype, name="conv1")(out, latents[:, 0], noise[0])
    skip = ToRGB(dtype=self.dtype, name="to_rgb1")(out, latents[:, 1])
    i = 1
    for level, width in enumerate(widths[1:]):
      out = StyledConv(width, upsample=True, dtype=self.dtype, name=f"convs_{2 * level}")(
          out, latents[:, i], noise[2 * level + 1])
      out = StyledConv(width, dtype=self.dtype, name=f"convs_{2 * level + 1}")(
          out, latents[:, i + 1], noise[2 * level + 2])
      skip = ToRGB(dtype=self.dtype, name=f"to_rgbs_{level}")(out, latents[:, i + 2], skip)
      i += 2
    return skip
