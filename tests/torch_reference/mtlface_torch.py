"""PyTorch modules (NCHW) of MTLFace, written from docs/architecture.md.

They exist so that the JAX port can be checked against an independent
implementation: their ``state_dict`` keys and shapes equal
``tests/fixtures/torch_layouts.json`` exactly (asserted in
``tests/test_torch_reference.py``), so a file saved from them has the layout of
the published checkpoints.

CVPR 2021 layout: ``IRBackbone`` (attention v1), ``AgeEstimator``, ``CosFace``,
``AgingModule`` (ICM + decoder), ``PatchDiscriminator`` (spectral norm).
TPAMI 2022 released model: ``TPAMIRecognitionModel`` holding an ``IRBackbone``
with attention v2 and the released embedding head (keys ``encoder.*``) and an
``AgeEstimator`` with an ``expectation`` buffer (keys ``age_estimator.*``). The
released ageing branch (the encoder's style path and the StyleGAN2 decoder) and
the whole released model are in ``tpami_torch.py``.
"""

from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

# Units per stage for each supported IR depth.
IR_UNITS = {
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    64: (3, 4, 10, 3),
    101: (3, 13, 30, 3),
}
STAGE_DEPTHS = (64, 128, 256, 512)
NUM_AGE_CLASSES = 101
SPP_SIZES = (1, 2, 3)


class BackboneOutput(NamedTuple):
  """What the backbone returns; x1..x5 are the stage outputs (NCHW)."""
  embedding: torch.Tensor
  x_id: torch.Tensor
  x_age: torch.Tensor
  x1: torch.Tensor
  x2: torch.Tensor
  x3: torch.Tensor
  x4: torch.Tensor
  x5: torch.Tensor


class AgeOutput(NamedTuple):
  """What the age estimator returns."""
  age_logits: torch.Tensor
  group_logits: torch.Tensor
  expected_age: torch.Tensor


class IRUnit(nn.Module):
  """Improved-residual unit: BN-conv-BN-PReLU-conv-BN plus a shortcut."""

  def __init__(self, in_channels: int, depth: int, stride: int):
    super().__init__()
    # The shortcut is registered first: the reference state_dict lists it first.
    if in_channels == depth:
      # A 1x1 max-pool with this stride just takes every stride-th pixel.
      self.shortcut_layer = nn.MaxPool2d(1, stride)
    else:
      self.shortcut_layer = nn.Sequential(
          nn.Conv2d(in_channels, depth, 1, stride, bias=False),
          nn.BatchNorm2d(depth))
    self.res_layer = nn.Sequential(
        nn.BatchNorm2d(in_channels),
        nn.Conv2d(in_channels, depth, 3, 1, 1, bias=False),
        nn.BatchNorm2d(depth),
        nn.PReLU(depth),
        nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
        nn.BatchNorm2d(depth))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.res_layer(x) + self.shortcut_layer(x)


def spatial_pyramid(x: torch.Tensor, pool_type: str) -> torch.Tensor:
  """Adaptive pooling to 1x1, 2x2, 3x3, each flattened channel-major, concatenated.

  Args:
    x: (N, C, H, W) features.
    pool_type: 'avg' or 'max' (PyTorch's own adaptive pooling bins).

  Returns:
    (N, C * 14) vector ordered [level 1x1 | level 2x2 | level 3x3].
  """
  pool = F.adaptive_avg_pool2d if pool_type == "avg" else F.adaptive_max_pool2d
  levels = [pool(x, size).reshape(x.shape[0], -1) for size in SPP_SIZES]
  return torch.cat(levels, dim=1)


