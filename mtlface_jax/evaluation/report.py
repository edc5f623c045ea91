"""Evaluation reports: the report dict, JSON, text tables and ROC plots."""

import dataclasses
import json
import math
import pathlib
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np

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
# Evaluation reports.
# --------------------------------------------------------------------------- #

SECTIONS = ("verification", "identification", "age", "fas", "fas_truth")


def new_report(protocol: str, model_info: dict, options: dict) -> dict[str, Any]:
  """An empty report: filled by the protocols, written by :func:`write_report`."""
  devices = jax.devices()
  return {"protocol": protocol, "checkpoint": dict(model_info), "options": dict(options),
          "devices": {"count": len(devices), "platform": devices[0].platform,
                      "kind": devices[0].device_kind},
          "datasets": {}, "started": time.time()}


def add_result(report: dict, section: str, name: str, result: Any,
               dataset: Optional[dict] = None) -> None:
  """Stores ``result`` as ``report[section][name]`` (and the dataset summary)."""
  if section not in SECTIONS:
    raise ValueError(f"section must be one of {SECTIONS}, got {section!r}")
  report.setdefault(section, {})[name] = result
  if dataset is not None:
    report["datasets"][name] = dataset


def report_text(report: dict) -> str:
  """The readable tables of a report (one block per section)."""
  blocks = []
  if report.get("verification"):
    blocks.append("Verification\n" + verification_table(report["verification"]))
  if report.get("identification"):
    rows = []
    for name, result in report["identification"].items():
      result = to_jsonable(result)
      rows.append({"dataset": name, **result["rank_accuracies"],
                   "probes": result["num_probes"], "skipped": result["num_skipped"]})
    blocks.append("Identification\n" + format_table(rows))
  if report.get("age"):
    rows = []
    for name, result in report["age"].items():
      r = to_jsonable(result)
      rows.append({"dataset": name, "MAE": r["mae"], "group acc": r["group_accuracy"],
                   f"CS({r['cs_years']:g})": r["cs"], "samples": r["num_samples"],
                   "ignored": r["num_ignored"]})
    blocks.append("Age estimation\n" + format_table(rows))
  for name, entry in (report.get("fas") or {}).items():
    blocks.append(_fas_text(name, to_jsonable(entry)))
  for name, entry in (report.get("fas_truth") or {}).items():
    blocks.append(_fas_truth_text(name, to_jsonable(entry)))
  return "\n\n".join(blocks) if blocks else "(no results)"


def _fas_text(name: str, entry: dict) -> str:
  """Overall and per-group FAS tables."""
  overall = format_table([{
      "dataset": name, "age accuracy": entry["age_accuracy"],
      "identity preservation": entry["identity_preservation"],
      "samples": entry["num_samples"]}])
  per_group = format_table([
      {"group": g["group"], "ages": g["label"], "count": g["count"],
       "age acc": g["age_accuracy"], "identity": g["identity_preservation"],
       "mean est. age": g.get("mean_estimated_age")} for g in entry["per_group"]])
  return f"Face age synthesis\n{overall}\n\nper target group\n{per_group}"


def _fas_truth_text(name: str, entry: dict) -> str:
  """The ground-truth FAS score (procedural faces), overall and per target group."""
  fields = ("truth_gain_region", "truth_gain_image", "hair_colour_progress",
            "skin_colour_progress", "identity_to_truth")
  overall = format_table([{"dataset": name, **{k: entry.get(k) for k in fields},
                           "samples": entry.get("num_samples")}])
  per_group = format_table([{"group": g["group"], "ages": g["label"], "count": g["count"],
                             **{k: g.get(k) for k in fields}} for g in entry["per_group"]])
  return f"Face age synthesis against the true aged faces\n{overall}\n\nper target group\n{per_group}"


def write_report(report: dict, output_dir) -> dict[str, str]:
  """Writes ``report.json``, ``report.txt`` and (with verification) ``roc.png``.

  Args:
    report: from :func:`new_report` with results added.
    output_dir: destination folder (created).

  Returns:
    Paths of the written files by kind ("json", "table", "roc"), also stored
    in the report's ``files``.
  """
  output_dir = Path(output_dir)
  output_dir.mkdir(parents=True, exist_ok=True)
  report["seconds"] = round(time.time() - report.pop("started", time.time()), 3)
  files = {"json": str(output_dir / "report.json"), "table": str(output_dir / "report.txt")}
  if report.get("verification"):
    files["roc"] = str(plot_roc_curves(report["verification"],
                                                  output_dir / "roc.png"))
  report["files"] = {**report.get("files", {}), **files}
  Path(files["table"]).write_text(report_text(report) + "\n", encoding="utf-8")
  write_json_report(report, files["json"])
  return files


def fas_entry(outcome: dict, age_model: str, identity_model: str, group_from: str) -> dict:
  """The report entry of :func:`face_age_synthesis`'s outcome."""
  return {**outcome["result"].to_dict(), "age_estimator": age_model,
          "identity_model": identity_model, "group_from": group_from,
          "grids": outcome["grids"]}
