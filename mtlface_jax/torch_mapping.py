"""The mapping between Flax variables and PyTorch ``state_dict`` keys.

Every Flax leaf of the MTLFace modules corresponds to exactly one PyTorch tensor
(``tests/fixtures/torch_layouts.json``) through one of a few layout
transforms, so weight conversion is mechanical:

==================  ==========================================  ===========================
transform           PyTorch tensor                              Flax leaf
==================  ==========================================  ===========================
``conv``            Conv2d weight [O, I, kh, kw]                kernel [kh, kw, I, O]
``dense``           Linear weight [O, I]                        kernel [I, O]
``dense_from_1x1``  1x1 Conv2d weight [O, I, 1, 1] on a vector  Dense kernel [I, O]
``dense_nchw``      Linear weight [O, C*H*W] after NCHW flatten kernel [H*W*C, O] (NHWC rows)
``modconv``         StyleGAN2 modulated weight [1, O, I, k, k]  weight [k, k, I, O]
``nhwc``            a [1, C, H, W] tensor (constant input,      [1, H, W, C]
                    ToRGB bias, noise buffers)
``copy``            bias, BN weight/bias/running stats, PReLU   same shape
==================  ==========================================  ===========================

BatchNorm: ``scale``/``bias`` (params) <- ``weight``/``bias``; ``mean``/``var``
(collection ``batch_stats``) <- ``running_mean``/``running_var``;
``num_batches_tracked`` has no counterpart (it only matters for PyTorch's
``momentum=None``). Spectral norm: ``kernel`` <- ``weight_orig`` (conv) and the
power-iteration vectors ``u``/``v`` (collection ``spectral``) <- ``weight_u`` /
``weight_v`` unchanged. The task router's ``_unit_mapping`` buffers are
constants recomputed by :func:`mtlface_jax.models.icm.router_mask`.

The released TPAMI model's ageing branch (:func:`tpami_generator_entries`)
keeps StyleGAN2's stored parameters as they are (the equalized-LR factors are
run-time constants); its ``noises.noise_i`` buffers and ``latent_avg`` go to
the collection ``buffers``; the blur kernels, like the routers' masks, are
constants checked by the converter.

The NHWC flatten order is our choice (it avoids a transpose of the 7x7x512 map
every step); ``dense_nchw`` permutes the Linear rows so outputs are identical.
"""

import dataclasses
from typing import Any, Iterator

import numpy as np

from mtlface_jax.models import iresnet
from mtlface_jax.models import style_encoder
from mtlface_jax.models import stylegan2

FLATTEN_HWC = (7, 7, 512)  # x_id / x_age at 112x112 input.


@dataclasses.dataclass(frozen=True)
class Entry:
  """One Flax leaf <-> one PyTorch tensor."""
  collection: str          # 'params', 'batch_stats' or 'spectral'
  flax_path: tuple[str, ...]
  torch_key: str
  transform: str = "copy"


def _bn(flax_prefix: tuple[str, ...], torch_prefix: str) -> Iterator[Entry]:
  yield Entry("params", flax_prefix + ("scale",), f"{torch_prefix}.weight")
  yield Entry("params", flax_prefix + ("bias",), f"{torch_prefix}.bias")
  yield Entry("batch_stats", flax_prefix + ("mean",), f"{torch_prefix}.running_mean")
  yield Entry("batch_stats", flax_prefix + ("var",), f"{torch_prefix}.running_var")


def _conv(flax_prefix, torch_prefix, bias=False, transform="conv") -> Iterator[Entry]:
  yield Entry("params", flax_prefix + ("kernel",), f"{torch_prefix}.weight", transform)
  if bias:
    yield Entry("params", flax_prefix + ("bias",), f"{torch_prefix}.bias")


def _prelu(flax_prefix, torch_prefix) -> Iterator[Entry]:
  yield Entry("params", flax_prefix + ("slope",), f"{torch_prefix}.weight")


