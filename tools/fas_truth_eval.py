"""Scores a FAS checkpoint against the procedural faces' ground truth.

  PYTHONPATH=. python tools/fas_truth_eval.py --workdir=demo_out/fas \\
      [--num_inputs=64] [--output_dir=truth_eval] [--step=N]

Reads the run's ``config.json`` for its synthetic dataset, synthesizes the
held-out inputs at every age group, and prints the truth metrics of
``mtlface_jax.evaluation.synthetic_truth`` (overall and per group) as JSON,
with ``fas_truth_grid_synthetic_test.png`` in ``--output_dir``.
The same scoring is in ``eval.py --protocol=fas --synthetic`` and the demo's
report (``recipes.heldout.evaluate_synthetic``); this tool scores any step of a
FAS run alone, e.g. while choosing FAS settings.
"""

import json
import time
from pathlib import Path

from absl import app
from absl import flags
import ml_collections

_WORKDIR = flags.DEFINE_string("workdir", None, "FAS training workdir.", required=True)
_NUM_INPUTS = flags.DEFINE_integer("num_inputs", 64, "Held-out inputs (spread over the split).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "", "Where the grid PNG goes ('' = none).")
_GRID_ROWS = flags.DEFINE_integer("grid_rows", 8, "Inputs in the grid.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")


def main(argv):
  del argv
  from mtlface_jax import data_sources  # pylint: disable=g-import-not-at-top
  from mtlface_jax import predict  # pylint: disable=g-import-not-at-top
  from mtlface_jax.evaluation import runner as runner_lib  # pylint: disable=g-import-not-at-top
  from mtlface_jax.evaluation import synthetic_truth  # pylint: disable=g-import-not-at-top
  start = time.time()
  workdir = Path(_WORKDIR.value)
  config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  data = data_sources.synthetic_for(config)
  loaded = predict.load(str(workdir), step=_STEP.value)
  runner = runner_lib.ModelRunner(loaded, batch_size=64, flip=True, progress=False)
  outcome = synthetic_truth.evaluate_truth(runner, data.test, _OUTPUT_DIR.value or None,
                                           num_inputs=_NUM_INPUTS.value,
                                           grid_rows=_GRID_ROWS.value)
  result = outcome["result"]
  print(json.dumps({"workdir": str(workdir), "step": loaded.info.get("step"),
                    **result.to_dict(), "grid": outcome["grid"],
                    "seconds": time.time() - start}, indent=2, default=float))
  fmt = lambda v: "-" if v is None else f"{v:.3f}"
  print("truth_gain region", fmt(result.truth_gain_region), "image", fmt(result.truth_gain_image),
        "| per group", " ".join(fmt(g["truth_gain_region"]) for g in result.per_group),
        "| hair", fmt(result.hair_colour_progress), "skin", fmt(result.skin_colour_progress),
        "| identity to truth", fmt(result.identity_to_truth),
        "(input", fmt(result.identity_input_to_truth) + ")")


if __name__ == "__main__":
  app.run(main)
