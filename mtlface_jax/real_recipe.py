"""The real-data recipe: train on LFW + UTKFace, evaluate on what was held out.

One command (README "Real faces")::

    python -m mtlface_jax.real_recipe --config=configs/real_lfw_utkface.py \
        --workdir=real_out

builds the shards if ``config.data.face_shards.dir`` has none
(:mod:`mtlface_jax.real_data`), trains AIFR then FAS
(:mod:`mtlface_jax.training.stages`; both resume), and writes
``workdir/eval/report.json`` / ``report.txt`` / ``roc.png`` and the
age-progression grid of 8 held-out faces:

  * verification on LFW folds 6-10 (people never trained on), the 10-fold
    protocol restricted to those 5 folds: each fold's threshold is chosen on
    the other 4 held-out folds;
  * age MAE, group accuracy and CS(5) on the held-out 20% of UTKFace;
  * face age synthesis on held-out faces (half LFW folds 6-10, half UTKFace):
    age accuracy by the checkpoint's own age estimator and identity
    preservation by its own encoder.
"""

import json
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from mtlface_jax import real_data
from mtlface_jax.evaluation import inference
from mtlface_jax.evaluation import protocols
from mtlface_jax.evaluation import report as report_lib
from mtlface_jax.evaluation import verification


def verify_heldout_lfw(model: inference.ModelRunner,
                       shards: real_data.ShardSet) -> verification.VerificationResult:
  """The 10-fold protocol on LFW folds 6-10 only (thresholds from the other held-out folds)."""
  pairs = shards.heldout_pairs()
  used = np.unique(np.concatenate([pairs["index1"], pairs["index2"]]))
  embeddings = model.embed(inference.array_faces(shards.images(used), model.image_size),
                           total=len(used), description="LFW folds 6-10")
  first, second = np.searchsorted(used, pairs["index1"]), np.searchsorted(used, pairs["index2"])
  return verification.evaluate_verification(pairs["issame"], embeddings[first],
                                            embeddings[second], folds=pairs["fold"],
                                            eval_folds=real_data.HELDOUT_FOLDS)


def fas_inputs(shards: real_data.ShardSet, count: int):
  """``count`` held-out faces, alternating LFW folds 6-10 and UTKFace.

  Alternating puts both kinds of photograph into the first grid rows.
  """
  lfw = shards.select("lfw", "heldout")
  utk = shards.select("utkface", "heldout")
  half = max(1, count // 2)
  spread = lambda idx: idx[np.unique(np.linspace(0, len(idx) - 1, half).round().astype(int))]
  lfw, utk = spread(lfw), spread(utk)
  k = min(len(lfw), len(utk))
  both = np.concatenate([np.column_stack([lfw[:k], utk[:k]]).ravel(), lfw[k:], utk[k:]])
  return shards.face_set("heldout_faces", both)


def evaluate(model, shards: real_data.ShardSet, output_dir, *, batch_size: int = 128,
             num_fas_inputs: int = 128, grid_faces: int = 8, dtype: Optional[str] = None,
             progress: bool = True) -> dict[str, Any]:
  """Held-out LFW verification, UTKFace age estimation and FAS.

  Args:
    model: a checkpoint directory or an ``evaluation.loading.LoadedModel``.
    shards: the prepared shards.
    output_dir: where report.json/report.txt/roc.png and the grid go.
    batch_size: images per device call.
    num_fas_inputs: held-out faces synthesized into every age group.
    grid_faces: rows of the age-progression grid (its first inputs).
    dtype: compute dtype; None loads checkpoints in float32.
    progress: show progress bars.

  Returns:
    The JSON-ready report; ``summary`` holds the headline numbers.
  """
  loaded = protocols.as_loaded(model, dtype=dtype)
  runner = inference.ModelRunner(loaded, batch_size=batch_size, flip=True, progress=progress)
  report = protocols.new_report("real_lfw_utkface", loaded.info,
                                {"batch_size": batch_size, "flip": True,
                                 "num_fas_inputs": num_fas_inputs, "shards": str(shards.root)})
  result = verify_heldout_lfw(runner, shards)
  protocols.add_result(report, "verification", "lfw_folds_6_10", result,
                       {"source": f"{shards.root} LFW pairs of folds 6-10",
                        "num_pairs": result.num_pairs})
  summary = {"lfw_heldout_accuracy": result.accuracy_mean,
             "lfw_heldout_accuracy_std": result.accuracy_std, "lfw_heldout_auc": result.auc}
  utk = shards.face_set("utkface_heldout", shards.select("utkface", "heldout"))
  age = protocols.estimate_age(runner, utk)
  protocols.add_result(report, "age", "utkface_heldout", age, utk.summary())
  summary.update(utkface_heldout_mae=age.mae, utkface_heldout_group_accuracy=age.group_accuracy)
  if "generator" in loaded.variables and num_fas_inputs > 0:
    faces = fas_inputs(shards, num_fas_inputs)
    outcome = protocols.face_age_synthesis(runner, faces, runner, runner, output_dir,
                                           grid_rows=grid_faces, grid_faces=grid_faces)
    protocols.add_result(report, "fas", "heldout_faces",
                         protocols.fas_entry(outcome, "checkpoint", "checkpoint", "head"),
                         faces.summary())
    summary.update(fas_age_accuracy=outcome["result"].age_accuracy,
                   fas_identity_preservation=outcome["result"].identity_preservation,
                   grid_png=outcome["grids"][0] if outcome["grids"] else None)
  report["summary"] = summary
  protocols.write_report(report, output_dir)
  return report_lib.to_jsonable(report)


def run(config, workdir, *, progress: bool = True) -> dict[str, Any]:
  """Shards (if missing), AIFR, FAS and the held-out evaluation.

  Args:
    config: ``configs/real_lfw_utkface.py`` (or a variant of it).
    workdir: output directory; a re-run resumes the training stages.
    progress: show progress bars.

  Returns:
    The evaluation report with ``timings`` (also in ``workdir/eval/report.json``).
  """
  from mtlface_jax.training import stages  # pylint: disable=g-import-not-at-top
  start, workdir = time.time(), Path(workdir)
  data = config.data.face_shards
  if not (Path(data.dir) / real_data.MANIFEST).is_file():
    real_data.prepare(data.lfw_dir, data.utkface_dir, data.dir, seed=data.split_seed,
                      train_fraction=data.utkface_train_fraction, progress=progress)
  timings = {"prepare_s": time.time() - start}
  shards = real_data.ShardSet(data.dir)
  timings.update(stages.train_aifr_then_fas(config, workdir))
  before_eval = time.time()
  report = evaluate(str(workdir / "fas"), shards, workdir / "eval", progress=progress)
  report["timings"] = {**timings, "eval_s": time.time() - before_eval,
                       "total_s": time.time() - start}
  (workdir / "eval" / "report.json").write_text(json.dumps(report, indent=2, default=float))
  return report


def main(argv):
  del argv
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  report = run(_CONFIG.value, _WORKDIR.value)
  print(json.dumps({"summary": report["summary"], "timings": report["timings"]}, indent=2))


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/real_lfw_utkface.py",
                                            "Recipe config.", lock_config=True)
  _WORKDIR = flags.DEFINE_string("workdir", "real_out", "Output directory.")
  app.run(main)
