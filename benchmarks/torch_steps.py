"""The PyTorch reference MTLFace steps, for timing beside the JAX ones.

Built from ``tests/torch_reference/mtlface_torch.py`` (the PyTorch port whose
parity with the original is tested) and written the way the original training
code runs them:

  aifr   encoder + CosFace + age estimator on x_age + adversarial age estimator
         on GRL(x_id); SGD with momentum (weight decay on conv/linear weights
         and PReLU slopes of encoder, head and age estimator).
  fas    encoder and age estimator frozen (eval); generator forward; the
         discriminator's LSGAN update on real targets and detached fakes; then
         the generator's update (75 LSGAN + 0.002 identity MSE + 10 age CE)
         against the updated discriminator; Adam for both.
  infer  flip-averaged embedding: the encoder on x and its mirror in one
         batch, summed and L2-normalised (as ``mtlface_jax.predict.embed``).

Configurations (``CONFIGS``):

  amp_eager              autocast fp16 + GradScaler on CUDA (bf16 or float32 on a CPU)
  channels_last          the same with NHWC memory format for modules and inputs
  channels_last_compile  the same under ``torch.compile`` (default mode)

On CUDA the optimizers are the fused ones where this torch has them (the
fastest PyTorch configuration is the fair comparison); ``cudnn.benchmark`` is on.
"""

import statistics
import time
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from tests.torch_reference import mtlface_torch as mt

CONFIGS = ("amp_eager", "channels_last", "channels_last_compile")
DECAYED_TYPES = (nn.Conv2d, nn.Linear, nn.PReLU)


class _GradientReversal(torch.autograd.Function):
  """Identity forward, gradient times -coefficient backward."""

  @staticmethod
  def forward(ctx, x, coefficient):  # pylint: disable=arguments-differ
    ctx.coefficient = coefficient
    return x.view_as(x)

  @staticmethod
  def backward(ctx, grad):  # pylint: disable=arguments-differ
    return -ctx.coefficient * grad, None


class Setup:
  """Device, dtype and memory format of one configuration."""

  def __init__(self, config_name: str, device: str, cpu_amp: str = "float32"):
    if config_name not in CONFIGS:
      raise ValueError(f"unknown torch configuration {config_name!r}; one of {CONFIGS}")
    self.name = config_name
    self.device = torch.device(device)
    self.cuda = self.device.type == "cuda"
    amp = "float16" if self.cuda else cpu_amp
    self.amp_dtype = None if amp == "float32" else getattr(torch, amp)
    self.channels_last = config_name != "amp_eager"
    self.compile = config_name.endswith("_compile")
    self.scaler = torch.amp.GradScaler("cuda") if self.cuda else None

  def autocast(self):
    return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                          enabled=self.amp_dtype is not None)

  def module(self, module: nn.Module) -> nn.Module:
    module = module.to(self.device)
    if self.channels_last:
      module = module.to(memory_format=torch.channels_last)
    return module

  def wrap(self, module: nn.Module) -> Callable:
    return torch.compile(module) if self.compile else module

  def images(self, array: np.ndarray) -> torch.Tensor:
    """NHWC float32 NumPy -> NCHW tensor on the device, in this memory format."""
    x = torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2))).to(self.device)
    return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

  def backward_and_step(self, loss: torch.Tensor, optimizer) -> None:
    optimizer.zero_grad(set_to_none=True)
    if self.scaler is None:
      loss.backward()
      optimizer.step()
    else:
      self.scaler.scale(loss).backward()
      self.scaler.step(optimizer)

  def describe(self) -> dict:
    return {"config": self.name, "amp_dtype": str(self.amp_dtype or "float32").replace(
        "torch.", ""), "channels_last": self.channels_last, "torch_compile": self.compile,
            "grad_scaler": self.scaler is not None}


def _optimizer(kind: str, groups, cuda: bool, **kwargs):
  """SGD or Adam, fused on CUDA where this torch offers it."""
  cls = torch.optim.SGD if kind == "sgd" else torch.optim.Adam
  if cuda:
    try:
      return cls(groups, fused=True, **kwargs), f"{cls.__name__}(fused=True)"
    except (RuntimeError, TypeError, ValueError):
      pass
  return cls(groups, **kwargs), f"{cls.__name__}(foreach default)"


