"""Scores a FAS checkpoint against the procedural faces' ground truth.

  PYTHONPATH=. python tools/fas_truth_eval.py --workdir=demo_out/fas \\
      [--num_inputs=64] [--grid=truth_grid.png] [--json=truth.json]

Reads the run's ``config.json`` for its synthetic dataset, synthesizes the
held-out inputs at every age group, and prints the truth metrics of
``mtlface_jax.evaluation.synthetic_truth`` (overall and per group) as JSON.
# SEAM: the lead wires this as ``eval.py --protocol=fas --synthetic`` and into
# evaluate_synthetic; this script uses today's loading/inference modules.
"""

import json
import time
from pathlib import Path

from absl import app
from absl import flags
import ml_collections
import numpy as np

_WORKDIR = flags.DEFINE_string("workdir", None, "FAS training workdir.", required=True)
_NUM_INPUTS = flags.DEFINE_integer("num_inputs", 64, "Held-out inputs (spread over the split).")
_GRID = flags.DEFINE_string("grid", "", "Write a grid PNG (synthesized rows over truth rows).")
_GRID_ROWS = flags.DEFINE_integer("grid_rows", 8, "Inputs in the grid.")
_JSON = flags.DEFINE_string("json", "", "Write the result JSON here too.")


def main(argv):
  del argv
  from mtlface_jax import ages as ages_lib  # pylint: disable=g-import-not-at-top
  from mtlface_jax import data_sources  # pylint: disable=g-import-not-at-top
  from mtlface_jax.evaluation import fas as fas_lib  # pylint: disable=g-import-not-at-top
  from mtlface_jax.evaluation import inference  # pylint: disable=g-import-not-at-top
  from mtlface_jax.evaluation import loading  # pylint: disable=g-import-not-at-top
  from mtlface_jax.evaluation import synthetic_truth  # pylint: disable=g-import-not-at-top
  start = time.time()
  workdir = Path(_WORKDIR.value)
  config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  data = data_sources.synthetic_for(config)
  loaded = loading.load_model(str(workdir))  # SEAM: predict.load(path)
  runner = inference.ModelRunner(loaded, batch_size=64, flip=True, progress=False)
  truth = synthetic_truth.build_truth_set(
      data.test, synthetic_truth.spread_indices(len(data.test), _NUM_INPUTS.value),
      runner.image_size, runner.num_groups)
  synthesized = runner.synthesize(truth.inputs)  # SEAM: predict.synthesize_all_groups
  result = synthetic_truth.score(truth, synthesized, embed=runner.embed)
  out = {"workdir": str(workdir), "step": loaded.info.get("step"), **result.to_dict(),
         "seconds": time.time() - start}
  if _GRID.value:
    # Rows spread over the inputs (consecutive inputs are often one identity).
    rows = synthetic_truth.spread_indices(len(truth.inputs), _GRID_ROWS.value)
    fas_lib.save_age_progression_grid(truth.inputs[rows], synthesized[rows], _GRID.value,
                                      ages_lib.group_ranges(runner.num_groups),
                                      truth=truth.truth[rows])
    out["grid"] = _GRID.value
  text = json.dumps(out, indent=2, default=float)
  if _JSON.value:
    Path(_JSON.value).write_text(text)
  print(text)
  gains = [g["truth_gain_region"] for g in result.per_group]
  print("truth_gain region %.3f image %.3f | per group %s | hair %.3f skin %.3f | id %.3f (input %.3f)"
        % (result.truth_gain_region, result.truth_gain_image,
           " ".join("-" if v is None else f"{v:.2f}" for v in gains),
           np.nan if result.hair_colour_progress is None else result.hair_colour_progress,
           np.nan if result.skin_colour_progress is None else result.skin_colour_progress,
           result.identity_to_truth, result.identity_input_to_truth))


if __name__ == "__main__":
  app.run(main)
