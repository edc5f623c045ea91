"""PyTorch (NCHW) reference of the released TPAMI model's ageing branch.

Written from ``docs/architecture.md`` (sections T1.2-T1.4 and T6): the
encoder's style path (style blocks, ICM v2, upsample blocks, lateral convs)
and rosinality's StyleGAN2 generator as the released ``Decoder`` uses it. The
CUDA ops of the original (``upfirdn2d``, ``fused_leaky_relu``) are replaced by
their native definitions, and the modulated convolutions run as the original's
per-sample grouped convolutions, so this is an independent check of the
XLA-friendly forms in ``mtlface_jax.models.stylegan2``.

State_dict keys and shapes are the released file's (``encoder.styles.*``,
``encoder.aging1.*``, ..., ``decoder.latent_avg``, ``decoder.decoder.*``).
Widths are arguments so that tests can run the real structure narrowly.
"""

import math
from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from . import mtlface_torch as base

SIGMA = 1.0 / 8.0
SLOPE = 0.2


# --- the CPU definitions of the StyleGAN2 ops ----------------------------------

def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1,
              pad: tuple[int, int] = (0, 0)) -> torch.Tensor:
  """Upsample (zero insertion), pad, FIR-filter (true convolution), downsample.

  Every channel is filtered on its own; negative pads crop.
  """
  n, c, h, w = x.shape
  y = x.reshape(n * c, 1, h, 1, w, 1)
  y = F.pad(y, (0, up - 1, 0, 0, 0, up - 1))  # zeros after every sample in H and W
  y = y.reshape(n * c, 1, h * up, w * up)
  p0, p1 = pad
  y = F.pad(y, (max(p0, 0), max(p1, 0), max(p0, 0), max(p1, 0)))
  y = y[:, :, max(-p0, 0):y.shape[2] - max(-p1, 0), max(-p0, 0):y.shape[3] - max(-p1, 0)]
  # F.conv2d correlates: flipping the kernel makes it a convolution.
  y = F.conv2d(y, torch.flip(kernel, (0, 1))[None, None])
  y = y[:, :, ::down, ::down]
  return y.reshape(n, c, y.shape[2], y.shape[3])


def fused_leaky_relu(x: torch.Tensor, bias: torch.Tensor, scale: float = math.sqrt(2)):
  """``leaky_relu(x + bias, 0.2) * scale``, bias per channel (dim 1)."""
  shape = (1, -1) + (1,) * (x.ndim - 2)
  return F.leaky_relu(x + bias.view(shape), SLOPE) * scale


def fir_kernel(taps: Sequence[int] = (1, 3, 3, 1), gain: float = 1.0) -> torch.Tensor:
  k = torch.tensor(taps, dtype=torch.float32)
  k = k[:, None] * k[None, :]
  return k / k.sum() * gain


# --- StyleGAN2 (rosinality's model.py semantics) -------------------------------

class EqualLinear(nn.Module):

  def __init__(self, in_dim: int, out_dim: int, bias_init: float = 0.0, lr_mul: float = 1.0,
               activation: bool = False):
    super().__init__()
    self.weight = nn.Parameter(torch.randn(out_dim, in_dim) / lr_mul)
    self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))
    self.scale, self.lr_mul, self.activation = lr_mul / math.sqrt(in_dim), lr_mul, activation
    self.bias_init = bias_init

  def forward(self, x):
    if self.activation:
      return fused_leaky_relu(F.linear(x, self.weight * self.scale), self.bias * self.lr_mul)
    return F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)


class PixelNorm(nn.Module):

  def forward(self, x):
    return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8)


class Blur(nn.Module):

  def __init__(self, pad: tuple[int, int], gain: float):
    super().__init__()
    self.register_buffer("kernel", fir_kernel(gain=gain))
    self.pad = pad

  def forward(self, x):
    return upfirdn2d(x, self.kernel, pad=self.pad)


class Upsample(nn.Module):

  def __init__(self):
    super().__init__()
    self.register_buffer("kernel", fir_kernel(gain=4.0))

  def forward(self, x):
    return upfirdn2d(x, self.kernel, up=2, pad=(2, 1))


