"""Converts PyTorch MTLFace weights to Flax variables and an orbax checkpoint.

Two source layouts (docs/architecture.md sections 1-8 and 10):

* ``cvpr``: the CVPR 2021 training code, one ``state_dict`` file per module as
  its logger saves them (``backbone-<iter>``, ``head-<iter>``,
  ``estimation_network-<iter>``, ``da_discriminator-<iter>``,
  ``generator-<iter>``, ``discriminator-<iter>``), with or without DDP's
  ``module.`` prefix.
* ``tpami``: the released TPAMI 2022 model (``mtlface_checkpoints.tar``), one
  ``state_dict`` with keys ``encoder.*``, ``age_estimator.*`` and
  ``decoder.*``. Every tensor is converted: the recognition path (module
  ``encoder``), the age estimator (``age``) and the ageing branch, i.e. the
  encoder's style path and the StyleGAN2 decoder (``generator``, a
  :class:`~mtlface_jax.models.tpami_generator.TPAMIGenerator`). A file without
  the ageing branch converts to ``encoder`` and ``age`` only.

Files are read without executing pickled code: ``torch.load(weights_only=True)``
when torch is installed, otherwise a restricted reader of PyTorch's zip format
that only rebuilds tensors. Every missing, unexpected or wrongly shaped tensor
is reported by name.

Usage::

  python -m mtlface_jax.convert --layout cvpr --output ckpt/ \\
      --input backbone-36000 --input head-36000 --input estimation_network-36000
  python -m mtlface_jax.convert --layout tpami --input mtlface_checkpoints.tar --output ckpt/

The output directory is a checkpoint of :mod:`mtlface_jax.training.checkpoint`
holding ``{'variables': {module: collections}}`` at step 0, which
``config.init_from`` accepts, plus a JSON ``meta`` describing the conversion.
"""

import argparse
import collections
import dataclasses
import json
import pickle
import re
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np

from mtlface_jax import ages
from mtlface_jax import torch_mapping as tm
from mtlface_jax.models import discriminator
from mtlface_jax.models import generator
from mtlface_jax.models import heads
from mtlface_jax.models import icm
from mtlface_jax.models import icm_v2
from mtlface_jax.models import iresnet
from mtlface_jax.models import spec as spec_lib
from mtlface_jax.models import stylegan2
from mtlface_jax.models import tpami_generator

LAYOUTS = ("cvpr", "tpami")
CVPR_MODULES = ("encoder", "head", "age", "da_age", "generator", "discriminator")
# File-name stems of the reference training code's logger -> our module names.
REFERENCE_FILE_NAMES = {
    "backbone": "encoder", "head": "head", "estimation_network": "age",
    "da_discriminator": "da_age", "generator": "generator",
    "discriminator": "discriminator",
}
# Keys with no Flax counterpart that carry no information we need.
IGNORED_SUFFIXES = ("num_batches_tracked",)
# The released model's ageing branch: the encoder's style path and the StyleGAN2 decoder.
TPAMI_GENERATOR_PREFIXES = ("decoder.", "encoder.styles.", "encoder.upsample",
                            "encoder.latlayer", "encoder.aging")
TPAMI_NO_AGEING_NOTE = ("this file has no ageing branch (no decoder.* or encoder style-path "
                        "tensors): recognition and age estimation only, no face age synthesis")


class ConversionError(ValueError):
  """A checkpoint that cannot be converted; the message names every problem."""


# --- reading PyTorch files without executing pickled code --------------------

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64,
    "HalfStorage": np.float16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "BFloat16Storage": "bfloat16",
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
  name: str


def _rebuild_tensor(storage, offset, size, stride, *unused):
  """Stand-in for ``torch._utils._rebuild_tensor_v2``: a NumPy view, copied."""
  del unused
  itemsize = storage.dtype.itemsize
  view = np.ndarray(tuple(size), storage.dtype, buffer=storage, offset=offset * itemsize,
                    strides=tuple(s * itemsize for s in stride))
  return np.array(view)