def encoder_entries(num_layers: int = 50, prefix: str = "") -> list[Entry]:
  """Entries of :class:`~mtlface_jax.models.iresnet.Encoder` (both AFD versions).

  Args:
    num_layers: IR depth (34, 50, 64, 101).
    prefix: PyTorch key prefix, e.g. ``'encoder.'`` for the TPAMI checkpoint.

  Returns:
    The list of entries.
  """
  p = prefix
  out = [*_conv(("trunk", "input_conv"), f"{p}input_layer.0"),
         *_bn(("trunk", "input_bn"), f"{p}input_layer.1"),
         *_prelu(("trunk", "input_prelu"), f"{p}input_layer.2")]
  in_depth = 64
  for stage, (depth, units) in enumerate(zip(iresnet.STAGE_DEPTHS,
                                             iresnet.UNITS_PER_STAGE[num_layers])):
    for unit in range(units):
      f = ("trunk", f"block{stage + 1}_{unit}")
      t = f"{p}block{stage + 1}.{unit}"
      out += [*_bn(f + ("bn1",), f"{t}.res_layer.0"), *_conv(f + ("conv1",), f"{t}.res_layer.1"),
              *_bn(f + ("bn2",), f"{t}.res_layer.2"), *_prelu(f + ("prelu",), f"{t}.res_layer.3"),
              *_conv(f + ("conv2",), f"{t}.res_layer.4"), *_bn(f + ("bn3",), f"{t}.res_layer.5")]
      if unit == 0 and in_depth != depth:
        out += [*_conv(f + ("shortcut_conv",), f"{t}.shortcut_layer.0"),
                *_bn(f + ("shortcut_bn",), f"{t}.shortcut_layer.1")]
    in_depth = depth
  out += [*_conv(("fsm", "channel", "fc1"), f"{p}fsm.channel.0", transform="dense_from_1x1"),
          *_conv(("fsm", "channel", "fc2"), f"{p}fsm.channel.2", transform="dense_from_1x1"),
          *_bn(("fsm", "channel", "bn"), f"{p}fsm.channel.3"),
          *_conv(("fsm", "spatial", "conv"), f"{p}fsm.spatial.0"),
          *_bn(("fsm", "spatial", "bn"), f"{p}fsm.spatial.1"),
          *_bn(("output_layer", "bn_in"), f"{p}output_layer.0"),
          *_conv(("output_layer", "fc"), f"{p}output_layer.3", bias=True, transform="dense_nchw"),
          *_bn(("output_layer", "bn_out"), f"{p}output_layer.4")]
  return out


def age_estimator_entries(prefix: str = "") -> list[Entry]:
  """Entries of :class:`~mtlface_jax.models.heads.AgeEstimator`."""
  p = prefix
  return [*_bn(("bn",), f"{p}age_output_layer.0"),
          *_conv(("fc1",), f"{p}age_output_layer.2", bias=True, transform="dense_nchw"),
          *_conv(("fc2",), f"{p}age_output_layer.4", bias=True, transform="dense"),
          *_conv(("group_fc",), f"{p}group_output_layer", bias=True, transform="dense")]


def cosface_entries(prefix: str = "") -> list[Entry]:
  """Entries of :class:`~mtlface_jax.models.heads.CosFace` (weight is [classes, 512])."""
  return [Entry("params", ("kernel",), f"{prefix}weight", "dense")]


def _conv_stack(f, t) -> list[Entry]:
  return [*_bn(f + ("bn1",), f"{t}.0"), *_prelu(f + ("prelu1",), f"{t}.1"),
          *_conv(f + ("conv1",), f"{t}.2", bias=True), *_bn(f + ("bn2",), f"{t}.3"),
          *_prelu(f + ("prelu2",), f"{t}.4"), *_conv(f + ("conv2",), f"{t}.5", bias=True)]


def generator_entries(num_blocks: int = 4, prefix: str = "") -> list[Entry]:
  """Entries of :class:`~mtlface_jax.models.generator.Generator` (ICM + decoder)."""
  p = prefix
  out = []
  for name in ("conv1", "conv2"):
    f = ("icm",)
    out += [*_conv(f + (f"{name}_conv",), f"{p}{name}.0", bias=True),
            *_bn(f + (f"{name}_bn",), f"{p}{name}.1"), *_prelu(f + (f"{name}_prelu",), f"{p}{name}.2")]
  for i in range(num_blocks):
    f, t = ("icm", f"block{i}"), f"{p}transform.{i}"
    out += [*_conv(f + ("conv1",), f"{t}.conv1.0", bias=True), *_bn(f + ("bn1",), f"{t}.conv1.1"),
            *_conv(f + ("conv2",), f"{t}.conv2.0", bias=True), *_bn(f + ("bn2",), f"{t}.conv2.1"),
            *_prelu(f + ("prelu1",), f"{t}.relu1"), *_prelu(f + ("prelu2",), f"{t}.relu2")]
  for i in range(1, 5):
    f, t = ("decoder", f"up{i}"), f"{p}up_{i}"
    out += [*_conv_stack(f + ("conv_a",), f"{t}.conv"), *_conv_stack(f + ("conv_b",), f"{t}.conv2"),
            *_conv(f + ("shortcut",), f"{t}.shortcut", bias=True)]
  out += [*_conv(("decoder", "to_rgb"), f"{p}conv3", bias=True)]
  return out