class ModulatedConv2d(nn.Module):

  def __init__(self, in_ch: int, out_ch: int, k: int, style_dim: int, demodulate: bool = True,
               upsample: bool = False):
    super().__init__()
    self.in_ch, self.out_ch, self.k = in_ch, out_ch, k
    self.demodulate, self.upsample = demodulate, upsample
    if upsample:
      self.blur = Blur(pad=(1, 1), gain=4.0)  # 4 taps, factor 2, k = 3
    self.scale = 1 / math.sqrt(in_ch * k * k)
    self.weight = nn.Parameter(torch.randn(1, out_ch, in_ch, k, k))
    self.modulation = EqualLinear(style_dim, in_ch, bias_init=1)

  def forward(self, x, style):
    b, _, h, w = x.shape
    s = self.modulation(style).view(b, 1, self.in_ch, 1, 1)
    weight = self.scale * self.weight * s
    if self.demodulate:
      weight = weight * torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + 1e-8).view(
          b, self.out_ch, 1, 1, 1)
    x = x.reshape(1, b * self.in_ch, h, w)
    if self.upsample:
      weight = weight.transpose(1, 2).reshape(b * self.in_ch, self.out_ch, self.k, self.k)
      out = F.conv_transpose2d(x, weight, stride=2, padding=0, groups=b)
      return self.blur(out.view(b, self.out_ch, out.shape[2], out.shape[3]))
    weight = weight.reshape(b * self.out_ch, self.in_ch, self.k, self.k)
    out = F.conv2d(x, weight, padding=self.k // 2, groups=b)
    return out.view(b, self.out_ch, out.shape[2], out.shape[3])


class NoiseInjection(nn.Module):

  def __init__(self):
    super().__init__()
    self.weight = nn.Parameter(torch.zeros(1))

  def forward(self, x, noise):
    return x + self.weight * noise


class FusedLeakyReLU(nn.Module):

  def __init__(self, channels: int):
    super().__init__()
    self.bias = nn.Parameter(torch.zeros(channels))

  def forward(self, x):
    return fused_leaky_relu(x, self.bias)


class ConstantInput(nn.Module):

  def __init__(self, channels: int):
    super().__init__()
    self.input = nn.Parameter(torch.randn(1, channels, 4, 4))

  def forward(self, batch: int):
    return self.input.repeat(batch, 1, 1, 1)


class StyledConv(nn.Module):

  def __init__(self, in_ch, out_ch, style_dim, upsample=False):
    super().__init__()
    self.conv = ModulatedConv2d(in_ch, out_ch, 3, style_dim, upsample=upsample)
    self.noise = NoiseInjection()
    self.activate = FusedLeakyReLU(out_ch)

  def forward(self, x, style, noise):
    return self.activate(self.noise(self.conv(x, style), noise))


class ToRGB(nn.Module):

  def __init__(self, in_ch, style_dim, upsample=True):
    super().__init__()
    if upsample:
      self.upsample = Upsample()
    self.conv = ModulatedConv2d(in_ch, 3, 1, style_dim, demodulate=False)
    self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

  def forward(self, x, style, skip=None):
    out = self.conv(x, style) + self.bias
    return out if skip is None else out + self.upsample(skip)


def default_channels(size: int, multiplier: int = 2) -> list[int]:
  table = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * multiplier, 128: 128 * multiplier}
  return [table[2 ** r] for r in range(2, int(math.log2(size)) + 1)]