def _rebuild_parameter(data, *unused):
  del unused
  return data


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickles a ``state_dict``: only OrderedDicts, tensors and storages.

  Any other global (the way a malicious pickle runs code) is refused.
  """

  def __init__(self, file, load_storage: Callable[[str, str, int], np.ndarray]):
    super().__init__(file)
    self._load_storage = load_storage

  def find_class(self, module: str, name: str) -> Any:
    allowed = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }
    if (module, name) in allowed:
      return allowed[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise pickle.UnpicklingError(f"refusing to load the global {module}.{name}")

  def persistent_load(self, pid: Any) -> np.ndarray:
    if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage"
        or not isinstance(pid[1], _StorageType)):
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
    _, storage_type, key, _, numel = pid
    return self._load_storage(str(key), storage_type.name, int(numel))


def _storage_dtype(name: str) -> np.dtype:
  dtype = _STORAGE_DTYPES[name]
  if dtype == "bfloat16":
    import ml_dtypes  # pylint: disable=g-import-not-at-top  (a JAX dependency)
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(dtype)


def _read_zip(path: Path) -> Any:
  """Reads PyTorch's zip serialization (torch >= 1.6) without torch."""
  if not zipfile.is_zipfile(path):
    raise ConversionError(
        f"{path}: not a zip-format PyTorch file (a legacy torch < 1.6 file?); "
        "install torch (pip install 'mtlface-jax[torch]') to read it")
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pickles) != 1:
      raise ConversionError(f"{path}: expected one data.pkl in the archive, found {len(pickles)}")
    root = pickles[0][:-len("data.pkl")]
    names = set(archive.namelist())
    big_endian = (f"{root}byteorder" in names
                  and archive.read(f"{root}byteorder").strip() == b"big")

    def load_storage(key: str, type_name: str, numel: int) -> np.ndarray:
      dtype = _storage_dtype(type_name)
      raw = archive.read(f"{root}data/{key}")
      if len(raw) != numel * dtype.itemsize:
        raise ConversionError(f"{path}: storage {key} has {len(raw)} bytes, "
                              f"expected {numel} x {dtype.itemsize}")
      array = np.frombuffer(raw, dtype.newbyteorder(">") if big_endian else dtype)
      return array.astype(dtype)

    with archive.open(pickles[0]) as handle:
      return _RestrictedUnpickler(handle, load_storage).load()


def _read_with_torch(path: Path) -> Any:
  import torch  # pylint: disable=g-import-not-at-top  (optional extra)
  loaded = torch.load(path, map_location="cpu", weights_only=True)

  def to_numpy(value):
    if isinstance(value, torch.Tensor):
      value = value.detach()
      if value.is_floating_point() and value.dtype != torch.float64:
        value = value.float()  # NumPy has no bfloat16; float16 widens losslessly.
      return value.numpy().copy()
    if isinstance(value, Mapping):
      return collections.OrderedDict((k, to_numpy(v)) for k, v in value.items())
    return value

  return to_numpy(loaded)


def _torch_available() -> bool:
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def read_state_dict(path: str | Path, reader: str = "auto") -> dict[str, np.ndarray]:
  """Reads a PyTorch ``state_dict`` file as NumPy arrays, never running pickled code.

  Args:
    path: a file written by ``torch.save(module.state_dict(), path)`` (a dict
      holding it under ``'state_dict'`` is unwrapped).
    reader: ``'torch'`` (``torch.load(weights_only=True)``), ``'zip'`` (the
      built-in restricted reader) or ``'auto'`` (torch when installed).

  Returns:
    key -> array, in the file's order.

  Raises:
    FileNotFoundError: if ``path`` does not exist.
    ConversionError: if the file is not a readable tensor dict, or holds
      anything but tensors (e.g. code in the pickle).
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"PyTorch file not found: {path}")
  if reader == "auto":
    reader = "torch" if _torch_available() else "zip"
  if reader not in ("torch", "zip"):
    raise ValueError(f"reader must be 'auto', 'torch' or 'zip', got {reader!r}")
  try:
    loaded = _read_with_torch(path) if reader == "torch" else _read_zip(path)
  except ConversionError:
    raise
  except Exception as error:  # pylint: disable=broad-except  (torch raises many kinds)
    raise ConversionError(f"{path}: cannot be read safely as PyTorch weights "
                          f"({type(error).__name__}: {error})") from error
  if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
    loaded = loaded["state_dict"]
  if not isinstance(loaded, Mapping):
    raise ConversionError(f"{path}: holds a {type(loaded).__name__}, not a state_dict")
  bad = [str(k) for k, v in loaded.items()
         if not isinstance(k, str) or not isinstance(v, np.ndarray)]
  if bad:
    raise ConversionError(f"{path}: entries that are not tensors: {', '.join(bad)}")
  return dict(loaded)


def strip_ddp_prefix(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Removes DistributedDataParallel's leading ``module.`` from every key."""
  return {(k[len("module."):] if k.startswith("module.") else k): v
          for k, v in state_dict.items()}