def _decay_groups(modules, weight_decay: float) -> list[dict]:
  """Conv/linear weights and PReLU slopes decayed, everything else not."""
  decayed, plain = [], []
  for module in modules:
    for sub in module.modules():
      for name, param in sub.named_parameters(recurse=False):
        (decayed if isinstance(sub, DECAYED_TYPES) and name == "weight" else plain).append(param)
  return [{"params": decayed, "weight_decay": weight_decay},
          {"params": plain, "weight_decay": 0.0}]


# The modules each task's step uses (building the others would only cost time).
TASK_MODULES = {"aifr": ("encoder", "head", "age", "da_age"),
                "fas": ("encoder", "age", "generator", "discriminator"),
                "infer": ("encoder",)}


def build_models(config, setup: Setup, num_layers: int, task: str) -> dict[str, nn.Module]:
  """The reference modules of ``task``, sized from a JAX training config."""
  size, groups = config.image_size, config.age_group
  builders = {
      "encoder": lambda: mt.IRBackbone(num_layers, size),
      "head": lambda: mt.CosFace(config.model.num_classes, 512, config.head_s, config.head_m),
      "age": lambda: mt.AgeEstimator(groups, size),
      "da_age": lambda: mt.AgeEstimator(groups, size),
      "generator": lambda: mt.AgingModule(groups, config.model.icm_unit_count),
      "discriminator": lambda: mt.PatchDiscriminator(groups,
                                                     config.model.discriminator_features[0]),
  }
  torch.manual_seed(0)
  return {name: setup.module(builders[name]()) for name in TASK_MODULES[task]}