class StyleGAN2Generator(nn.Module):
  """Mapping network ``style`` and synthesis, with ``input_is_latent=True`` forward."""

  def __init__(self, size: int = 128, style_dim: int = 512, n_mlp: int = 8,
               channels: Optional[Sequence[int]] = None, lr_mlp: float = 0.01):
    super().__init__()
    channels = list(channels or default_channels(size))
    self.style = nn.Sequential(PixelNorm(), *[
        EqualLinear(style_dim, style_dim, lr_mul=lr_mlp, activation=True) for _ in range(n_mlp)])
    self.input = ConstantInput(channels[0])
    self.conv1 = StyledConv(channels[0], channels[0], style_dim)
    self.to_rgb1 = ToRGB(channels[0], style_dim, upsample=False)
    self.convs, self.to_rgbs = nn.ModuleList(), nn.ModuleList()
    self.noises = nn.Module()
    self.num_layers = 2 * (len(channels) - 1) + 1
    for i in range(self.num_layers):
      r = 2 ** ((i + 5) // 2)
      self.noises.register_buffer(f"noise_{i}", torch.randn(1, 1, r, r))
    for in_ch, out_ch in zip(channels[:-1], channels[1:]):
      self.convs.append(StyledConv(in_ch, out_ch, style_dim, upsample=True))
      self.convs.append(StyledConv(out_ch, out_ch, style_dim))
      self.to_rgbs.append(ToRGB(out_ch, style_dim))

  def forward(self, latent, noise=None):
    """latent [B, n_latent, style_dim]; noise: per-layer maps, default the buffers."""
    if noise is None:
      noise = [getattr(self.noises, f"noise_{i}") for i in range(self.num_layers)]
    out = self.conv1(self.input(latent.shape[0]), latent[:, 0], noise[0])
    skip = self.to_rgb1(out, latent[:, 1])
    i = 1
    for level, to_rgb in enumerate(self.to_rgbs):
      out = self.convs[2 * level](out, latent[:, i], noise[2 * level + 1])
      out = self.convs[2 * level + 1](out, latent[:, i + 1], noise[2 * level + 2])
      skip = to_rgb(out, latent[:, i + 2], skip)
      i += 2
    return skip


class Decoder(nn.Module):
  """``codes + latent_avg`` -> generator -> bilinear (align_corners) to 112."""

  def __init__(self, input_size: int = 112, style_dim: int = 512,
               channels: Optional[Sequence[int]] = None):
    super().__init__()
    self.input_size = input_size
    self.decoder = StyleGAN2Generator(2 ** math.ceil(math.log2(input_size)), style_dim,
                                      channels=channels)
    self.register_buffer("latent_avg", torch.zeros(1, 1, style_dim))

  def forward(self, codes, noise=None, resize=True):
    images = self.decoder(codes + self.latent_avg, noise)
    if not resize:
      return images
    return F.interpolate(images, size=self.input_size, mode="bilinear", align_corners=True)


# --- the encoder's style path --------------------------------------------------

def _lrelu():
  return nn.LeakyReLU(SLOPE)


class StyleBlock(nn.Module):

  def __init__(self, in_ch: int, out_ch: int, spatial: int):
    super().__init__()
    layers = [nn.Conv2d(in_ch, out_ch, 3, 2, 1), _lrelu()]
    for _ in range(int(math.log2(spatial)) - 1):
      layers += [nn.Conv2d(out_ch, out_ch, 3, 2, 1), _lrelu()]
    self.convs = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1))
    self.linear = nn.Linear(out_ch, out_ch)

  def forward(self, x):
    return self.linear(self.convs(x).flatten(1))


class ResidualBlockV2(nn.Module):

  def __init__(self, channels: int, groups: int, unit: int):
    super().__init__()
    self.conv1 = nn.Sequential(nn.Conv2d(channels, channels, 3, 1, 1), nn.InstanceNorm2d(channels))
    self.router1 = base.TaskRouter(groups, unit, SIGMA)
    self.conv2 = nn.Sequential(nn.Conv2d(channels, channels, 3, 1, 1), nn.InstanceNorm2d(channels))
    self.router2 = base.TaskRouter(groups, unit, SIGMA)

  def forward(self, x, groups):
    h = F.leaky_relu(self.router1(self.conv1(x), groups), SLOPE)
    h = self.router2(self.conv2(h), groups)
    return F.leaky_relu(x + h, SLOPE)


class AgingModuleV2(nn.Module):

  def __init__(self, in_ch: int, groups: int = 7, repeat: int = 4):
    super().__init__()
    unit = in_ch // 4
    channels = int((groups - (groups - 1) * SIGMA) * unit)
    self.groups, self.unit = groups, unit
    self.conv1 = nn.Sequential(nn.Conv2d(in_ch, channels, 1), nn.InstanceNorm2d(channels),
                               _lrelu())
    self.router = base.TaskRouter(groups, unit, SIGMA)
    self.transform = nn.ModuleList(ResidualBlockV2(channels, groups, unit) for _ in range(repeat))
    self.conv2 = nn.Sequential(nn.Conv2d(channels, in_ch, 1))

  def forward(self, x, groups):
    x = self.router(self.conv1(x), groups)
    for block in self.transform:
      x = block(x, groups)
    return self.conv2(x)