# --- module specifications ---------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ModuleSpec:
  """How one Flax module is filled from (a prefixed part of) a state_dict.

  Attributes:
    name: our module name (a key of the training state's ``variables``).
    module: the Flax module the variables are for.
    init_inputs: abstract inputs (``jax.ShapeDtypeStruct``) for ``module.init``.
    entries: Flax leaf <-> PyTorch key pairs (keys without ``prefix``).
    constants: PyTorch buffers that must hold fixed values (router masks, the
      DEX ages); a different value means a model we do not reproduce.
    prefix: the PyTorch key prefix of this module inside its file.
  """
  name: str
  module: Any
  init_inputs: tuple
  entries: tuple
  constants: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
  prefix: str = ""

  def flax_shapes(self) -> dict[tuple[str, tuple[str, ...]], tuple[int, ...]]:
    """(collection, path) -> shape, from ``jax.eval_shape`` (nothing allocated)."""
    key = jax.random.PRNGKey(0)
    # Only the arrays are traced; flags such as ``train`` stay Python values.
    traced = [i for i, x in enumerate(self.init_inputs) if isinstance(x, jax.ShapeDtypeStruct)]

    def init(*arrays):
      inputs = list(self.init_inputs)
      for index, array in zip(traced, arrays):
        inputs[index] = array
      return self.module.init({"params": key, "dropout": key}, *inputs)

    shapes = jax.eval_shape(init, *[self.init_inputs[i] for i in traced])
    out = {}
    for collection, tree in shapes.items():
      for path, leaf in _flatten(tree):
        out[(collection, path)] = tuple(leaf.shape)
    return out


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()):
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _flatten(value, prefix + (key,))
    else:
      yield prefix + (key,), value


def _abstract(*shape, dtype=np.float32):
  return jax.ShapeDtypeStruct(shape, dtype)


def _router_constants(num_groups: int, num_blocks: int = 4) -> dict[str, np.ndarray]:
  mask = icm.router_mask(num_groups)
  keys = ["router._unit_mapping"] + [f"transform.{i}.router{j}._unit_mapping"
                                     for i in range(num_blocks) for j in (1, 2)]
  return {key: mask for key in keys}


def encoder_spec(num_layers: int, released: bool, prefix: str = "") -> ModuleSpec:
  """The encoder: CVPR (attention v1) or the released TPAMI recognition path (v2)."""
  family = "tpami" if released else "cvpr"
  module = spec_lib.build(spec_lib.reference_spec(family, num_layers)).encoder
  return ModuleSpec("encoder", module, (_abstract(1, 112, 112, 3),),
                    tuple(tm.encoder_entries(num_layers)), prefix=prefix)


def age_spec(name: str, num_groups: int, released: bool = False, prefix: str = "") -> ModuleSpec:
  """An age estimator; the released one carries an ``expectation`` buffer (0..100)."""
  constants = ({"expectation": np.arange(ages.NUM_AGE_CLASSES, dtype=np.float32)}
               if released else {})
  return ModuleSpec(name, heads.AgeEstimator(num_groups), (_abstract(1, 7, 7, 512), False),
                    tuple(tm.age_estimator_entries()), constants, prefix)


def head_spec(num_classes: int) -> ModuleSpec:
  """The CosFace head for ``num_classes`` identities."""
  return ModuleSpec("head", heads.CosFace(num_classes), (_abstract(1, 512),),
                    tuple(tm.cosface_entries()))


def generator_spec(num_groups: int) -> ModuleSpec:
  """The FAS generator (ICM + decoder); its router buffers must be the reference mask."""
  inputs = (_abstract(1, 112, 112, 3), _abstract(1, 56, 56, 64), _abstract(1, 28, 28, 128),
            _abstract(1, 14, 14, 256), _abstract(1, 7, 7, 512), _abstract(1, dtype=np.int32))
  return ModuleSpec("generator", generator.Generator(num_groups), inputs,
                    tuple(tm.generator_entries()), _router_constants(num_groups))