def discriminator_entries(prefix: str = "") -> list[Entry]:
  """Entries of :class:`~mtlface_jax.models.discriminator.PatchDiscriminator`."""
  p = prefix
  out = [*_conv(("conv1",), f"{p}conv1", bias=True)]
  for i in range(4):
    f, t = (f"sn_conv{i + 1}",), f"{p}main.{2 * i}"
    out += [Entry("params", f + ("kernel",), f"{t}.weight_orig", "conv"),
            Entry("params", f + ("bias",), f"{t}.bias"),
            Entry("spectral", f + ("u",), f"{t}.weight_u"),
            Entry("spectral", f + ("v",), f"{t}.weight_v")]
  out += [*_conv(("conv_out",), f"{p}main.8", bias=True)]
  return out


def _icm_v2(f, t, num_blocks=4) -> list[Entry]:
  out = [*_conv(f + ("conv1",), f"{t}.conv1.0", bias=True)]
  for i in range(num_blocks):
    out += [*_conv(f + (f"block{i}", "conv1"), f"{t}.transform.{i}.conv1.0", bias=True),
            *_conv(f + (f"block{i}", "conv2"), f"{t}.transform.{i}.conv2.0", bias=True)]
  return out + [*_conv(f + ("conv2",), f"{t}.conv2.0", bias=True)]


def _upsample_v2(f, t) -> list[Entry]:
  return [*_conv(f + ("conv_a_conv1",), f"{t}.conv.2", bias=True),
          *_conv(f + ("conv_a_conv2",), f"{t}.conv.5", bias=True),
          *_conv(f + ("conv_b_conv1",), f"{t}.conv2.2", bias=True),
          *_conv(f + ("conv_b_conv2",), f"{t}.conv2.5", bias=True),
          *_conv(f + ("shortcut",), f"{t}.shortcut", bias=True)]


