"""The evaluation protocols on a loaded model, and the report they produce.

Protocols (each returns the library's result object):
  * :func:`verify_pairs` / :func:`verify_bin` / :func:`verify_synthetic`:
    the 10-fold verification protocol (``verification.evaluate_verification``);
  * :func:`identify_leave_one_out` / :func:`identify_gallery_probe`: rank-k;
  * :func:`estimate_age`: MAE, group accuracy, CS(5);
  * :func:`face_age_synthesis`: every input synthesized into every age group,
    scored for age accuracy and identity preservation, with PNG grids.

:func:`write_report` writes ``report.json``, ``report.txt`` and ``roc.png``;
:func:`evaluate_synthetic` runs everything on a synthetic dataset (the demo).
"""

import os
import time
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np
from tqdm import tqdm

from mtlface_jax import ages as ages_lib
from mtlface_jax.evaluation import age as age_lib
from mtlface_jax.evaluation import datasets
from mtlface_jax.evaluation import fas as fas_lib
from mtlface_jax.evaluation import identification
from mtlface_jax.evaluation import inference
from mtlface_jax.evaluation import loading
from mtlface_jax.evaluation import report as report_lib
from mtlface_jax.evaluation import runner
from mtlface_jax.evaluation import verification

SECTIONS = ("verification", "identification", "age", "fas")

# --------------------------------------------------------------------------- #
# Protocols.
# --------------------------------------------------------------------------- #


def verify_pairs(model: inference.ModelRunner, pairs, lfw_style: bool = False,
                 eval_folds=None) -> verification.VerificationResult:
  """Verification on parsed pairs (LFW, generic or numbered lists).

  Args:
    model: the runner of the recognition model.
    pairs: ``formats.lists.FacePair`` entries.
    lfw_style: apply the fixed LFW crop (raw deep-funneled LFW images).
    eval_folds: fold LABELS to evaluate (see ``datasets.resolve_eval_folds``).

  Returns:
    The verification result.
  """
  if eval_folds is not None and all(p.fold >= 0 for p in pairs):
    # Unselected folds play no part in the protocol: do not embed their images.
    wanted = set(int(f) for f in eval_folds)
    pairs = [p for p in pairs if p.fold in wanted] or pairs  # Empty: let the protocol say why.
  return runner.verify_pair_list(model.embed_fn(), pairs, model.batch_size, lfw_style,
                                 eval_folds, model.sharding, model.progress,
                                 image_size=model.image_size)