def _age_loss(out: mt.AgeOutput, ages: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
  return (F.mse_loss(out.expected_age.float(), ages)
          + F.cross_entropy(out.group_logits.float(), groups))


def aifr_step_fn(config, setup: Setup, models: dict, batches: list) -> tuple[Callable, dict]:
  """One AIFR training iteration per call; returns (step(i), facts)."""
  names = ("encoder", "head", "age", "da_age")
  for name in names:
    models[name].train()
  encoder, head, age, da_age = (setup.wrap(models[n]) for n in names)
  groups = _decay_groups([models[n] for n in ("encoder", "head", "age")], config.optim.weight_decay)
  groups[1]["params"] += list(models["da_age"].parameters())
  # The JAX step's first iterations run at warm-up learning rates; so does this one.
  lr = config.optim.lr / max(config.optim.warmup, 1)
  optimizer, kind = _optimizer("sgd", groups, setup.cuda, lr=lr, momentum=config.optim.momentum)
  data = [_torch_batch(setup, b) for b in batches]

  def step(i: int) -> None:
    b = data[i % len(data)]
    with setup.autocast():
      out = encoder(b["image"])
      logits = head(out.embedding, b["id"])
      age_out = age(out.x_age)
      da_out = da_age(_GradientReversal.apply(out.x_id, config.grl_coefficient))
      loss = (F.cross_entropy(logits.float(), b["id"])
              + config.fr_age_loss_weight * _age_loss(age_out, b["age"], b["group"])
              + config.fr_da_loss_weight * _age_loss(da_out, b["age"], b["group"]))
    setup.backward_and_step(loss, optimizer)
    if setup.scaler is not None:
      setup.scaler.update()

  return step, {"optimizer": kind}


def fas_step_fn(config, setup: Setup, models: dict, batches: list) -> tuple[Callable, dict]:
  """One FAS iteration (D then G against the updated D) per call."""
  for name in ("encoder", "age"):
    models[name].eval().requires_grad_(False)
  models["generator"].train()
  models["discriminator"].train()
  encoder, age, generator, disc = (setup.wrap(models[n])
                                   for n in ("encoder", "age", "generator", "discriminator"))
  fo = config.fas_optim
  d_opt, kind = _optimizer("adam", models["discriminator"].parameters(), setup.cuda,
                           lr=fo.d_lr, betas=(fo.b1, fo.b2))
  g_opt, _ = _optimizer("adam", models["generator"].parameters(), setup.cuda,
                        lr=fo.g_lr, betas=(fo.b1, fo.b2))
  data = [_torch_batch(setup, b) for b in batches]

  def step(i: int) -> None:
    b = data[i % len(data)]
    target = b["target_group"]
    with torch.no_grad(), setup.autocast():
      source = encoder(b["image"])
    with setup.autocast():
      fake = generator(b["image"], source.x2, source.x3, source.x4, source.x_id, target)
      real_scores, fake_scores = disc(b["target_image"], target), disc(fake.detach(), target)
      d_loss = 0.5 * (((real_scores.float() - 1) ** 2).mean() + (fake_scores.float() ** 2).mean())
    setup.backward_and_step(d_loss, d_opt)
    models["discriminator"].requires_grad_(False)  # G's backward needs only d(fake)
    with setup.autocast():
      scores = disc(fake, target)
      fake_out = encoder(fake)
      group_logits = age(fake_out.x_age).group_logits
      g_loss = (config.fas_gan_loss_weight * 0.5 * ((scores.float() - 1) ** 2).mean()
                + config.fas_id_loss_weight * F.mse_loss(fake_out.x_id.float(),
                                                         source.x_id.float())
                + config.fas_age_loss_weight * F.cross_entropy(group_logits.float(), target))
    setup.backward_and_step(g_loss, g_opt)
    models["discriminator"].requires_grad_(True)
    if setup.scaler is not None:
      setup.scaler.update()

  return step, {"optimizer": kind}


def infer_step_fn(config, setup: Setup, models: dict, batches: list) -> tuple[Callable, dict]:
  """Flip-averaged L2-normalised embeddings of one batch per call."""
  del config
  models["encoder"].eval()
  encoder = setup.wrap(models["encoder"])
  images = [setup.images(b["image"]) for b in batches]

  def step(i: int) -> torch.Tensor:
    x = images[i % len(images)]
    with torch.inference_mode(), setup.autocast():
      views = torch.cat([x, torch.flip(x, dims=(3,))])
      embedding = encoder(views).embedding.float()
      n = x.shape[0]
      return F.normalize(embedding[:n] + embedding[n:], dim=1)

  return step, {}


STEP_FNS = {"aifr": aifr_step_fn, "fas": fas_step_fn, "infer": infer_step_fn}


def _torch_batch(setup: Setup, batch: dict) -> dict:
  """A NumPy batch of the JAX batch contract as device tensors."""
  out = {}
  for key, value in batch.items():
    if key in ("image", "target_image"):
      out[key] = setup.images(value)
    elif value.dtype.kind == "f":
      out[key] = torch.from_numpy(value).to(setup.device)
    else:
      out[key] = torch.from_numpy(value.astype(np.int64)).to(setup.device)
  return out


def synchronize(device: torch.device) -> None:
  if device.type == "cuda":
    torch.cuda.synchronize(device)


def time_steps(step: Callable, device: torch.device, *, warmup: int, steps: int,
               repeats: int) -> dict[str, Any]:
  """Warm-up (compilation included), then the median of ``repeats`` timed blocks."""
  start = time.perf_counter()
  for i in range(max(warmup, 1)):
    step(i)
  synchronize(device)
  warmup_s = time.perf_counter() - start
  per_step = []
  for _ in range(repeats):
    synchronize(device)
    start = time.perf_counter()
    for i in range(steps):
      step(i)
    synchronize(device)
    per_step.append((time.perf_counter() - start) / steps)
  return {"seconds": statistics.median(per_step), "samples": per_step, "warmup_s": warmup_s}


def environment() -> dict:
  """torch, CUDA and cuDNN versions and the device name."""
  env = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
         "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
         "torch_threads": torch.get_num_threads()}
  if torch.cuda.is_available():
    env["torch_device"] = torch.cuda.get_device_name(0)
  return env
