"""Reports (JSON, text tables, ROC plots) and batched embedding extraction."""

import dataclasses
import json
import math
import operator
import pathlib
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import jax
import numpy as np
from tqdm import tqdm

# --------------------------------------------------------------------------- #
# JSON and text reports.
# --------------------------------------------------------------------------- #


def to_jsonable(value: Any) -> Any:
  """Converts a report value to plain JSON types, recursively.

  Handles dicts (keys become strings), lists/tuples, NumPy/JAX arrays and
  scalars, dataclasses (via their ``to_dict()`` when present) and paths.
  Non-finite floats become None because strict JSON has no NaN/Infinity.

  Args:
    value: the value to convert.

  Returns:
    A structure of dict/list/str/int/float/bool/None.
  """
  if hasattr(value, "to_dict") and callable(value.to_dict):
    return to_jsonable(value.to_dict())
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return to_jsonable(dataclasses.asdict(value))
  if isinstance(value, Mapping):
    return {str(key): to_jsonable(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_jsonable(item) for item in value]
  if isinstance(value, (np.ndarray, jax.Array)):
    return to_jsonable(np.asarray(value).tolist())
  if isinstance(value, np.generic):
    return to_jsonable(value.item())
  if isinstance(value, pathlib.PurePath):
    return str(value)
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if value is None or isinstance(value, (str, int, float, bool)):
    return value
  raise TypeError(f"cannot convert {type(value).__name__} to JSON: {value!r}")


def write_json_report(report: Any, path) -> pathlib.Path:
  """Writes ``report`` as indented JSON (see :func:`to_jsonable`).

  Args:
    report: dicts/dataclasses/arrays to write.
    path: destination file; parent folders are created.

  Returns:
    The written path.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(to_jsonable(report), indent=2, allow_nan=False) + "\n")
  return path


def read_json_report(path) -> Any:
  """Reads a report written by :func:`write_json_report`."""
  return json.loads(pathlib.Path(path).read_text())


def format_table(rows: Sequence[Mapping[str, Any]],
                 columns: Optional[Sequence[str]] = None,
                 float_format: str = "{:.4f}") -> str:
  """Formats rows of values as an aligned plain-text table.

  Args:
    rows: one mapping per row, column name -> value.
    columns: column order; default: keys of the first row, then new keys.
    float_format: format of float values (None prints as "-").

  Returns:
    The table with a header and a rule, one line per row.
  """
  if columns is None:
    columns = []
    for row in rows:
      columns.extend(key for key in row if key not in columns)

  def cell(value):
    if value is None:
      return "-"
    if isinstance(value, (float, np.floating)):
      return float_format.format(value)
    return str(value)

  body = [[cell(row.get(column)) for column in columns] for row in rows]
  widths = [max([len(column)] + [len(line[i]) for line in body])
            for i, column in enumerate(columns)]
  lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
           "  ".join("-" * w for w in widths)]
  lines += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in body]
  return "\n".join(line.rstrip() for line in lines)


def verification_table(results: Mapping[str, Any]) -> str:
  """Readable table of verification results, one row per dataset.

  Args:
    results: dataset name -> ``VerificationResult`` (or its ``to_dict()``).

  Returns:
    A text table with accuracy (mean +- std, in %), AUC, EER, TAR at each FAR
    and the best threshold.
  """
  rows = []
  for name, result in results.items():
    result = to_jsonable(result)
    row = {"dataset": name,
           "accuracy (%)": f"{100 * result['accuracy_mean']:.2f} +- "
                           f"{100 * result['accuracy_std']:.2f}",
           "AUC": result["auc"], "EER": result["eer"]}
    for entry in result["tar_at_far"]:
      row[f"TAR@FAR={entry['far']:g}"] = entry["tar"]
    row["threshold"] = result["best_threshold"]
    row["pairs"] = result["num_pairs"]
    rows.append(row)
  return format_table(rows)


def plot_roc_curves(curves: Mapping[str, Any], path, log_fpr: bool = True) -> pathlib.Path:
  """Writes ROC curves (TPR against FPR) to a PNG with matplotlib (Agg).

  Args:
    curves: name -> ``VerificationResult`` or an ``(fpr, tpr)`` pair.
    path: destination PNG; parent folders are created.
    log_fpr: logarithmic FPR axis (the usual view for face verification);
      points with FPR 0 cannot be drawn on it.

  Returns:
    The written path.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")  # Headless: never needs a display.
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  figure, axes = plt.subplots(figsize=(5, 4.5), dpi=100)
  for name, curve in curves.items():
    if hasattr(curve, "roc_fpr"):
      fpr, tpr = curve.roc_fpr, curve.roc_tpr
    else:
      fpr, tpr = curve
    fpr, tpr = np.asarray(fpr), np.asarray(tpr)
    visible = fpr > 0 if log_fpr else np.ones_like(fpr, bool)
    axes.plot(fpr[visible], tpr[visible], label=name)
  if log_fpr:
    axes.set_xscale("log")
  axes.set_xlabel("false accept rate")
  axes.set_ylabel("true accept rate")
  axes.set_ylim(0.0, 1.01)
  axes.grid(True, which="both", alpha=0.3)
  axes.legend(loc="lower right")
  figure.tight_layout()
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  figure.savefig(path, format="png")
  plt.close(figure)
  return path


# --------------------------------------------------------------------------- #
# Embedding extraction.
# --------------------------------------------------------------------------- #


def flip_sum_embeddings(embed_fn: Callable[[Any], Any], images) -> Any:
  """Embedding of each image plus that of its horizontal mirror.

  This is the reference's test-time augmentation (it then L2-normalises the
  sum; cosine scoring is scale-invariant, so the sum is returned as is).

  Args:
    embed_fn: maps an NHWC batch to embeddings (or a pytree of arrays, which
      are summed leaf by leaf).
    images: NHWC batch (NumPy or JAX).

  Returns:
    ``embed_fn(images) + embed_fn(images mirrored along W)``.
  """
  if np.ndim(images) != 4:
    raise ValueError(f"images must be NHWC, got shape {np.shape(images)}")
  mirrored = images[:, :, ::-1, :]
  return jax.tree_util.tree_map(operator.add, embed_fn(images), embed_fn(mirrored))


def extract_embeddings(embed_fn: Callable[[Any], Any],
                       images: Iterable[Any],
                       batch_size: int,
                       sharding: Optional[jax.sharding.Sharding] = None,
                       input_dtype=np.float32,
                       progress: bool = True,
                       description: str = "embeddings",
                       total: Optional[int] = None) -> Any:
  """Runs ``embed_fn`` over images in fixed-size batches and gathers outputs.

  Every batch has exactly ``batch_size`` images (the last one is zero-padded
  and the padding dropped from the outputs), so a jitted ``embed_fn`` compiles
  once. Device work overlaps with loading the next batch because outputs are
  copied to the host one batch late.

  Args:
    embed_fn: maps an [B, H, W, C] batch to an array [B, ...] or a pytree of
      such arrays (e.g. embeddings and ages).
    images: iterable of single images [H, W, C] (a NumPy array [N, H, W, C]
      works, as does a generator that decodes files lazily).
    batch_size: images per call. With ``sharding`` it is rounded up to a
      multiple of the sharding's device count.
    sharding: optional ``jax.sharding.Sharding`` to place each batch with,
      e.g. ``NamedSharding(Mesh(jax.devices(), ("data",)), P("data"))`` for
      data parallelism over all devices.
    input_dtype: dtype of the batches fed to ``embed_fn`` (e.g. bfloat16).
    progress: show a tqdm progress bar.
    description: progress bar label.
    total: number of images for the progress bar (default ``len(images)``).

  Returns:
    The outputs for all images, concatenated along axis 0, as NumPy arrays with
    ``embed_fn``'s pytree structure.

  Raises:
    ValueError: on an empty input, a non-positive batch size, or an image
      whose shape differs from the first one (its index is named).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if sharding is not None:
    num_devices = len(sharding.device_set)
    batch_size = -(-batch_size // num_devices) * num_devices
  if total is None and hasattr(images, "__len__"):
    total = len(images)
  gathered, pending = [], None
  with tqdm(total=total, desc=description, unit="img", disable=not progress) as bar:
    for batch, num_valid in _padded_batches(images, batch_size, input_dtype):
      if sharding is not None:
        batch = jax.device_put(batch, sharding)
      outputs = embed_fn(batch)  # Dispatched asynchronously.
      if pending is not None:
        gathered.append(_to_host(*pending))
      pending = (outputs, num_valid)
      bar.update(num_valid)
  if pending is None:
    raise ValueError("no images to embed")
  gathered.append(_to_host(*pending))
  return jax.tree_util.tree_map(lambda *parts: np.concatenate(parts, axis=0), *gathered)


def _padded_batches(images: Iterable[Any], batch_size: int, dtype):
  """Yields (batch [batch_size, H, W, C], number of real images in it)."""
  buffer, filled, shape = None, 0, None
  for index, image in enumerate(images):
    image = np.asarray(image)
    if shape is None:
      shape = image.shape
      if image.ndim != 3:
        raise ValueError(f"image 0 must be [H, W, C], got shape {image.shape}")
    elif image.shape != shape:
      raise ValueError(f"image {index} has shape {image.shape}, expected {shape} "
                       "like image 0")
    if buffer is None:
      # A fresh buffer per batch: the previous one may still be read by an
      # asynchronously running computation.
      buffer = np.zeros((batch_size, *shape), dtype)
    buffer[filled] = image
    filled += 1
    if filled == batch_size:
      yield buffer, filled
      buffer, filled = None, 0
  if filled:
    yield buffer, filled


def _to_host(outputs: Any, num_valid: int) -> Any:
  """Copies outputs to NumPy, dropping the padding rows."""
  return jax.tree_util.tree_map(lambda leaf: np.asarray(leaf)[:num_valid], outputs)