class FeatureAttention(nn.Module):
  """Attention-based feature decomposition (``fsm``), version 1 or 2.

  v1 (CVPR): avg and max pyramids summed (7168), x_age = 0.5 (x*c + x*s),
  x_id = x - x_age. v2 (TPAMI): pyramids concatenated [avg, max] (14336),
  x_id = x * 0.5 (c + s), x_age = x - x_id.
  """

  def __init__(self, version: int, channels: int = 512, reduction: int = 16):
    super().__init__()
    if version not in (1, 2):
      raise ValueError(f"attention version must be 1 or 2, got {version}")
    self.version = version
    pyramid = channels * sum(s * s for s in SPP_SIZES) * version
    self.spatial = nn.Sequential(
        nn.Conv2d(2, 1, 7, 1, 3, bias=False),
        nn.BatchNorm2d(1, momentum=0.01),
        nn.Sigmoid())
    self.channel = nn.Sequential(
        nn.Conv2d(pyramid, pyramid // reduction, 1, bias=False),
        nn.ReLU(),
        nn.Conv2d(pyramid // reduction, channels, 1, bias=False),
        nn.BatchNorm2d(channels, momentum=0.01),
        nn.Sigmoid())

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    avg, mx = spatial_pyramid(x, "avg"), spatial_pyramid(x, "max")
    pooled = avg + mx if self.version == 1 else torch.cat([avg, mx], dim=1)
    channel_scale = self.channel(pooled[:, :, None, None])
    spatial_input = torch.cat(
        [x.max(dim=1, keepdim=True)[0], x.mean(dim=1, keepdim=True)], dim=1)
    spatial_scale = self.spatial(spatial_input)
    if self.version == 1:
      x_age = 0.5 * (x * channel_scale + x * spatial_scale)
      return x - x_age, x_age
    x_id = x * (0.5 * (channel_scale + spatial_scale))
    return x_id, x - x_id


def _stage(in_channels: int, depth: int, units: int) -> nn.Sequential:
  layers = [IRUnit(in_channels, depth, 2)]
  layers += [IRUnit(depth, depth, 1) for _ in range(units - 1)]
  return nn.Sequential(*layers)


class IRBackbone(nn.Module):
  """IR-34/50/64/101 encoder with attention decomposition and embedding head.

  ``released=False`` is the CVPR model (attention v1, output layer
  BN-Dropout(0.5)-Flatten-Linear-BN1d). ``released=True`` is the TPAMI encoder's
  recognition path (attention v2, BN-Flatten-Dropout(0.4)-Linear-BN1d whose
  scale is frozen at 1, embedding L2-normalized).
  """

  def __init__(self, num_layers: int = 50, input_size: int = 112,
               released: bool = False):
    super().__init__()
    if num_layers not in IR_UNITS:
      raise ValueError(f"num_layers must be one of {sorted(IR_UNITS)}")
    self.released = released
    self.input_layer = nn.Sequential(
        nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))
    in_channels = 64
    for index, (depth, units) in enumerate(
        zip(STAGE_DEPTHS, IR_UNITS[num_layers]), start=1):
      setattr(self, f"block{index}", _stage(in_channels, depth, units))
      in_channels = depth
    flat = 512 * (input_size // 16) ** 2
    if released:
      self.output_layer = nn.Sequential(
          nn.BatchNorm2d(512), nn.Flatten(), nn.Dropout(0.4),
          nn.Linear(flat, 512), nn.BatchNorm1d(512))
      self.output_layer[4].weight.requires_grad_(False)
    else:
      self.output_layer = nn.Sequential(
          nn.BatchNorm2d(512), nn.Dropout(0.5), nn.Flatten(),
          nn.Linear(flat, 512), nn.BatchNorm1d(512))
    self.fsm = FeatureAttention(version=2 if released else 1)
    self._init_weights()

  def _init_weights(self):
    for module in self.modules():
      if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
          nn.init.zeros_(module.bias)

  def forward(self, image: torch.Tensor) -> BackboneOutput:
    x1 = self.input_layer(image)
    x2 = self.block1(x1)
    x3 = self.block2(x2)
    x4 = self.block3(x3)
    x5 = self.block4(x4)
    x_id, x_age = self.fsm(x5)
    embedding = self.output_layer(x_id)
    if self.released:
      embedding = F.normalize(embedding, dim=1)
    return BackboneOutput(embedding, x_id, x_age, x1, x2, x3, x4, x5)


class AgeEstimator(nn.Module):
  """Age estimation module: 101 age logits, group logits, expected (DEX) age.

  ``with_expectation_buffer=True`` adds the released model's ``expectation``
  buffer (0..100), registered first as in its state_dict.
  """

  def __init__(self, age_groups: int = 7, input_size: int = 112,
               with_expectation_buffer: bool = False):
    super().__init__()
    if with_expectation_buffer:
      self.register_buffer(
          "expectation", torch.arange(NUM_AGE_CLASSES, dtype=torch.float32))
    else:
      self.expectation = None
    self.age_output_layer = nn.Sequential(
        nn.BatchNorm2d(512), nn.Flatten(),
        nn.Linear(512 * (input_size // 16) ** 2, 512), nn.ReLU(),
        nn.Linear(512, NUM_AGE_CLASSES))
    self.group_output_layer = nn.Linear(NUM_AGE_CLASSES, age_groups)

  def forward(self, x_age: torch.Tensor) -> AgeOutput:
    logits = self.age_output_layer(x_age)
    groups = self.group_output_layer(logits)
    ages = self.expectation
    if ages is None:
      ages = torch.arange(NUM_AGE_CLASSES, dtype=logits.dtype,
                          device=logits.device)
    expected = (F.softmax(logits, dim=1) * ages[None, :]).sum(dim=1)
    return AgeOutput(logits, groups, expected)


class CosFace(nn.Module):
  """CosFace head: s * (cos - m * onehot), or plain cosine without labels."""

  def __init__(self, num_classes: int, embedding_dim: int = 512,
               scale: float = 64.0, margin: float = 0.35):
    super().__init__()
    self.scale, self.margin = scale, margin
    self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
    nn.init.xavier_uniform_(self.weight)

  def forward(self, embedding: torch.Tensor,
              labels: torch.Tensor | None = None) -> torch.Tensor:
    cosine = F.linear(F.normalize(embedding), F.normalize(self.weight))
    if labels is None:
      return cosine
    onehot = F.one_hot(labels.long(), cosine.shape[1]).to(cosine.dtype)
    return self.scale * (cosine - self.margin * onehot)


def router_mask(age_groups: int, unit_count: int, sigma: float) -> torch.Tensor:
  """The task router's 0/1 mask (G, C) with overlapping channel windows."""
  channels = int((age_groups - (age_groups - 1) * sigma) * unit_count)
  mask = torch.zeros(age_groups, channels)
  start = 0
  for group in range(age_groups):
    mask[group, start:start + unit_count] = 1
    start = int(start + (1 - sigma) * unit_count)
  return mask


class TaskRouter(nn.Module):
  """Multiplies each sample's feature map by its target group's mask row."""

  def __init__(self, age_groups: int, unit_count: int, sigma: float):
    super().__init__()
    self.register_buffer("_unit_mapping",
                         router_mask(age_groups, unit_count, sigma))

  def forward(self, x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    mask = self._unit_mapping.index_select(0, groups.long())
    return x * mask[:, :, None, None]


class ConditionalBlock(nn.Module):
  """Identity conditional block: routed conv-BN twice, PReLU, residual."""

  def __init__(self, channels: int, age_groups: int, unit_count: int,
               sigma: float):
    super().__init__()
    self.conv1 = nn.Sequential(nn.Conv2d(channels, channels, 3, 1, 1),
                               nn.BatchNorm2d(channels))
    self.router1 = TaskRouter(age_groups, unit_count, sigma)
    self.conv2 = nn.Sequential(nn.Conv2d(channels, channels, 3, 1, 1),
                               nn.BatchNorm2d(channels))
    self.router2 = TaskRouter(age_groups, unit_count, sigma)
    self.relu1 = nn.PReLU(channels)
    self.relu2 = nn.PReLU(channels)

  def forward(self, x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    h = self.relu1(self.router1(self.conv1(x), groups))
    h = self.router2(self.conv2(h), groups)
    return self.relu2(x + h)


def _pre_activation_convs(in_channels: int, out_channels: int) -> nn.Sequential:
  return nn.Sequential(
      nn.BatchNorm2d(in_channels), nn.PReLU(in_channels),
      nn.Conv2d(in_channels, out_channels, 3, padding=1),
      nn.BatchNorm2d(out_channels), nn.PReLU(out_channels),
      nn.Conv2d(out_channels, out_channels, 3, padding=1))


class UpsampleBlock(nn.Module):
  """Decoder block: optional 2x bilinear upsample, skip concat, two residuals."""

  def __init__(self, x_channels: int, in_channels: int, out_channels: int):
    super().__init__()
    self.conv = _pre_activation_convs(in_channels, out_channels)
    self.conv2 = _pre_activation_convs(out_channels, out_channels)
    self.shortcut = nn.Conv2d(x_channels, out_channels, 1)

  def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    if x.shape[2] < skip.shape[2]:
      x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    p = self.conv(torch.cat([x, skip], dim=1)) + self.shortcut(x)
    return p + self.conv2(p)


class AgingModule(nn.Module):
  """CVPR face age synthesis generator: ICM (router + 4 blocks) and decoder."""

  def __init__(self, age_groups: int = 7, unit_count: int = 128,
               sigma: float = 0.1, num_blocks: int = 4):
    super().__init__()
    channels = int((age_groups - (age_groups - 1) * sigma) * unit_count)
    self.conv1 = nn.Sequential(nn.Conv2d(512, channels, 1),
                               nn.BatchNorm2d(channels), nn.PReLU(channels))
    self.router = TaskRouter(age_groups, unit_count, sigma)
    self.transform = nn.ModuleList(
        ConditionalBlock(channels, age_groups, unit_count, sigma)
        for _ in range(num_blocks))
    self.conv2 = nn.Sequential(nn.Conv2d(channels, 512, 1),
                               nn.BatchNorm2d(512), nn.PReLU(512))
    self.up_1 = UpsampleBlock(512, 512 + 256, 256)
    self.up_2 = UpsampleBlock(256, 256 + 128, 128)
    self.up_3 = UpsampleBlock(128, 128 + 64, 64)
    self.up_4 = UpsampleBlock(64, 64 + 3, 32)
    self.conv3 = nn.Conv2d(32, 3, 1)
    for module in self.modules():
      if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.01)
        nn.init.zeros_(module.bias)

  def forward(self, image: torch.Tensor, x2: torch.Tensor, x3: torch.Tensor,
              x4: torch.Tensor, x_id: torch.Tensor,
              target_group: torch.Tensor) -> torch.Tensor:
    x = self.router(self.conv1(x_id), target_group)
    for block in self.transform:
      x = block(x, target_group)
    x = self.conv2(x)
    x = self.up_1(x, x4)
    x = self.up_2(x, x3)
    x = self.up_3(x, x2)
    x = self.up_4(x, image)
    return image + self.conv3(x)


class PatchDiscriminator(nn.Module):
  """Spectral-norm patch discriminator conditioned on the one-hot age group."""

  def __init__(self, age_groups: int = 7, width: int = 64):
    super().__init__()
    self.age_groups = age_groups
    sn = nn.utils.spectral_norm
    self.conv1 = nn.Conv2d(3, width, 4, 2, 1)
    self.main = nn.Sequential(
        sn(nn.Conv2d(width + age_groups, width * 2, 4, 2, 1)), nn.LeakyReLU(0.2),
        sn(nn.Conv2d(width * 2, width * 4, 4, 2, 1)), nn.LeakyReLU(0.2),
        sn(nn.Conv2d(width * 4, width * 8, 4, 2, 1)), nn.LeakyReLU(0.2),
        sn(nn.Conv2d(width * 8, width * 8, 4, 1, 1)), nn.LeakyReLU(0.2),
        nn.Conv2d(width * 8, 1, 4, 1, 1))

  def forward(self, image: torch.Tensor,
              target_group: torch.Tensor) -> torch.Tensor:
    x = F.leaky_relu(self.conv1(image), 0.2)
    onehot = F.one_hot(target_group.long(), self.age_groups).to(x.dtype)
    condition = onehot[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3])
    return self.main(torch.cat([x, condition], dim=1))


class TPAMIRecognitionModel(nn.Module):
  """Recognition + age path of the released TPAMI model (keys encoder.*, age_estimator.*)."""

  def __init__(self, age_groups: int = 7, input_size: int = 112):
    super().__init__()
    self.encoder = IRBackbone(50, input_size, released=True)
    self.age_estimator = AgeEstimator(age_groups, input_size,
                                      with_expectation_buffer=True)

  def forward(self, image: torch.Tensor) -> tuple[BackboneOutput, AgeOutput]:
    features = self.encoder(image)
    return features, self.age_estimator(features.x_age)

  def encode(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                 torch.Tensor]:
    """Flip-averaged inference as in the released model.

    Args:
      image: (N, 3, H, W) in [-1, 1].

    Returns:
      (L2-normalized embedding of e(x) + e(flip x), mean expected age,
      mean group logits).
    """
    plain, plain_age = self(image)
    flipped, flipped_age = self(torch.flip(image, dims=(3,)))
    embedding = F.normalize(plain.embedding + flipped.embedding, dim=1)
    age = 0.5 * (plain_age.expected_age + flipped_age.expected_age)
    groups = 0.5 * (plain_age.group_logits + flipped_age.group_logits)
    return embedding, age, groups


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
  """Fills weights and BN statistics with random values, for parity tests.

  Conv/Linear weights get N(0, 1/fan_in) so that every layer (also the
  generator, whose own init N(0, 0.01) would leave its residual image tiny)
  contributes visibly to the outputs. BatchNorm scales/running variances stay
  near 1 and PReLU slopes in [0, 0.5]. Frozen parameters (the released
  BatchNorm1d scale) and structural buffers (router masks, ``expectation``)
  keep their values. Spectral-norm ``u``/``v`` are set to the converged power
  iteration (the top singular vectors) of the new weights, so that the stored
  estimate is meaningful in eval mode.

  Args:
    module: the module to modify in place.
    seed: torch RNG seed.

  Returns:
    ``module``.
  """
  generator = torch.Generator().manual_seed(seed)

  def uniform(t, low, high):
    t.uniform_(low, high, generator=generator)

  for sub in module.modules():
    if isinstance(sub, nn.modules.batchnorm._BatchNorm):
      if sub.weight.requires_grad:
        uniform(sub.weight, 0.5, 1.5)
      uniform(sub.bias, -0.2, 0.2)
      uniform(sub.running_mean, -0.2, 0.2)
      uniform(sub.running_var, 0.5, 1.5)
    elif isinstance(sub, nn.PReLU):
      uniform(sub.weight, 0.0, 0.5)
    elif isinstance(sub, (nn.Conv2d, nn.Linear)):
      _randomize_affine(sub, generator)
  for sub in module.modules():
    if isinstance(sub, CosFace):
      sub.weight.normal_(generator=generator)
  return module


@torch.no_grad()
def calibrate_batchnorm_(module: nn.Module, *inputs: torch.Tensor,
                         min_samples: int = 32) -> nn.Module:
  """Sets BatchNorm running statistics to those of one forward pass.

  Random weights make activations grow through the 24 IR units and saturate
  the attention sigmoids, which no trained network does and which amplifies
  rounding differences. A data-dependent init fixes that: after this, each
  BatchNorm normalises what it actually receives, as in a trained model.
  BatchNorms that saw fewer than ``min_samples`` values per channel (the 1x1
  channel attention, BatchNorm1d on a small batch) keep their previous
  statistics: a variance from two samples can be near zero and would blow up
  whatever differs. Dropout stays off during the pass.

  Args:
    module: the module to calibrate (left in eval mode).
    *inputs: arguments for one ``module(*inputs)`` call.
    min_samples: fewest values per channel for a BatchNorm to be calibrated.

  Returns:
    ``module``.
  """
  norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
  saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone()) for m in norms]
  samples = {}
  hooks = [norm.register_forward_pre_hook(
      lambda m, args: samples.__setitem__(m, args[0].numel() // args[0].shape[1]))
           for norm in norms]
  for norm in norms:
    norm.reset_running_stats()
    norm.momentum = None  # Cumulative average: after one pass, the batch statistics.
  module.train()
  for sub in module.modules():
    if isinstance(sub, nn.Dropout):
      sub.eval()
  try:
    module(*inputs)
  finally:
    for hook in hooks:
      hook.remove()
  for norm, (momentum, mean, var) in zip(norms, saved):
    norm.momentum = momentum
    if samples.get(norm, 0) < min_samples:
      norm.running_mean.copy_(mean)
      norm.running_var.copy_(var)
  return module.eval()


def top_singular_vectors(matrix: torch.Tensor) -> tuple[torch.Tensor,
                                                       torch.Tensor]:
  """The converged power-iteration state (u, v) of a (rows, cols) matrix.

  Uses the eigendecomposition of the small Gram matrix in float64, which is much
  faster than an SVD of the wide matrix with CPU LAPACK.

  Args:
    matrix: (rows, cols) float tensor.

  Returns:
    Unit vectors u (rows,) and v (cols,) with u . (matrix v) = top singular value.
  """
  gram = (matrix @ matrix.t()).double()
  _, vectors = torch.linalg.eigh(gram)
  u = vectors[:, -1].to(matrix.dtype)
  v = F.normalize(matrix.t() @ u, dim=0)
  return u, v


def _randomize_affine(layer: nn.Module, generator: torch.Generator) -> None:
  """Random weight (or ``weight_orig`` under spectral norm) and bias."""
  spectral = hasattr(layer, "weight_orig")
  weight = layer.weight_orig if spectral else layer.weight
  fan_in = weight[0].numel()
  weight.normal_(0.0, fan_in ** -0.5, generator=generator)  # In place: these are big.
  if layer.bias is not None:
    layer.bias.uniform_(-0.1, 0.1, generator=generator)
  if spectral:
    u, v = top_singular_vectors(weight.reshape(weight.shape[0], -1))
    layer.weight_u.copy_(u)
    layer.weight_v.copy_(v)