def _tpami_generator_constants(num_groups: int, widths: Sequence[int],
                               num_blocks: int = 4) -> dict[str, np.ndarray]:
  """Router masks of the three ICM v2 (on x_id, c3, c2 widths) and the FIR kernels."""
  constants = {}
  for index, channels in zip((1, 2, 3), (widths[3], widths[2], widths[1])):
    mask = icm_v2.v2_router_mask(num_groups, channels)
    prefix = f"encoder.aging{index}."
    constants[prefix + "router._unit_mapping"] = mask
    for i in range(num_blocks):
      for j in (1, 2):
        constants[f"{prefix}transform.{i}.router{j}._unit_mapping"] = mask
  for key, gain in tm.stylegan2_kernel_keys().items():
    constants[key] = stylegan2.blur_kernel_2d(gain=gain)
  return constants


def tpami_generator_spec(num_groups: int = 7, style_dim: int = 512,
                         channels: Optional[Sequence[int]] = None,
                         widths: Sequence[int] = iresnet.STAGE_DEPTHS) -> ModuleSpec:
  """The released model's ageing branch as one module, ``generator``.

  Its tensors are the encoder's style path (``encoder.styles.*``,
  ``encoder.aging{1,2,3}.*``, ``encoder.upsample{1,2,3}.*``,
  ``encoder.latlayer{1,2}.*``: 231) and the decoder (``decoder.*``: 118).

  Args:
    num_groups: age groups.
    style_dim: latent width (512 released; smaller in tests).
    channels: StyleGAN2 widths at 4..128 px (None = released).
    widths: channels of the encoder outputs x2, x3, x4, x_id (the IR stage
      widths; smaller in tests).

  Returns:
    The :class:`ModuleSpec` (keys carry their ``encoder.``/``decoder.`` prefixes).
  """
  module = tpami_generator.TPAMIGenerator(num_groups, style_dim=style_dim,
                                          channels=None if channels is None else tuple(channels))
  c1, c2, c3, c4 = widths
  inputs = (_abstract(1, 112, 112, 3), _abstract(1, 56, 56, c1), _abstract(1, 28, 28, c2),
            _abstract(1, 14, 14, c3), _abstract(1, 7, 7, c4), _abstract(1, dtype=np.int32))
  return ModuleSpec("generator", module, inputs, tuple(tm.tpami_generator_entries()),
                    _tpami_generator_constants(num_groups, widths))


def tpami_generator_meta(module: tpami_generator.TPAMIGenerator) -> dict:
  """The TPAMIGenerator fields to rebuild it: ``TPAMIGenerator(age_group, **fields, dtype=)``."""
  return {"image_size": module.image_size,
          "style_dim": module.style_dim,
          "channels": None if module.channels is None else list(module.channels),
          "channel_multiplier": module.channel_multiplier,
          "mapping_layers": module.mapping_layers, "lr_mlp": module.lr_mlp}


def discriminator_spec(num_groups: int) -> ModuleSpec:
  """The spectral-norm patch discriminator (``u``/``v`` in collection 'spectral')."""
  return ModuleSpec("discriminator", discriminator.PatchDiscriminator(num_groups),
                    (_abstract(1, 112, 112, 3), _abstract(1, dtype=np.int32)),
                    tuple(tm.discriminator_entries()))


# --- conversion --------------------------------------------------------------

def expected_torch_shape(flax_shape: tuple[int, ...], transform: str) -> tuple[int, ...]:
  """The PyTorch shape that converts to ``flax_shape`` (inverse of the transforms)."""
  if transform == "conv":
    kh, kw, cin, cout = flax_shape
    return (cout, cin, kh, kw)
  if transform == "dense" or transform == "dense_nchw":
    return tuple(reversed(flax_shape))
  if transform == "dense_from_1x1":
    return (flax_shape[1], flax_shape[0], 1, 1)
  if transform == "modconv":
    kh, kw, cin, cout = flax_shape
    return (1, cout, cin, kh, kw)
  if transform == "nhwc":
    n, h, w, c = flax_shape
    return (n, c, h, w)
  return tuple(flax_shape)


