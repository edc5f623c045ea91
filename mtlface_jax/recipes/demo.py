"""``make demo``: AIFR then FAS on the embedded synthetic faces, then evaluation.

Writes into ``--workdir``: ``aifr/`` and ``fas/`` runs (checkpoints, metrics
with the held-out verification of every ``eval_every`` AIFR steps,
TensorBoard, progression PNGs), ``eval/report.json`` (held-out verification,
age MAE, FAS age accuracy and identity preservation) and
``eval/fas_grid_synthetic_test_00.png`` (written by the evaluation).
"""

import json
import time
from pathlib import Path

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

# The CPU variant by default, as ``make demo`` (DEMO_CONFIG); on an accelerator
# pass --config=configs/default.py for the full IR-50 at 112x112.
_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py:cpu", "Demo config.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "demo_out", "Output directory.")
_SELECTIVE = flags.DEFINE_bool(
    "selective", False, "Then run the selective fine-tuning ablation (TPAMI) into "
    "WORKDIR/selective (config section `selective`; minutes more on a CPU).")


def run_demo(config, workdir: str | Path) -> dict:
  """Trains AIFR, then FAS from it, then evaluates on held-out identities.

  Args:
    config: a config like ``configs/default.py`` (``fas_num_iter`` steps of FAS).
    workdir: output directory.

  Returns:
    The evaluation report (also written to ``workdir/eval/report.json``).
  """
  from mtlface_jax import data_sources  # pylint: disable=g-import-not-at-top
  from mtlface_jax.recipes import heldout  # pylint: disable=g-import-not-at-top
  from mtlface_jax.recipes import stages  # pylint: disable=g-import-not-at-top
  workdir = Path(workdir)
  start = time.time()
  timings = stages.train_aifr_then_fas(config, workdir)
  report = heldout.evaluate_synthetic(str(workdir / "fas"), data=data_sources.synthetic_for(config),
                                      output_dir=workdir / "eval", progress=True)
  report["timings"] = {**timings, "total_s": time.time() - start}
  (workdir / "eval" / "report.json").write_text(json.dumps(report, indent=2, default=float))
  return report


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  report = run_demo(_CONFIG.value, _WORKDIR.value)
  print(json.dumps(report, indent=2, default=float))
  if _SELECTIVE.value:
    from mtlface_jax.recipes import selective  # pylint: disable=g-import-not-at-top
    from mtlface_jax.recipes import stages  # pylint: disable=g-import-not-at-top
    print(selective.brief(stages.selective_finetuning(_CONFIG.value, _WORKDIR.value)))


if __name__ == "__main__":
  app.run(main)