def _norm_act_conv(in_ch, out_ch):
  return [nn.InstanceNorm2d(in_ch), _lrelu(), nn.Conv2d(in_ch, out_ch, 3, padding=1)]


class UpsampleV2(nn.Module):

  def __init__(self, x_ch: int, in_ch: int, out_ch: int):
    super().__init__()
    self.conv = nn.Sequential(*_norm_act_conv(in_ch, out_ch), *_norm_act_conv(out_ch, out_ch))
    self.conv2 = nn.Sequential(*_norm_act_conv(out_ch, out_ch), *_norm_act_conv(out_ch, out_ch))
    self.shortcut = nn.Conv2d(x_ch, out_ch, 1)

  def forward(self, x, up):
    if x.shape[2] < up.shape[2]:
      x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    p = self.conv(torch.cat([x, up], dim=1)) + self.shortcut(x)
    return p + self.conv2(p)


def add_style_path(module: nn.Module, widths: Sequence[int] = (64, 128, 256, 512),
                   style_dim: int = 512, groups: int = 7, input_size: int = 112) -> None:
  """Registers the style path's submodules on ``module`` (the released names).

  Args:
    module: the encoder module to extend (its keys become ``styles.*`` etc.).
    widths: channels of c1, c2, c3 and x_id (the IR-50 stage widths).
    style_dim: latent width.
    groups: age groups.
    input_size: face size; 12 latents for 112.
  """
  c1, c2, c3, c4 = widths
  n_styles = math.ceil(math.log2(input_size)) * 2 - 2
  module.styles = nn.ModuleList()
  for i in range(n_styles):
    if i < 3:
      module.styles.append(StyleBlock(c4, style_dim, input_size // 16))
    elif i < 7:
      module.styles.append(StyleBlock(style_dim, style_dim, input_size // 8))
    else:
      module.styles.append(StyleBlock(style_dim, style_dim, input_size // 2))
  module.upsample1 = UpsampleV2(c4, c4 + c3, c3)
  module.upsample2 = UpsampleV2(c3, c3 + c2, c2)
  module.upsample3 = UpsampleV2(c2, c2 + c1, c1)
  module.latlayer1 = nn.Conv2d(c3, style_dim, 3, 1, 1)
  module.latlayer2 = nn.Conv2d(c1, style_dim, 3, 1, 1)
  module.aging1 = AgingModuleV2(c4, groups)
  module.aging2 = AgingModuleV2(c3, groups)
  module.aging3 = AgingModuleV2(c2, groups)


def style_latents(module: nn.Module, c1, c2, c3, x_id, groups) -> torch.Tensor:
  """``Encoder.get_conditions``: the 12 latents [B, 12, style_dim]."""
  latents = [module.styles[j](x_id) for j in range(3)]
  p3 = module.upsample1(module.aging1(x_id, groups), c3)
  middle = module.latlayer1(p3)
  latents += [module.styles[j](middle) for j in range(3, 7)]
  p4 = module.upsample2(module.aging2(p3, groups), c2)
  p4 = module.upsample3(module.aging3(p4, groups), c1)
  fine = module.latlayer2(p4)
  latents += [module.styles[j](fine) for j in range(7, len(module.styles))]
  return torch.stack(latents, dim=1)


class StylePath(nn.Module):
  """The style path alone (keys ``styles.*``, ``aging*``, ... without ``encoder.``)."""

  def __init__(self, widths=(64, 128, 256, 512), style_dim=512, groups=7):
    super().__init__()
    add_style_path(self, widths, style_dim, groups)

  def forward(self, c1, c2, c3, x_id, groups):
    return style_latents(self, c1, c2, c3, x_id, groups)


class TPAMIAgeing(nn.Module):
  """Style path (``encoder.*``) + decoder (``decoder.*``): the ageing branch alone.

  ``forward`` is ``MTLFace.aging`` from the encoder features onwards, with the
  noise buffers (or explicit ``noise``) instead of random noise.
  """

  def __init__(self, widths=(64, 128, 256, 512), style_dim=512, groups=7,
               channels: Optional[Sequence[int]] = None):
    super().__init__()
    self.encoder = StylePath(widths, style_dim, groups)
    self.decoder = Decoder(112, style_dim, channels)

  def forward(self, c1, c2, c3, x_id, groups, noise=None):
    latents = self.encoder(c1, c2, c3, x_id, groups)
    decoded = self.decoder(latents, noise)
    return latents, decoded, decoded.clamp(-1, 1)


class TPAMIEncoder(base.IRBackbone):
  """The released ``Encoder``: IR-50 recognition path + style path (keys ``encoder.*``)."""

  def __init__(self, groups: int = 7):
    super().__init__(50, 112, released=True)
    add_style_path(self, groups=groups)


class TPAMIModel(nn.Module):
  """The released ``MTLFace()``: every key of ``mtlface_checkpoints.tar``."""

  def __init__(self, groups: int = 7):
    super().__init__()
    self.encoder = TPAMIEncoder(groups)
    self.age_estimator = base.AgeEstimator(groups, 112, with_expectation_buffer=True)
    self.decoder = Decoder(112)

  def aging(self, image, groups, noise=None):
    """``MTLFace.aging`` with the noise buffers (or ``noise``): [B, 3, 112, 112] in [-1, 1]."""
    features = self.encoder(image)
    latents = style_latents(self.encoder, features.x2, features.x3, features.x4,
                            features.x_id, groups)
    return self.decoder(latents, noise).clamp(-1, 1)


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0, rgb_gain: float = 0.3) -> nn.Module:
  """Random weights with non-trivial statistics for parity tests.

  Standard layers as :func:`base.randomize_`; StyleGAN2 layers: weights N(0, 1)
  (their own init, equalized LR scales them), modulation biases 1 + U(-0.3, 0.3),
  noise weights U(0.1, 0.5) (non-zero, so noise matters), activation and RGB
  biases U(-0.2, 0.2), ``latent_avg`` N(0, 0.5^2) and fresh noise buffers.
  ToRGB weights are scaled by ``rgb_gain`` so that most output pixels stay
  inside the final clamp to [-1, 1].
  """
  base.randomize_(module, seed)
  gen = torch.Generator().manual_seed(seed + 1)
  for sub in module.modules():
    if isinstance(sub, EqualLinear):
      sub.weight.normal_(0.0, 1.0 / sub.lr_mul, generator=gen)
      sub.bias.uniform_(-0.3, 0.3, generator=gen).add_(sub.bias_init)
    elif isinstance(sub, ModulatedConv2d):
      sub.weight.normal_(generator=gen)
    elif isinstance(sub, NoiseInjection):
      sub.weight.uniform_(0.1, 0.5, generator=gen)
    elif isinstance(sub, (FusedLeakyReLU, ToRGB)):
      sub.bias.uniform_(-0.2, 0.2, generator=gen)
    elif isinstance(sub, ConstantInput):
      sub.input.normal_(generator=gen)
    elif isinstance(sub, Decoder):
      sub.latent_avg.normal_(0.0, 0.5, generator=gen)
    elif isinstance(sub, StyleGAN2Generator):
      for name, buffer in sub.noises.named_buffers():
        buffer.normal_(generator=gen)
  for sub in module.modules():
    if isinstance(sub, ToRGB):
      sub.conv.weight.mul_(rgb_gain)
  return module


@torch.no_grad()
def fill_buffers_(module: nn.Module) -> nn.Module:
  """(Re)computes every buffer: router masks, FIR kernels, ``expectation``, noise, latent_avg.

  For a model moved off the meta device with ``to_empty``, whose buffers hold
  no values (parameters stay uninitialised).
  """
  for sub in module.modules():
    if isinstance(sub, AgingModuleV2):
      mask = base.router_mask(sub.groups, sub.unit, SIGMA)
      for router in sub.modules():
        if isinstance(router, base.TaskRouter):
          router._unit_mapping.copy_(mask)  # pylint: disable=protected-access
    elif isinstance(sub, (Blur, Upsample)):
      sub.kernel.copy_(fir_kernel(gain=4.0))
    elif isinstance(sub, base.AgeEstimator) and sub.expectation is not None:
      sub.expectation.copy_(torch.arange(base.NUM_AGE_CLASSES, dtype=torch.float32))
    elif isinstance(sub, Decoder):
      sub.latent_avg.zero_()
    elif isinstance(sub, StyleGAN2Generator):
      for _, buffer in sub.noises.named_buffers():
        buffer.normal_()
  return module