@dataclasses.dataclass
class ConversionReport:
  """What a conversion used, skipped and could not match, by PyTorch key."""
  converted: dict = dataclasses.field(default_factory=dict)  # module -> tensor count
  constants: int = 0  # fixed buffers checked against their known values (routers, kernels)
  ignored: list = dataclasses.field(default_factory=list)  # num_batches_tracked
  missing: list = dataclasses.field(default_factory=list)
  wrong_shape: list = dataclasses.field(default_factory=list)
  wrong_value: list = dataclasses.field(default_factory=list)
  unexpected: list = dataclasses.field(default_factory=list)
  notes: list = dataclasses.field(default_factory=list)

  def errors(self, allow_unexpected: bool = False) -> list[str]:
    """One line per problem that makes the conversion unusable."""
    lines = [f"missing: {k}" for k in self.missing]
    lines += [f"wrong shape: {k}" for k in self.wrong_shape]
    lines += [f"unexpected value: {k}" for k in self.wrong_value]
    if not allow_unexpected:
      lines += [f"unexpected: {k}" for k in self.unexpected]
    return lines

  def summary(self) -> str:
    """Human-readable lines: what was converted, skipped and tolerated."""
    parts = [f"converted {name}: {count} tensors" for name, count in self.converted.items()]
    if self.unexpected:
      parts.append(f"unexpected keys ({len(self.unexpected)}): {', '.join(self.unexpected)}")
    converted = sum(self.converted.values())
    total = converted + self.constants + len(self.ignored) + len(self.unexpected)
    parts.append(f"{total} tensors read: {converted} converted, {self.constants} constant "
                 f"buffers checked, {len(self.ignored)} BatchNorm counters "
                 f"(num_batches_tracked) not needed; {len(self.unexpected)} skipped")
    return "\n".join(parts + self.notes)


def convert_module(state_dict: Mapping[str, np.ndarray], spec: ModuleSpec,
                   report: ConversionReport, source: str = "") -> Optional[dict]:
  """Converts the tensors of one module; records problems in ``report``.

  Args:
    state_dict: PyTorch key -> array (DDP prefix already stripped).
    spec: the module's specification; its ``prefix`` selects its keys.
    report: collects converted counts and problems (keys as in the file).
    source: file name prefixed to reported keys ('' for none).

  Returns:
    The Flax variable collections, or None if a tensor was missing or misshaped.
  """
  shapes = spec.flax_shapes()
  where = f"{source}: " if source else ""
  ok = True
  for entry in spec.entries:
    key = spec.prefix + entry.torch_key
    if key not in state_dict:
      report.missing.append(where + key)
      ok = False
      continue
    expected = expected_torch_shape(shapes[(entry.collection, entry.flax_path)], entry.transform)
    got = tuple(state_dict[key].shape)
    if got != expected:
      report.wrong_shape.append(f"{where}{key} has shape {list(got)}, expected {list(expected)}")
      ok = False
  for name, value in spec.constants.items():
    key = spec.prefix + name
    if key not in state_dict:
      report.missing.append(where + key)
    elif state_dict[key].shape != value.shape or not np.array_equal(state_dict[key], value):
      report.wrong_value.append(f"{where}{key} differs from the reference constant")
    else:
      report.constants += 1
  if not ok:
    return None
  subset = {e.torch_key: np.asarray(state_dict[spec.prefix + e.torch_key], np.float32)
            for e in spec.entries}
  report.converted[spec.name] = len(spec.entries)
  return tm.state_dict_to_variables(subset, list(spec.entries))


def _used_keys(spec: ModuleSpec) -> set[str]:
  return ({spec.prefix + e.torch_key for e in spec.entries}
          | {spec.prefix + k for k in spec.constants})


def _note_unexpected(state_dict, used: set[str], report: ConversionReport, source: str) -> None:
  where = f"{source}: " if source else ""
  for key in state_dict:
    if key in used:
      continue
    if key.endswith(IGNORED_SUFFIXES):
      report.ignored.append(where + key)
    else:
      report.unexpected.append(where + key)


@dataclasses.dataclass
class Conversion:
  """Converted variables (module -> collections), metadata and the report."""
  variables: dict
  meta: dict
  report: ConversionReport


def infer_num_layers(state_dict: Mapping[str, Any], prefix: str = "") -> int:
  """The IR depth (34/50/64/101) from the units per stage present in the keys."""
  pattern = re.compile(re.escape(prefix) + r"block([1-4])\.(\d+)\.")
  units = [0, 0, 0, 0]
  for key in state_dict:
    match = pattern.match(key)
    if match:
      stage, unit = int(match.group(1)) - 1, int(match.group(2))
      units[stage] = max(units[stage], unit + 1)
  for depth, expected in iresnet.UNITS_PER_STAGE.items():
    if tuple(units) == tuple(expected):
      return depth
  raise ConversionError(f"{prefix or 'backbone'}: units per stage {units} match no IR depth "
                        f"({dict(iresnet.UNITS_PER_STAGE)})")