def verify_bin(model: inference.ModelRunner, path, num_folds: int = 10,
               eval_folds=None) -> verification.VerificationResult:
  """Verification on an insightface ``.bin`` set (AgeDB-30, CALFW, CPLFW...)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f".bin set not found: {path}")
  return runner.verify_bin(model.embed_fn(), path, model.batch_size, num_folds, eval_folds,
                           model.sharding, model.progress, image_size=model.image_size)


def verify_synthetic(model: inference.ModelRunner, data, eval_folds=None,
                     max_pairs_per_fold: Optional[int] = None
                     ) -> verification.VerificationResult:
  """Verification on a synthetic dataset's held-out test pairs.

  Args:
    model: the runner of the recognition model.
    data: ``mtlface_jax.synthetic.SyntheticFaces`` (``test`` and ``pairs``).
    eval_folds: fold labels to evaluate (None: all).
    max_pairs_per_fold: keep only this many matched/mismatched pairs per fold.

  Returns:
    The verification result.
  """
  pairs = datasets.limit_pair_rows(np.asarray(data.pairs), max_pairs_per_fold)
  if not len(pairs):
    raise ValueError("the synthetic dataset has no verification pairs (test_fraction=0?)")
  if eval_folds is not None:
    selected = pairs[np.isin(pairs[:, 3], np.asarray(list(eval_folds)))]
    pairs = selected if len(selected) else pairs  # Empty: let the protocol say why.
  used = np.unique(pairs[:, :2])  # Embed only the images some pair uses.
  embeddings = model.embed(inference.array_faces(data.test.images[used], model.image_size),
                           total=len(used), description="synthetic pairs")
  row = np.searchsorted(used, pairs[:, :2])
  return verification.evaluate_verification(pairs[:, 2].astype(bool), embeddings[row[:, 0]],
                                            embeddings[row[:, 1]], folds=pairs[:, 3],
                                            eval_folds=eval_folds)


def identify_leave_one_out(model: inference.ModelRunner,
                           faces: datasets.FaceSet) -> identification.IdentificationResult:
  """Leave-one-image-out rank-1/rank-5 (the FG-NET protocol) on a labelled set."""
  faces.check_files()
  embeddings = model.embed(faces.faces(model.image_size), total=len(faces),
                           description=faces.name)
  return identification.leave_one_out_identification(embeddings, faces.ids)


def identify_gallery_probe(model: inference.ModelRunner, gallery: datasets.FaceSet,
                           probe: datasets.FaceSet) -> identification.IdentificationResult:
  """Rank-1/rank-5 of every probe face against the gallery."""
  gallery.check_files()
  probe.check_files()
  gallery_embeddings = model.embed(gallery.faces(model.image_size), total=len(gallery),
                                   description=f"gallery {gallery.name}")
  probe_embeddings = model.embed(probe.faces(model.image_size), total=len(probe),
                                 description=f"probe {probe.name}")
  return identification.gallery_probe_identification(gallery_embeddings, gallery.ids,
                                                     probe_embeddings, probe.ids)


def estimate_age(model: inference.ModelRunner, faces: datasets.FaceSet,
                 group_from: str = "head", cs_years: float = 5.0) -> age_lib.AgeResult:
  """Age estimation metrics (MAE, group accuracy, CS) on faces with known ages.

  Args:
    model: the runner of a model with an age estimator.
    faces: the labelled faces (unknown ages, -1, are ignored and counted).
    group_from: group prediction: "head" (the group classifier) or "age"
      (the group of the expected age).
    cs_years: the cumulative score's tolerance.

  Returns:
    The age result.
  """
  if not (faces.ages >= 0).any():
    raise ValueError(f"{faces.name} ({faces.source}) has no face with a known age")
  faces.check_files()
  estimates = model.estimate_ages(faces.faces(model.image_size), total=len(faces),
                                  description=faces.name)
  groups = inference.estimated_groups(estimates, model.num_groups, group_from)
  return age_lib.age_metrics(estimates["age"], faces.ages, model.num_groups,
                             predicted_groups=groups, cs_years=cs_years)


def face_age_synthesis(generator: inference.ModelRunner, faces: datasets.FaceSet,
                       age_model: inference.ModelRunner, id_model: inference.ModelRunner,
                       output_dir=None, group_from: str = "head", grid_rows: int = 8,
                       grid_faces: int = 16) -> dict[str, Any]:
  """Synthesizes every age group for each face and scores the results.

  The inputs are brought to the generator's input size once; the identity
  model embeds the input at that same size as the synthesized faces, so the
  resolution does not bias identity preservation.

  Args:
    generator: runner of a model with encoder + generator.
    faces: the input faces (labels unused).
    age_model: runner whose age estimator judges the synthesized ages; it must
      use the generator's number of age groups.
    id_model: runner whose encoder embeds inputs and synthesized faces.
    output_dir: where the grid PNGs go (None: no grids).
    group_from: see :func:`estimate_age`.
    grid_rows: inputs per grid image.
    grid_faces: inputs shown in grids in total (the first ones).

  Returns:
    ``{'result': FasResult, 'grids': [PNG paths]}``.
  """
  if age_model.num_groups != generator.num_groups:
    raise ValueError(f"the age estimator has {age_model.num_groups} age groups but the "
                     f"generator {generator.num_groups}; they must match")
  faces.check_files()
  size, chunk = generator.image_size, generator.batch_size
  parts, shown = {"groups": [], "ages": [], "inputs": [], "synthesized": []}, []
  stream = faces.faces(size)
  with tqdm(total=len(faces), desc="face age synthesis", unit="img",
            disable=not generator.progress) as bar:
    while True:
      batch = [face for _, face in zip(range(chunk), stream)]
      if not batch:
        break
      batch = np.stack(batch)
      out = _synthesize_and_score(generator, age_model, id_model, batch, group_from)
      for key in parts:
        parts[key].append(out[key])
      keep = max(0, min(len(batch), grid_faces - sum(len(b) for b, _ in shown)))
      if keep:
        shown.append((batch[:keep], out["images"][:keep]))
      bar.update(len(batch))
  joined = {key: np.concatenate(value) for key, value in parts.items()}
  result = fas_lib.fas_metrics_all_groups(joined["groups"], joined["inputs"],
                                          joined["synthesized"], joined["ages"])
  grids = _write_grids(shown, output_dir, faces.name, generator.num_groups, grid_rows)
  return {"result": result, "grids": grids}


def _synthesize_and_score(generator, age_model, id_model, batch, group_from) -> dict:
  """One chunk of inputs: synthesized images, their groups/ages and embeddings."""
  synthesized = generator.synthesize(batch, progress=False)  # [b, G, S, S, 3]
  count, num_groups = synthesized.shape[:2]
  flat = synthesized.reshape((-1,) + synthesized.shape[2:])
  estimates = age_model.estimate_ages(flat, progress=False)
  groups = inference.estimated_groups(estimates, age_model.num_groups, group_from)
  embedded = id_model.embed(flat, progress=False)
  return {"images": synthesized,
          "groups": groups.reshape(count, num_groups),
          "ages": np.asarray(estimates["age"]).reshape(count, num_groups),
          "inputs": id_model.embed(batch, progress=False),
          "synthesized": embedded.reshape(count, num_groups, -1)}


def _write_grids(shown, output_dir, name: str, num_groups: int, grid_rows: int) -> list[str]:
  """Writes age-progression grids of ``grid_rows`` inputs each."""
  if output_dir is None or not shown:
    return []
  if grid_rows < 1:
    raise ValueError(f"grid_rows must be >= 1, got {grid_rows}")
  inputs = np.concatenate([b for b, _ in shown])
  synthesized = np.concatenate([s for _, s in shown])
  paths = []
  for page, start in enumerate(range(0, len(inputs), grid_rows)):
    path = Path(output_dir) / f"fas_grid_{_slug(name)}_{page:02d}.png"
    fas_lib.save_age_progression_grid(inputs[start:start + grid_rows],
                                      synthesized[start:start + grid_rows], path,
                                      group_labels=ages_lib.group_ranges(num_groups))
    paths.append(str(path))
  return paths


def _slug(name: str) -> str:
  return "".join(c if c.isalnum() or c in "-_" else "_" for c in name) or "faces"


# --------------------------------------------------------------------------- #
# Reports.
# --------------------------------------------------------------------------- #


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
    blocks.append("Verification\n" + report_lib.verification_table(report["verification"]))
  if report.get("identification"):
    rows = []
    for name, result in report["identification"].items():
      result = report_lib.to_jsonable(result)
      rows.append({"dataset": name, **result["rank_accuracies"],
                   "probes": result["num_probes"], "skipped": result["num_skipped"]})
    blocks.append("Identification\n" + report_lib.format_table(rows))
  if report.get("age"):
    rows = []
    for name, result in report["age"].items():
      r = report_lib.to_jsonable(result)
      rows.append({"dataset": name, "MAE": r["mae"], "group acc": r["group_accuracy"],
                   f"CS({r['cs_years']:g})": r["cs"], "samples": r["num_samples"],
                   "ignored": r["num_ignored"]})
    blocks.append("Age estimation\n" + report_lib.format_table(rows))
  for name, entry in (report.get("fas") or {}).items():
    blocks.append(_fas_text(name, report_lib.to_jsonable(entry)))
  return "\n\n".join(blocks) if blocks else "(no results)"


def _fas_text(name: str, entry: dict) -> str:
  """Overall and per-group FAS tables."""
  overall = report_lib.format_table([{
      "dataset": name, "age accuracy": entry["age_accuracy"],
      "identity preservation": entry["identity_preservation"],
      "samples": entry["num_samples"]}])
  per_group = report_lib.format_table([
      {"group": g["group"], "ages": g["label"], "count": g["count"],
       "age acc": g["age_accuracy"], "identity": g["identity_preservation"],
       "mean est. age": g.get("mean_estimated_age")} for g in entry["per_group"]])
  return f"Face age synthesis\n{overall}\n\nper target group\n{per_group}"


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
    files["roc"] = str(report_lib.plot_roc_curves(report["verification"],
                                                  output_dir / "roc.png"))
  report["files"] = {**report.get("files", {}), **files}
  Path(files["table"]).write_text(report_text(report) + "\n", encoding="utf-8")
  report_lib.write_json_report(report, files["json"])
  return files


def fas_entry(outcome: dict, age_model: str, identity_model: str, group_from: str) -> dict:
  """The report entry of :func:`face_age_synthesis`'s outcome."""
  return {**outcome["result"].to_dict(), "age_estimator": age_model,
          "identity_model": identity_model, "group_from": group_from,
          "grids": outcome["grids"]}


