"""The whole ``train.py`` loop against the pure jitted step (issue 7).

For one training config this measures, in one process and on the same devices:

* ``loop``: :func:`mtlface_jax.training.loop.train` as ``train.py`` runs it,
  with the real input pipeline (``data_sources.train_batches``), metric
  logging, TensorBoard and the final checkpoint. Its batch iterator is
  wrapped to time-stamp every request for a batch; the loop asks for batch
  ``s`` once step ``s - 2`` has finished on the device (it reads each step's
  ``nonfinite_streak`` one step late), so the stamps of the steady-state steps
  give the loop's throughput without touching its code. The first
  ``--warmup`` steps (compilation) are left out, and so is the last step,
  which ends in the checkpoint save.
* ``pure``: the loop's own jitted step (``loop.build_step``, handed to
  ``loop.train``, so already compiled), from a fresh state, on two
  device-resident batches of the same pipeline, for as many steps.
* ``input_pipeline``: the pipeline alone (decode/augment, no device work).

It prints one JSON line with the three images/s, ``loop_vs_pure`` (issue 7
wants >= 0.9 on the GPU), the fraction of the loop's time spent waiting for
batches, the device and the versions::

  python benchmarks/train_loop.py --config=configs/default.py --steps=60
  python benchmarks/train_loop.py --config=configs/aifr_scaf.py --config.batch_size=256 \\
      --image_folder=../shared/data/lfw/images --steps=60

``--image_folder`` trains on every image of a folder tree (identities from the
sub-folder names, taken modulo ``config.model.num_classes`` so the model stays
the configured one; ages unknown, so AIFR only) through a generated
``mtlface_list``. Periodic checkpoints, image grids and held-out evaluation
are switched off inside the measured steps (``checkpoint_every`` =
``--steps``, ``image_every`` = ``eval_every`` = 0): they are rare in a real
run and would dominate a short one.
"""

import json
import os
from pathlib import Path
import sys
import tempfile
import time

from absl import flags
from ml_collections import config_flags

_REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_REPO))


class TimedBatches:
  """A ``batches_fn`` that stamps when each batch is asked for and how long it took."""

  def __init__(self, batches_fn):
    self._batches_fn = batches_fn
    self.asked = []  # perf_counter() when the loop asked for batch i
    self.waited = []  # seconds the loop then waited for it

  def __call__(self, config, start_step: int):
    iterator = iter(self._batches_fn(config, start_step))
    while True:
      asked = time.perf_counter()
      try:
        batch = next(iterator)
      except StopIteration:
        return
      self.asked.append(asked)
      self.waited.append(time.perf_counter() - asked)
      yield batch

  def steady_state(self, warmup: int) -> tuple[float, int, float]:
    """(seconds, steps, fraction spent waiting for batches) after ``warmup`` steps."""
    last = len(self.asked) - 1
    if last - warmup < 1:
      raise ValueError(f"{len(self.asked)} steps leave none to time after {warmup} warm-up steps")
    seconds = self.asked[last] - self.asked[warmup]
    return seconds, last - warmup, sum(self.waited[warmup:last]) / seconds


def write_folder_list(folder: Path, list_file: Path, num_classes: int) -> int:
  """Writes an ``id path -1 -1`` list of every image under ``folder``; returns its length."""
  from benchmarks import input_pipeline as pipeline_bench  # pylint: disable=g-import-not-at-top
  records = pipeline_bench.folder_records(Path(folder))
  lines = []
  for path, identity, _, _ in records:
    if any(c.isspace() for c in path):
      raise ValueError(f"{path}: mtlface_list paths cannot hold whitespace")
    lines.append(f"{identity % num_classes} {Path(path).resolve()} -1 -1")
  list_file.write_text("\n".join(lines) + "\n")
  return len(lines)


def prepare_config(config, steps: int, workdir: Path, image_folder: str = ""):
  """The config of the measured run: ``steps`` steps, no periodic saves or grids."""
  config.num_iter = steps
  config.checkpoint_every = steps
  config.image_every = 0
  config.eval_every = 0
  config.init_from = ""
  if image_folder:
    config.data.name = "mtlface_list"
    config.data.mtlface_list.file = str(workdir / "folder_list.txt")
    config.data.mtlface_list.image_root = ""
    write_folder_list(Path(image_folder), Path(config.data.mtlface_list.file),
                      config.model.num_classes)
  return config


def input_pipeline_rate(config, num_batches: int, warmup: int = 2) -> float:
  """Images/s of the training pipeline alone (decode, augment, labels)."""
  from benchmarks import input_pipeline as pipeline_bench  # pylint: disable=g-import-not-at-top
  from mtlface_jax import data_sources  # pylint: disable=g-import-not-at-top
  batches = data_sources.train_batches(config, 0)
  try:
    seconds, count = pipeline_bench.measure(batches, num_batches, warmup)
  finally:
    batches.close()  # stops the pipeline's prefetching threads
  return count / seconds