def infer_num_groups(state_dicts: Mapping[str, Mapping[str, Any]], prefix: str = "") -> int:
  """Age groups from the first tensor that encodes them (7 if none does)."""
  probes = (("group_output_layer.weight", lambda s: s[0]),
            ("router._unit_mapping", lambda s: s[0]),
            ("main.0.weight_orig", lambda s: s[1] - 64))
  for state_dict in state_dicts.values():
    for key, read in probes:
      for candidate in (prefix + key, f"{prefix}age_estimator.{key}"):
        if candidate in state_dict:
          return int(read(state_dict[candidate].shape))
  return 7


def _finish(report: ConversionReport, allow_unexpected: bool) -> None:
  errors = report.errors(allow_unexpected)
  if errors:
    raise ConversionError("cannot convert: " + str(len(errors)) + " problem(s):\n  "
                          + "\n  ".join(errors))


def _cvpr_spec(name: str, state_dict, num_layers: Optional[int], num_groups: int) -> ModuleSpec:
  if name == "encoder":
    return encoder_spec(num_layers or infer_num_layers(state_dict), released=False)
  if name in ("age", "da_age"):
    return age_spec(name, num_groups)
  if name == "head":
    weight = state_dict.get("weight")
    if weight is None or weight.ndim != 2:
      raise ConversionError("head: no 2-D 'weight' [classes, 512] in the CosFace file")
    return head_spec(int(weight.shape[0]))
  if name == "generator":
    return generator_spec(num_groups)
  if name == "discriminator":
    return discriminator_spec(num_groups)
  raise ValueError(f"unknown CVPR module {name!r}; use one of {CVPR_MODULES}")


def convert_cvpr(state_dicts: Mapping[str, Mapping[str, np.ndarray]],
                 num_layers: Optional[int] = None, num_groups: Optional[int] = None,
                 sources: Optional[Mapping[str, str]] = None,
                 allow_unexpected: bool = False) -> Conversion:
  """Converts CVPR-layout module state_dicts.

  Args:
    state_dicts: module name (``encoder``, ``head``, ``age``, ``da_age``,
      ``generator``, ``discriminator``) -> its state_dict (``module.`` prefixes
      are stripped here).
    num_layers: IR depth of the backbone; inferred from its keys if None.
    num_groups: age groups; inferred from the tensors if None.
    sources: module name -> file name, used in reported keys.
    allow_unexpected: only report (not fail on) keys no module uses.

  Returns:
    The :class:`Conversion`.

  Raises:
    ConversionError: naming every missing, misshaped or unexpected key.
  """
  sources = dict(sources or {})
  state_dicts = {name: strip_ddp_prefix(sd) for name, sd in state_dicts.items()}
  num_groups = num_groups or infer_num_groups(state_dicts)
  report, variables = ConversionReport(), {}
  meta = {"converted_from": "pytorch", "layout": "cvpr", "age_group": num_groups,
          "modules": sorted(state_dicts), "sources": sources}
  encoder = None
  for name, state_dict in state_dicts.items():
    spec = _cvpr_spec(name, state_dict, num_layers, num_groups)
    converted = convert_module(state_dict, spec, report, sources.get(name, name))
    _note_unexpected(state_dict, _used_keys(spec), report, sources.get(name, name))
    if converted is not None:
      variables[name] = converted
    if name == "encoder":
      encoder = spec.module
    if name == "head":
      meta["num_classes"] = spec.module.num_classes
  _finish(report, allow_unexpected)
  meta.update(_model_meta("cvpr", encoder, num_groups, meta.get("num_classes")))
  return Conversion(variables, meta, report)


def _model_meta(family: str, encoder, num_groups: int, num_classes: Optional[int],
                generator: Optional[dict] = None) -> dict:
  """The ``model`` entry of a conversion's meta: the spec every reader rebuilds from."""
  spec = spec_lib.reference_spec(family, encoder.num_layers if encoder else 50, num_groups,
                                 num_classes, generator)
  return {"model": spec.to_dict()}


