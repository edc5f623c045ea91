"""The one held-out evaluation of the recipes: verification, age, face age synthesis.

A recipe says what it held out (:class:`HeldOut`: a verification protocol,
faces with known ages, faces to age); :func:`evaluate` runs the protocols of
:mod:`mtlface_jax.evaluation.protocols` on a checkpoint or a training run's
variables and writes ``report.json``, ``report.txt``, ``roc.png`` and the
age-progression grid. :func:`synthetic_heldout` is the demo's held-out split
of the procedural faces; ``recipes.lfw_utkface`` builds the real-face one.
"""

import dataclasses
from typing import Any, Callable, Optional

from mtlface_jax.evaluation import datasets
from mtlface_jax.evaluation import protocols
from mtlface_jax.evaluation import report as report_lib
from mtlface_jax.evaluation import runner as runner_lib
from mtlface_jax.evaluation import synthetic_truth
from mtlface_jax.evaluation import verification


@dataclasses.dataclass
class HeldOut:
  """What a recipe evaluates on, and the names its report uses.

  Attributes:
    protocol: the report's ``protocol`` (e.g. "synthetic").
    verify: ``runner -> VerificationResult`` on the held-out pairs.
    verification_name: report key of that result.
    verification_source: its ``datasets`` entry (``num_pairs`` is added).
    age_faces: faces with known ages, or None.
    fas_faces: faces to synthesize into every age group, or None.
    summary_names: summary key prefixes for verification and age
      (``{prefix}_accuracy``, ``{prefix}_mae``, ...).
    truth_split: procedural faces whose true aged renderings exist
      (``synthetic.make_dataset(...).test``): FAS is also scored against them
      (``evaluation.synthetic_truth``); None for real faces.
    truth_inputs: how many of them are synthesized for that score.
  """
  protocol: str
  verify: Callable[[runner_lib.ModelRunner], verification.VerificationResult]
  verification_name: str
  verification_source: dict
  age_faces: Optional[datasets.FaceSet] = None
  fas_faces: Optional[datasets.FaceSet] = None
  summary_names: tuple[str, str] = ("verification", "age")
  truth_split: Any = None
  truth_inputs: int = 64


def evaluate(model, heldout: HeldOut, output_dir, *, variables: Optional[dict] = None,
             config=None, batch_size: int = 64, flip: bool = True,
             dtype: Optional[str] = None, grid_rows: int = 8, group_from: str = "head",
             progress: bool = False) -> dict[str, Any]:
  """Runs the held-out protocols and writes the report into ``output_dir``.

  Args:
    model: a checkpoint path, a ``predict.LoadedModel``, or anything (e.g.
      None) with ``variables`` and ``config`` of a training run.
    heldout: what to evaluate.
    output_dir: where report.json/report.txt/roc.png and the grid go.
    variables: a training run's variables (with ``config``).
    config: that run's config.
    batch_size: images per device call.
    flip: flip-average the encoding (``predict.encode``).
    dtype: compute dtype; None: float32 for checkpoints, the config's in-process.
    grid_rows: rows of the age-progression grid (its first inputs).
    group_from: "head" or "age" (``protocols.estimate_age``).
    progress: show progress bars.

  Returns:
    The JSON-ready report; ``summary`` has ``{v}_accuracy``,
    ``{v}_accuracy_std``, ``{v}_auc``, ``{a}_mae``, ``{a}_group_accuracy``
    (``v, a = heldout.summary_names``) and, with a generator,
    ``fas_age_accuracy``, ``fas_identity_preservation``, ``grid_png``.
  """
  loaded = protocols.as_loaded(model, variables, config, dtype)
  runner = runner_lib.ModelRunner(loaded, batch_size=batch_size, flip=flip, progress=progress)
  fas_count = len(heldout.fas_faces) if heldout.fas_faces is not None else 0
  report = report_lib.new_report(heldout.protocol, loaded.info,
                                 {"batch_size": batch_size, "flip": flip,
                                  "group_from": group_from, "num_fas_inputs": fas_count})
  v, a = heldout.summary_names
  result = heldout.verify(runner)
  report_lib.add_result(report, "verification", heldout.verification_name, result,
                        {**heldout.verification_source, "num_pairs": result.num_pairs})
  summary = {f"{v}_accuracy": result.accuracy_mean, f"{v}_accuracy_std": result.accuracy_std,
             f"{v}_auc": result.auc}
  if heldout.age_faces is not None and "age" in loaded.variables:
    age = protocols.estimate_age(runner, heldout.age_faces, group_from)
    report_lib.add_result(report, "age", heldout.age_faces.name, age,
                          heldout.age_faces.summary())
    summary.update({f"{a}_mae": age.mae, f"{a}_group_accuracy": age.group_accuracy})
  if fas_count and "generator" in loaded.variables:
    faces = heldout.fas_faces
    outcome = protocols.face_age_synthesis(runner, faces, runner, runner, output_dir,
                                           group_from, grid_rows, grid_faces=grid_rows)
    report_lib.add_result(report, "fas", faces.name,
                          report_lib.fas_entry(outcome, "checkpoint", "checkpoint", group_from),
                          faces.summary())
    summary.update(fas_age_accuracy=outcome["result"].age_accuracy,
                   fas_identity_preservation=outcome["result"].identity_preservation,
                   grid_png=outcome["grids"][0] if outcome["grids"] else None)
    if heldout.truth_split is not None:
      summary.update(_score_against_truth(runner, heldout, report, output_dir, grid_rows))
  report["summary"] = summary
  report_lib.write_report(report, output_dir)
  return report_lib.to_jsonable(report)