def style_path_entries(image_size: int = 112, prefix: str = "encoder.") -> list[Entry]:
  """Entries of :class:`~mtlface_jax.models.style_encoder.StyleEncoder` (231 minus 15 routers).

  Style block j has ``int(log2 spatial)`` convs at PyTorch indices 0, 2, 4, ...
  (spatial 7, 14 and 56 px for the coarse, middle and fine latents of a 112 px face).
  """
  p, f = prefix, ("style_encoder",)
  out = []
  for j in range(style_encoder.num_styles(image_size)):
    divisor = (16 if j < style_encoder.COARSE_END else
               8 if j < style_encoder.MIDDLE_END else 2)
    convs = int(np.log2(image_size // divisor))
    for i in range(convs):
      out += _conv(f + (f"styles_{j}", f"conv{i}"), f"{p}styles.{j}.convs.{2 * i}", bias=True)
    out += _conv(f + (f"styles_{j}", "linear"), f"{p}styles.{j}.linear", bias=True,
                 transform="dense")
  for k in (1, 2, 3):
    out += _icm_v2(f + (f"aging{k}",), f"{p}aging{k}")
    out += _upsample_v2(f + (f"upsample{k}",), f"{p}upsample{k}")
  for k in (1, 2):
    out += _conv(f + (f"latlayer{k}",), f"{p}latlayer{k}", bias=True)
  return out


def _modconv(f, t) -> list[Entry]:
  return [Entry("params", f + ("weight",), f"{t}.weight", "modconv"),
          *_conv(f + ("modulation",), f"{t}.modulation", bias=True, transform="dense")]


def _styled_conv(f, t) -> list[Entry]:
  return [*_modconv(f + ("conv",), f"{t}.conv"),
          Entry("params", f + ("noise", "weight"), f"{t}.noise.weight"),
          Entry("params", f + ("activate", "bias"), f"{t}.activate.bias")]


def _to_rgb(f, t) -> list[Entry]:
  return [*_modconv(f + ("conv",), f"{t}.conv"),
          Entry("params", f + ("bias",), f"{t}.bias", "nhwc")]


def stylegan2_decoder_entries(size: int = 128, mapping_layers: int = 8,
                              prefix: str = "decoder.") -> list[Entry]:
  """Entries of :class:`~mtlface_jax.models.tpami_generator.StyleGAN2Decoder`.

  The released ``Decoder`` holds ``latent_avg`` and the generator under
  ``decoder.decoder``; blur/upsample ``kernel`` buffers are not entries (they
  are constants, see ``stylegan2_kernel_keys``).
  """
  p, f = prefix, ("decoder",)
  g, s = f"{p}decoder", f + ("synthesis",)
  out = [Entry("buffers", f + ("latent_avg",), f"{p}latent_avg")]
  for i in range(1, mapping_layers + 1):
    out += _conv(f + ("mapping", f"dense{i}"), f"{g}.style.{i}", bias=True, transform="dense")
  out += [Entry("params", s + ("input", "input"), f"{g}.input.input", "nhwc"),
          *_styled_conv(s + ("conv1",), f"{g}.conv1"), *_to_rgb(s + ("to_rgb1",), f"{g}.to_rgb1")]
  levels = int(np.log2(size)) - 2
  for j in range(2 * levels):
    out += _styled_conv(s + (f"convs_{j}",), f"{g}.convs.{j}")
  for j in range(levels):
    out += _to_rgb(s + (f"to_rgbs_{j}",), f"{g}.to_rgbs.{j}")
  for i in range(stylegan2.num_noise_layers(size)):
    out.append(Entry("buffers", s + (f"noise_{i}",), f"{g}.noises.noise_{i}", "nhwc"))
  return out


def stylegan2_kernel_keys(size: int = 128, prefix: str = "decoder.") -> dict[str, float]:
  """PyTorch keys of the FIR kernel buffers -> their gain (all 4 = factor ** 2)."""
  g, levels = f"{prefix}decoder", int(np.log2(size)) - 2
  keys = {f"{g}.convs.{2 * j}.conv.blur.kernel": 4.0 for j in range(levels)}
  keys.update({f"{g}.to_rgbs.{j}.upsample.kernel": 4.0 for j in range(levels)})
  return keys


def tpami_generator_entries(image_size: int = 112, mapping_layers: int = 8) -> list[Entry]:
  """Entries of :class:`~mtlface_jax.models.tpami_generator.TPAMIGenerator`.

  The released file's ageing branch: the style path under ``encoder.`` and the
  decoder under ``decoder.`` (keys carry these prefixes).
  """
  size = 2 ** int(np.ceil(np.log2(image_size)))
  return style_path_entries(image_size) + stylegan2_decoder_entries(size, mapping_layers)


# --- layout transforms -------------------------------------------------------

def torch_to_flax(value: np.ndarray, transform: str) -> np.ndarray:
  """Converts one PyTorch tensor (as NumPy) to its Flax layout."""
  value = np.asarray(value)
  if transform == "copy":
    return value
  if transform == "conv":
    return np.transpose(value, (2, 3, 1, 0))
  if transform == "dense":
    return np.transpose(value)
  if transform == "dense_from_1x1":
    return np.transpose(value.reshape(value.shape[0], value.shape[1]))
  if transform == "dense_nchw":
    h, w, c = FLATTEN_HWC
    return value.reshape(value.shape[0], c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, -1)
  if transform == "modconv":
    return np.transpose(value[0], (2, 3, 1, 0))
  if transform == "nhwc":
    return np.transpose(value, (0, 2, 3, 1))
  raise ValueError(f"unknown transform {transform!r}")


def flax_to_torch(value: np.ndarray, transform: str) -> np.ndarray:
  """Inverse of :func:`torch_to_flax` (for exporting back to PyTorch)."""
  value = np.asarray(value)
  if transform == "copy":
    return value
  if transform == "conv":
    return np.transpose(value, (3, 2, 0, 1))
  if transform == "dense":
    return np.transpose(value)
  if transform == "dense_from_1x1":
    return np.transpose(value)[:, :, None, None]
  if transform == "dense_nchw":
    h, w, c = FLATTEN_HWC
    return value.reshape(h, w, c, -1).transpose(3, 2, 0, 1).reshape(value.shape[-1], -1)
  if transform == "modconv":
    return np.transpose(value, (3, 2, 0, 1))[None]
  if transform == "nhwc":
    return np.transpose(value, (0, 3, 1, 2))
  raise ValueError(f"unknown transform {transform!r}")


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def state_dict_to_variables(state_dict: dict[str, np.ndarray], entries: list[Entry]) -> dict:
  """Builds Flax variable collections from a PyTorch state dict.

  Args:
    state_dict: PyTorch key -> NumPy array (already stripped of any prefix the
      entries do not carry).
    entries: from one of the ``*_entries`` functions.

  Returns:
    ``{'params': ..., 'batch_stats': ..., ...}`` nested dicts of NumPy arrays.

  Raises:
    KeyError: naming every PyTorch key the entries need but ``state_dict`` lacks.
  """
  missing = [e.torch_key for e in entries if e.torch_key not in state_dict]
  if missing:
    raise KeyError(f"missing PyTorch keys: {', '.join(missing)}")
  variables: dict = {}
  for e in entries:
    _set(variables.setdefault(e.collection, {}), e.flax_path,
         torch_to_flax(state_dict[e.torch_key], e.transform))
  return variables


def variables_to_state_dict(variables: dict, entries: list[Entry]) -> dict[str, np.ndarray]:
  """Inverse of :func:`state_dict_to_variables`."""
  return {e.torch_key: flax_to_torch(np.asarray(_get(variables[e.collection], e.flax_path)),
                                     e.transform)
          for e in entries}