def convert_tpami(state_dict: Mapping[str, np.ndarray], source: str = "",
                  allow_unexpected: bool = False) -> Conversion:
  """Converts the released TPAMI checkpoint, every tensor of it.

  ``encoder.*`` recognition path (IR-50, attention v2, normalised embedding)
  becomes ``variables['encoder']``, ``age_estimator.*`` ``variables['age']``,
  and the ageing branch (the encoder's style path and ``decoder.*``)
  ``variables['generator']`` (:func:`tpami_generator_spec`). A file without
  any ageing-branch tensor converts without a generator (and says so); one
  with only part of it is an error naming the missing keys.

  Args:
    state_dict: the whole model's state_dict.
    source: the file name, used in reported keys.
    allow_unexpected: only report (not fail on) keys no module uses.

  Returns:
    The :class:`Conversion`; ``meta['generator']`` holds the generator's
    fields (or None).

  Raises:
    ConversionError: naming every missing, misshaped or unexpected key.
  """
  state_dict = strip_ddp_prefix(state_dict)
  num_groups = infer_num_groups({"model": state_dict}, prefix="")
  specs = [encoder_spec(50, released=True, prefix="encoder."),
           age_spec("age", num_groups, released=True, prefix="age_estimator.")]
  has_generator = any(key.startswith(TPAMI_GENERATOR_PREFIXES) for key in state_dict)
  if has_generator:
    specs.append(tpami_generator_spec(num_groups))
  report, variables, used = ConversionReport(), {}, set()
  for spec in specs:
    converted = convert_module(state_dict, spec, report, source)
    used |= _used_keys(spec)
    if converted is not None:
      variables[spec.name] = converted
  _note_unexpected(state_dict, used, report, source)
  if not has_generator:
    report.notes.append(TPAMI_NO_AGEING_NOTE)
  _finish(report, allow_unexpected)
  generator_fields = tpami_generator_meta(specs[2].module) if has_generator else None
  meta = {"converted_from": "pytorch", "layout": "tpami", "age_group": num_groups,
          "modules": sorted(variables), "sources": {"model": source},
          "skipped": len(report.unexpected),
          **_model_meta("tpami", specs[0].module, num_groups, None, generator_fields)}
  return Conversion(variables, meta, report)


# --- saving and the command line ---------------------------------------------

def save_conversion(conversion: Conversion, output: str | Path) -> Path:
  """Writes the variables as a training-state checkpoint at step 0.

  The checkpoint holds ``{'variables': {module: collections}}`` (what
  ``config.init_from`` reads) and ``conversion.meta`` as its JSON ``meta``.

  Args:
    conversion: from :func:`convert_cvpr` or :func:`convert_tpami`.
    output: a new (or empty) directory.

  Returns:
    The checkpoint directory.

  Raises:
    FileExistsError: if ``output`` exists and is not empty.
  """
  # orbax is only needed to save; importing it lazily keeps the readers light.
  from mtlface_jax.training import checkpoint  # pylint: disable=g-import-not-at-top
  output = Path(output).absolute()
  if output.exists() and any(output.iterdir()):
    raise FileExistsError(f"output directory {output} is not empty")
  saver = checkpoint.Checkpointer(output, keep=1, async_save=False)
  try:
    saver.save(0, {"variables": conversion.variables}, conversion.meta)
    saver.wait()
  finally:
    saver.close()
  return output


def _parse_input(spec: str) -> tuple[Optional[str], Path]:
  """``[MODULE=]PATH`` -> (module or None, path)."""
  name, sep, path = spec.partition("=")
  if sep and name in CVPR_MODULES:
    return name, Path(path)
  return None, Path(spec)


def identify_cvpr_module(path: Path, state_dict: Mapping[str, Any]) -> str:
  """Which CVPR module a file holds: from the reference's file name, else its keys."""
  stem = re.sub(r"-\d+$", "", path.name.split(".")[0])
  if stem in REFERENCE_FILE_NAMES:
    return REFERENCE_FILE_NAMES[stem]
  keys = set(strip_ddp_prefix(state_dict))
  if "input_layer.0.weight" in keys:
    return "encoder"
  if "age_output_layer.2.weight" in keys:
    return "age"  # An adversarial estimator has the same keys: name it da_age=PATH.
  if keys == {"weight"}:
    return "head"
  if "router._unit_mapping" in keys:
    return "generator"
  if "main.0.weight_orig" in keys:
    return "discriminator"
  raise ConversionError(f"{path}: cannot tell which MTLFace module this is; "
                        f"pass it as MODULE=PATH with MODULE in {CVPR_MODULES}")


def read_cvpr_inputs(inputs: Sequence[str], reader: str = "auto") -> tuple[dict, dict]:
  """Reads ``[MODULE=]PATH`` inputs; returns (module -> state_dict, module -> path).

  Raises:
    ConversionError: if a module cannot be identified or is given twice.
  """
  state_dicts, sources = {}, {}
  for spec in inputs:
    name, path = _parse_input(spec)
    state_dict = read_state_dict(path, reader)
    check_layout("cvpr", [(path, state_dict)])
    name = name or identify_cvpr_module(path, state_dict)
    if name in state_dicts:
      raise ConversionError(f"two inputs for module {name!r}: {sources[name]} and {path}")
    state_dicts[name], sources[name] = state_dict, str(path)
  return state_dicts, sources