def pure_step_rate(step_fn, num_steps: int, warmup: int) -> dict:
  """Times the loop's jitted step on two device-resident batches of its pipeline.

  Args:
    step_fn: the ``loop.TrainStep`` the loop ran (its program is already compiled).
    num_steps: timed steps.
    warmup: untimed steps first.

  Returns:
    ``{'seconds', 'steps', 'first_call_s'}``; ``first_call_s`` includes any compilation.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from mtlface_jax import data_sources  # pylint: disable=g-import-not-at-top
  from mtlface_jax.training import sharding  # pylint: disable=g-import-not-at-top
  config = step_fn.config
  # A fresh state as the loop makes one (the loop's own was donated).
  state = step_fn.create_state()
  source = data_sources.train_batches(config, 0)
  batches = [sharding.put_batch(next(source), step_fn.batch_sharding) for _ in range(2)]
  source.close()
  rng = jax.device_put(jax.random.PRNGKey(config.seed), step_fn.state_sharding)
  start = time.perf_counter()
  state, _ = step_fn(state, batches[0], rng)
  jax.block_until_ready(state)
  first_call_s = time.perf_counter() - start
  for i in range(1, warmup):
    state, _ = step_fn(state, batches[i % 2], rng)
  jax.block_until_ready(state)
  start = time.perf_counter()
  for i in range(num_steps):
    state, _ = step_fn(state, batches[i % 2], rng)
  jax.block_until_ready(state)
  return {"seconds": time.perf_counter() - start, "steps": num_steps,
          "first_call_s": first_call_s}


def measure(config, workdir: Path, *, steps: int, warmup: int, pipeline_batches: int,
            devices=None) -> dict:
  """Runs the pipeline alone, the whole loop and the pure step; returns the JSON fields.

  Args:
    config: a prepared training config (:func:`prepare_config`).
    workdir: an empty run directory for the loop.
    steps: loop steps (``config.num_iter``); ``steps - warmup - 1`` are timed.
    warmup: leading steps left out of the timing (compilation, first steps).
    pipeline_batches: batches timed for the pipeline alone.
    devices: the data-parallel devices (all by default, as ``train.py``).

  Returns:
    Images/s of the loop, the pure step and the pipeline, their ratio and details.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from mtlface_jax import data_sources  # pylint: disable=g-import-not-at-top
  from mtlface_jax.training import loop  # pylint: disable=g-import-not-at-top
  from mtlface_jax.training import sharding  # pylint: disable=g-import-not-at-top
  devices = devices or jax.devices()
  pipeline = input_pipeline_rate(config, pipeline_batches)
  timed = TimedBatches(data_sources.train_batches)
  step_fn = loop.build_step(config, sharding.make_mesh(devices))
  start = time.perf_counter()
  summary = loop.train(config, workdir, batches_fn=timed, step=step_fn)
  loop_total_s = time.perf_counter() - start
  loop_s, timed_steps, waiting = timed.steady_state(warmup)
  pure = pure_step_rate(step_fn, timed_steps, warmup)
  batch = config.batch_size
  loop_rate, pure_rate = timed_steps * batch / loop_s, timed_steps * batch / pure["seconds"]
  return {
      "loop_images_per_s": round(loop_rate, 2),
      "pure_step_images_per_s": round(pure_rate, 2),
      "loop_vs_pure": round(loop_rate / pure_rate, 4),
      "input_pipeline_images_per_s": round(pipeline, 2),
      "loop_ms_per_step": round(loop_s / timed_steps * 1e3, 3),
      "pure_ms_per_step": round(pure["seconds"] / timed_steps * 1e3, 3),
      "loop_input_wait_fraction": round(waiting, 4),
      "loop_total_s": round(loop_total_s, 1),
      "pure_first_call_s": round(pure["first_call_s"], 3),
      "steps": steps, "warmup_steps": warmup, "timed_steps": timed_steps,
      "final_step": summary["step"], "task": summary["task"],
      "batch_size": batch, "image_size": config.image_size, "dtype": config.dtype,
      "data": config.data.name, "log_every": config.log_every,
      "num_devices": len(devices), "host_cores": len(os.sched_getaffinity(0)),
  }


def _define_flags(flag_values: flags.FlagValues, argv: list[str]) -> None:
  # config_flags finds the --config.x=y overrides in the argv it is given here.
  config_flags.DEFINE_config_file("config", str(_REPO / "configs" / "default.py"),
                                  "Training config file.", flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  flags.DEFINE_integer("steps", 30, "Loop steps in all.", flag_values=flag_values)
  flags.DEFINE_integer("warmup", 5, "Leading steps not timed.", flag_values=flag_values)
  flags.DEFINE_integer("pipeline_batches", 20, "Batches timed for the pipeline alone.",
                       flag_values=flag_values)
  flags.DEFINE_string("image_folder", "", "Train on this image folder tree (e.g. LFW).",
                      flag_values=flag_values)
  flags.DEFINE_integer("num_devices", 0, "Devices of the mesh; 0 = all.", flag_values=flag_values)
  flags.DEFINE_string("workdir", "", "Run directory (a temporary one by default).",
                      flag_values=flag_values)
  flags.DEFINE_string("label", "", "Tag added to the result.", flag_values=flag_values)


def main(argv=None) -> dict:
  """Parses ``train.py``-style flags, measures, prints and returns one JSON object."""
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import train_throughput  # pylint: disable=g-import-not-at-top
  flag_values = flags.FlagValues()  # not absl's global FLAGS: main() can run in-process
  argv = sys.argv if argv is None else argv
  _define_flags(flag_values, argv)
  flag_values(argv)
  with tempfile.TemporaryDirectory() as tmp:
    workdir = Path(flag_values.workdir or tmp)
    config = prepare_config(flag_values.config, flag_values.steps, workdir,
                            flag_values.image_folder)
    devices = jax.devices()[:flag_values.num_devices or None]
    result = measure(config, workdir / "run", steps=flag_values.steps,
                     warmup=flag_values.warmup, pipeline_batches=flag_values.pipeline_batches,
                     devices=devices)
  result["config"] = flag_values["config"].config_filename
  result["image_folder"] = flag_values.image_folder
  result["environment"] = train_throughput.environment()
  if flag_values.label:
    result["label"] = flag_values.label
  print(json.dumps(result), flush=True)
  return result


if __name__ == "__main__":
  main()