def _score_against_truth(runner, heldout: HeldOut, report: dict, output_dir,
                         grid_rows: int) -> dict:
  """The ground-truth FAS protocol (procedural faces); returns its summary entries."""
  truth = synthetic_truth.evaluate_truth(runner, heldout.truth_split, output_dir,
                                         num_inputs=heldout.truth_inputs, grid_rows=grid_rows)
  result = truth["result"]
  report_lib.add_result(report, "fas_truth", "synthetic_test",
                        {**result.to_dict(), "grid": truth["grid"]},
                        {"truth": "the same identities rendered at each group's centre age"})
  gains = [g["truth_gain_region"] for g in result.per_group
           if g.get("truth_gain_region") is not None]
  return {"fas_truth_gain_region": result.truth_gain_region,
          "fas_truth_gain_image": result.truth_gain_image,
          "fas_truth_gain_region_min_group": min(gains) if gains else None,
          "fas_hair_colour_progress": result.hair_colour_progress,
          "fas_identity_to_truth": result.identity_to_truth,
          "truth_grid_png": truth["grid"]}


def synthetic_heldout(data, num_fas_inputs: int = 16, eval_folds=None,
                      max_pairs_per_fold: Optional[int] = None) -> HeldOut:
  """The held-out split of the procedural faces (``synthetic.make_dataset``).

  Args:
    data: ``mtlface_jax.synthetic.SyntheticFaces``; its test identities were
      never trained on.
    num_fas_inputs: test faces (spread over the split) to synthesize.
    eval_folds: fold labels of the test pairs to evaluate (None: all).
    max_pairs_per_fold: keep only this many matched/mismatched pairs per fold.

  Returns:
    The :class:`HeldOut`: verification on the test pairs, age estimation on
    the test faces, FAS on ``num_fas_inputs`` of them.
  """
  test = datasets.from_synthetic("synthetic_test", data.test)
  return HeldOut(
      protocol="synthetic",
      verify=lambda runner: protocols.verify_synthetic(runner, data, eval_folds,
                                                       max_pairs_per_fold),
      verification_name="synthetic",
      verification_source={"source": "synthetic test pairs"},
      age_faces=test,
      fas_faces=test.spread(num_fas_inputs) if num_fas_inputs > 0 else None,
      truth_split=data.test if num_fas_inputs > 0 else None,
      truth_inputs=max(num_fas_inputs, 64))


def evaluate_synthetic(model, variables: Optional[dict] = None, config=None, *, data,
                       output_dir, num_fas_inputs: int = 16, eval_folds=None,
                       **options) -> dict[str, Any]:
  """:func:`evaluate` on :func:`synthetic_heldout` (the demo's evaluation).

  Args:
    model: see :func:`evaluate`.
    variables: see :func:`evaluate`.
    config: see :func:`evaluate`.
    data: the synthetic dataset.
    output_dir: where the report goes.
    num_fas_inputs: test faces synthesized into every group.
    eval_folds: fold labels of the test pairs to evaluate (None: all).
    **options: :func:`evaluate`'s keyword options.

  Returns:
    The report (``summary``: ``verification_accuracy``, ``age_mae``, ...).
  """
  heldout = synthetic_heldout(data, num_fas_inputs, eval_folds)
  return evaluate(model, heldout, output_dir, variables=variables, config=config, **options)