# Top-level key prefixes of the released TPAMI model; a CVPR training file has
# one module's keys (``input_layer.*``, ``block1.*``, ``weight``, ...) instead.
TPAMI_PREFIXES = ("encoder.", "age_estimator.", "decoder.")


def detect_layout(state_dict: Mapping[str, Any]) -> Optional[str]:
  """``'tpami'`` for the released whole-model file, ``'cvpr'`` for a per-module file.

  Args:
    state_dict: as read (a DDP ``module.`` prefix is ignored).

  Returns:
    The layout the keys look like, or None when they look like neither.
  """
  keys = list(strip_ddp_prefix(state_dict))
  if not keys:
    return None
  tpami = sum(k.startswith(TPAMI_PREFIXES) for k in keys)
  if tpami == len(keys):
    return "tpami"
  if tpami == 0:
    return "cvpr"
  return None


def check_layout(layout: str, paths_and_state_dicts: Sequence[tuple[Any, Mapping]]) -> None:
  """Raises a one-line error when an input has the other layout's keys.

  Raises:
    ConversionError: e.g. ``x.pth: this looks like a TPAMI state_dict (keys
      encoder.*, age_estimator.*, decoder.*): use --layout tpami``.
  """
  for path, state_dict in paths_and_state_dicts:
    found = detect_layout(state_dict)
    if found == layout or found is None:
      continue
    if found == "tpami":
      raise ConversionError(f"{path}: this looks like a TPAMI state_dict (keys "
                            f"{', '.join(p + '*' for p in TPAMI_PREFIXES)}): use --layout tpami")
    raise ConversionError(f"{path}: this looks like a CVPR per-module state_dict (no "
                          f"{'/'.join(p + '*' for p in TPAMI_PREFIXES)} keys): use --layout "
                          "cvpr, one --input per module file")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m mtlface_jax.convert",
      description="Convert PyTorch MTLFace weights to an orbax checkpoint.")
  parser.add_argument("--layout", choices=LAYOUTS, required=True,
                      help="cvpr: per-module training files; tpami: the released model")
  parser.add_argument("--input", action="append", required=True, metavar="[MODULE=]PATH",
                      help="a PyTorch file (repeat for cvpr modules; MODULE one of "
                      f"{', '.join(CVPR_MODULES)}; inferred from the file name or keys)")
  parser.add_argument("--output", required=True, help="new checkpoint directory")
  parser.add_argument("--backbone", choices=["auto", *spec_lib.BACKBONES], default="auto",
                      help="cvpr backbone depth (default: inferred from the keys)")
  parser.add_argument("--age-groups", type=int, default=None,
                      help="age groups (default: inferred from the tensors)")
  parser.add_argument("--reader", choices=["auto", "torch", "zip"], default="auto",
                      help="torch.load(weights_only=True), or the built-in safe zip reader")
  parser.add_argument("--allow-unexpected", action="store_true",
                      help="report keys no module uses instead of failing")
  return parser


def run(args: argparse.Namespace) -> Conversion:
  """Reads, converts and saves as the parsed command line says."""
  if args.layout == "tpami":
    if len(args.input) != 1:
      raise ConversionError("--layout tpami takes exactly one --input (the released file)")
    path = _parse_input(args.input[0])[1]
    state_dict = read_state_dict(path, args.reader)
    check_layout("tpami", [(path, state_dict)])
    conversion = convert_tpami(state_dict, str(path), args.allow_unexpected)
  else:
    state_dicts, sources = read_cvpr_inputs(args.input, args.reader)
    num_layers = None if args.backbone == "auto" else spec_lib.BACKBONES[args.backbone]
    conversion = convert_cvpr(state_dicts, num_layers, args.age_groups, sources,
                              args.allow_unexpected)
  save_conversion(conversion, args.output)
  return conversion


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Command-line entry point; returns the process exit status."""
  args = build_parser().parse_args(argv)
  try:
    conversion = run(args)
  except (ConversionError, FileNotFoundError, FileExistsError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  print(conversion.report.summary())
  print(f"wrote {args.output}: {json.dumps(conversion.meta, sort_keys=True)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