# --------------------------------------------------------------------------- #
# Everything on a synthetic dataset (used by the demo).
# --------------------------------------------------------------------------- #


def evaluate_synthetic(model, variables: Optional[dict] = None, config=None, *, data,
                       output_dir, batch_size: int = 64, flip: bool = True,
                       dtype: Optional[str] = None, num_fas_inputs: int = 16,
                       grid_rows: int = 8, group_from: str = "head",
                       progress: bool = False, eval_folds=None) -> dict[str, Any]:
  """Held-out verification, age estimation and FAS on a synthetic dataset.

  Args:
    model: a checkpoint path (training or converted), a
      :class:`~mtlface_jax.evaluation.loading.LoadedModel`, or
      ``MTLFaceModels`` (then pass ``variables`` and ``config``).
    variables: module name -> collections, with in-process ``models``.
    config: the training config, with in-process ``models``.
    data: ``mtlface_jax.synthetic.SyntheticFaces`` (its test split and pairs).
    output_dir: where report.json/report.txt/roc.png and the grid go.
    batch_size: images per device call.
    flip: flip-sum embeddings.
    dtype: compute dtype ("float32"/"bfloat16"); None keeps in-process models
      as built and loads checkpoints in float32.
    num_fas_inputs: test faces synthesized into every group (spread over the
      split); the FAS part runs only when the model has a generator.
    grid_rows: inputs per grid PNG (the first ``grid_rows`` inputs are drawn).
    group_from: "head" or "age", see :func:`estimate_age`.
    progress: show progress bars.
    eval_folds: fold labels of the synthetic pairs to evaluate (None: all).

  Returns:
    The JSON-ready report; its ``summary`` has ``verification_accuracy``
    (mean held-out fold accuracy), ``verification_accuracy_std``,
    ``verification_auc``, ``age_mae``, ``age_group_accuracy`` and, with a
    generator, ``fas_age_accuracy``, ``fas_identity_preservation`` and
    ``grid_png``.
  """
  loaded = as_loaded(model, variables, config, dtype)
  model_runner = inference.ModelRunner(loaded, batch_size=batch_size, flip=flip,
                                       progress=progress)
  report = new_report("synthetic", loaded.info,
                      {"batch_size": batch_size, "flip": flip, "group_from": group_from,
                       "num_fas_inputs": num_fas_inputs})
  test = datasets.from_synthetic("synthetic_test", data.test)
  summary = {}
  result = verify_synthetic(model_runner, data, eval_folds)
  add_result(report, "verification", "synthetic", result,
             {"source": "synthetic test pairs", "num_pairs": result.num_pairs})
  summary.update(verification_accuracy=result.accuracy_mean,
                 verification_accuracy_std=result.accuracy_std, verification_auc=result.auc)
  if "age" in loaded.variables:
    result = estimate_age(model_runner, test, group_from)
    add_result(report, "age", "synthetic_test", result, test.summary())
    summary.update(age_mae=result.mae, age_group_accuracy=result.group_accuracy)
  if "generator" in loaded.variables and num_fas_inputs > 0:
    inputs = test.spread(num_fas_inputs)
    outcome = face_age_synthesis(model_runner, inputs, model_runner, model_runner, output_dir,
                                 group_from, grid_rows, grid_faces=grid_rows)
    add_result(report, "fas", "synthetic_test",
               fas_entry(outcome, "checkpoint", "checkpoint", group_from), inputs.summary())
    summary.update(fas_age_accuracy=outcome["result"].age_accuracy,
                   fas_identity_preservation=outcome["result"].identity_preservation,
                   grid_png=outcome["grids"][0] if outcome["grids"] else None)
  report["summary"] = summary
  write_report(report, output_dir)
  return report_lib.to_jsonable(report)


def as_loaded(model, variables=None, config=None, dtype: Optional[str] = None
              ) -> loading.LoadedModel:
  """A LoadedModel from a path, a LoadedModel, or in-process models + variables."""
  if isinstance(model, loading.LoadedModel):
    return model
  if isinstance(model, (str, os.PathLike)):
    return loading.load_model(model, dtype or "float32")
  if variables is None or config is None:
    raise ValueError("in-process models need both variables and config")
  return loading.from_variables(model, variables, config, dtype)
