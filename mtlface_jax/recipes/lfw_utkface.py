"""The real-data recipe: train on LFW + UTKFace, evaluate on what was held out.

One command (README "Real faces")::

    python -m mtlface_jax.recipes.lfw_utkface --config=configs/real_lfw_utkface.py \
        --workdir=real_out

builds the shards if ``config.data.face_shards.dir`` has none
(:mod:`mtlface_jax.real_data`), trains AIFR then FAS
(:mod:`mtlface_jax.recipes.stages`; both resume), and writes
``workdir/eval/report.json`` / ``report.txt`` / ``roc.png`` and the
age-progression grid of 8 held-out faces (``--selective``: then the selective
fine-tuning ablation into ``workdir/selective``, ``recipes/selective.py``):

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
from mtlface_jax.evaluation import datasets
from mtlface_jax.evaluation import runner as runner_lib
from mtlface_jax.evaluation import verification
from mtlface_jax.recipes import heldout


def verify_heldout_lfw(model: runner_lib.ModelRunner,
                       shards: real_data.ShardSet) -> verification.VerificationResult:
  """The 10-fold protocol on LFW folds 6-10 only (thresholds from the other held-out folds)."""
  pairs = shards.heldout_pairs()
  used = np.unique(np.concatenate([pairs["index1"], pairs["index2"]]))
  embeddings = model.embed(datasets.array_faces(shards.images(used), model.image_size),
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
  return datasets.shard_face_set(shards, "heldout_faces", both)


def lfw_utkface_heldout(shards: real_data.ShardSet, num_fas_inputs: int = 128) -> heldout.HeldOut:
  """What the recipe holds out: LFW folds 6-10, UTKFace's 20%, faces of both to age."""
  utk = datasets.shard_face_set(shards, "utkface_heldout", shards.select("utkface", "heldout"))
  return heldout.HeldOut(
      protocol="real_lfw_utkface", verify=lambda runner: verify_heldout_lfw(runner, shards),
      verification_name="lfw_folds_6_10",
      verification_source={"source": f"{shards.root} LFW pairs of folds 6-10"},
      age_faces=utk,
      fas_faces=fas_inputs(shards, num_fas_inputs) if num_fas_inputs > 0 else None,
      summary_names=("lfw_heldout", "utkface_heldout"))


def evaluate(model, shards: real_data.ShardSet, output_dir, *, batch_size: int = 128,
             num_fas_inputs: int = 128, grid_faces: int = 8, dtype: Optional[str] = None,
             progress: bool = True) -> dict[str, Any]:
  """Held-out LFW verification, UTKFace age estimation and FAS (``heldout.evaluate``).

  Args:
    model: a checkpoint directory or a ``predict.LoadedModel``.
    shards: the prepared shards.
    output_dir: where report.json/report.txt/roc.png and the grid go.
    batch_size: images per device call.
    num_fas_inputs: held-out faces synthesized into every age group.
    grid_faces: rows of the age-progression grid (its first inputs).
    dtype: compute dtype; None loads checkpoints in float32.
    progress: show progress bars.

  Returns:
    The JSON-ready report; ``summary`` holds ``lfw_heldout_accuracy``,
    ``utkface_heldout_mae``, ``fas_age_accuracy``, ...
  """
  return heldout.evaluate(model, lfw_utkface_heldout(shards, num_fas_inputs), output_dir,
                          batch_size=batch_size, dtype=dtype, grid_rows=grid_faces,
                          progress=progress)


def run(config, workdir, *, progress: bool = True) -> dict[str, Any]:
  """Shards (if missing), AIFR, FAS and the held-out evaluation.

  Args:
    config: ``configs/real_lfw_utkface.py`` (or a variant of it).
    workdir: output directory; a re-run resumes the training stages.
    progress: show progress bars.

  Returns:
    The evaluation report with ``timings`` (also in ``workdir/eval/report.json``).
  """
  from mtlface_jax.recipes import stages  # pylint: disable=g-import-not-at-top
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
  if _SELECTIVE.value:
    from mtlface_jax.recipes import selective  # pylint: disable=g-import-not-at-top
    from mtlface_jax.recipes import stages  # pylint: disable=g-import-not-at-top
    print(selective.brief(stages.selective_finetuning(_CONFIG.value, _WORKDIR.value)))


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/real_lfw_utkface.py",
                                            "Recipe config.", lock_config=True)
  _WORKDIR = flags.DEFINE_string("workdir", "real_out", "Output directory.")
  _SELECTIVE = flags.DEFINE_bool(
      "selective", False, "Then run the selective fine-tuning ablation (TPAMI) into "
      "WORKDIR/selective (config section `selective`, docs/selective_finetuning.md).")
  app.run(main)
