"""The training loop behind ``train.py``: AIFR, FAS or both, resumable.

The loop owns everything stateful and impure (data iterators, checkpoints,
writers, signals); the jitted step stays a pure function of
``(state, batch, rng)``, built once by :func:`build_step` (which benchmarks
call to time the very program the loop runs). Metrics of step s are read
after step s+1 has been dispatched so the host never stalls the device.
Every ``config.eval_every`` steps :mod:`mtlface_jax.training.eval_hook`
scores held-out verification sets with the current encoder.
"""

import contextlib
import dataclasses
import logging
import signal
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import jax
import numpy as np

from mtlface_jax import batch as batch_lib
from mtlface_jax import checkpoint_io
from mtlface_jax import predict
from mtlface_jax.models import spec as spec_lib
from mtlface_jax.training import checkpoint as checkpoint_lib
from mtlface_jax.training import eval_hook
from mtlface_jax.training import optim
from mtlface_jax.training import sharding
from mtlface_jax.training import state as state_lib
from mtlface_jax.training import steps
from mtlface_jax.training import writers

BatchesFn = Callable[..., Iterator[dict]]


class NonFiniteLossError(FloatingPointError):
  """Raised after ``max_consecutive_nonfinite`` skipped steps in a row."""


def _task_name(config) -> str:
  return {(True, False): "aifr", (False, True): "fas", (True, True): "mtl"}[
      (bool(config.train_fr), bool(config.train_fas))]


@dataclasses.dataclass(frozen=True, eq=False)
class TrainStep:
  """The loop's jitted step and what it was built from (:func:`build_step`).

  Calling it runs one step: ``(state, batch, rng) -> (state, metrics)`` with the
  state donated. Benchmarks and tests time or trace this very program
  (``step.fn.trace(...)``, ``step.fn.lower(...)``) instead of rebuilding it.

  Attributes:
    config: the training config.
    models: the :class:`~mtlface_jax.models.mtlface.MTLFaceModels`.
    mesh: the data-parallel mesh.
    txs: the optimizers (one per trained task).
    fn: the jitted ``steps.train_step`` (donated state, explicit shardings).
  """
  config: Any
  models: Any
  mesh: jax.sharding.Mesh
  txs: optim.Optimizers
  fn: Callable

  def __call__(self, state, batch, rng):
    return self.fn(state, batch, rng)

  @property
  def state_sharding(self):
    return sharding.replicated(self.mesh)

  @property
  def batch_sharding(self):
    return sharding.batch_sharded(self.mesh)

  def initial_state(self, rng) -> state_lib.TrainState:
    """A fresh state (pure: jit it, or ``jax.eval_shape`` it for shapes)."""
    variables = state_lib.init_variables(self.models, self.config, rng)
    return state_lib.init_state(variables, self.config, *self.txs)

  def create_state(self) -> state_lib.TrainState:
    """The run's initial state, built on the devices and replicated (jitted)."""
    init_rng = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), 0)
    return jax.jit(self.initial_state, out_shardings=self.state_sharding)(init_rng)


def build_step(config, mesh: jax.sharding.Mesh) -> TrainStep:
  """Builds the models, the optimizers and the jitted step of ``config`` on ``mesh``.

  Args:
    config: a training config.
    mesh: from ``sharding.make_mesh``.

  Returns:
    The :class:`TrainStep` that :func:`train` runs.
  """
  models = spec_lib.build_from_config(config)
  txs = optim.optimizers_from_config(config)
  fn = steps.make_train_step(models, config, fr_tx=txs.fr, g_tx=txs.g, d_tx=txs.d,
                             state_sharding=sharding.replicated(mesh),
                             batch_sharding=sharding.batch_sharded(mesh))
  return TrainStep(config=config, models=models, mesh=mesh, txs=txs, fn=fn)


def load_pretrained(state: state_lib.TrainState, path: str, mesh) -> state_lib.TrainState:
  """Copies encoder/age (and any other matching module) variables from a checkpoint.

  Used to start FAS from a finished AIFR run (``config.init_from``): only the
  modules present in both runs are taken; optimizer states start fresh.
  """
  # Only the variables are read: the AIFR run's optimizer states stay on disk.
  source, _, _ = checkpoint_io.restore_variables(path)
  variables = dict(state.variables)
  taken = []
  for name in variables:
    if name in source:
      expected = jax.tree_util.tree_structure(variables[name])
      got = jax.tree_util.tree_map(np.asarray, source[name])
      if jax.tree_util.tree_structure(got) != expected:
        raise ValueError(f"init_from {path}: module {name!r} does not match this config's model")
      variables[name] = sharding.replicate(got, mesh)
      taken.append(name)
  if "encoder" not in taken:
    raise ValueError(f"init_from {path}: checkpoint has no encoder variables")
  logging.info("init_from %s: loaded %s", path, ", ".join(taken))
  return state.replace(variables=variables)


@contextlib.contextmanager
def _sigterm_flag():
  """Turns SIGTERM (preemption) into a flag the loop checks after each step."""
  flag = {"stop": False}

  def handler(signum, frame):
    del signum, frame
    flag["stop"] = True

  previous = signal.signal(signal.SIGTERM, handler)
  try:
    yield flag
  finally:
    signal.signal(signal.SIGTERM, previous)


def _write_grid(writer, models, state, config, images, step):
  """Logs an age-progression grid of the fixed preview images."""
  fn = predict.jitted_all_groups(models, config.age_group)
  synthesized = fn(state.variables, images)
  grid = predict.progression_grid(np.asarray(images), np.asarray(synthesized))
  writer.write_image(step, "fas/age_progression", grid,
                     writer.workdir / "images" / f"progression_{step:07d}.png")


def train(config, workdir: str | Path, batches_fn: Optional[BatchesFn] = None,
          devices: Optional[list] = None, step: Optional[TrainStep] = None) -> dict:
  """Runs (or resumes) training as configured and returns a summary.

  Args:
    config: a training ConfigDict (``configs/*.py``).
    workdir: run directory (checkpoints, metrics, images, TensorBoard).
    batches_fn: ``(config, start_step) -> iterator of numpy batches`` holding
      this process's share of each global batch (``mtlface_jax.batch``);
      defaults to :func:`mtlface_jax.data_sources.train_batches`.
    devices: devices of the data-parallel mesh (all devices by default).
    step: a :class:`TrainStep` of ``config`` already built (e.g. by a
      benchmark that then times the same program); its mesh is used and
      ``devices`` must be None.

  Returns:
    ``{'step', 'task', 'nonfinite_total', 'last_metrics', 'last_eval',
    'checkpoint', 'images_per_s'}``; ``last_eval`` holds the last held-out
    verification (``config.eval_every``, :mod:`mtlface_jax.training.eval_hook`).

  Raises:
    NonFiniteLossError: after ``config.max_consecutive_nonfinite`` skipped
      steps in a row; the last good checkpoint stays on disk.
  """
  if batches_fn is None:
    from mtlface_jax import data_sources  # pylint: disable=g-import-not-at-top
    batches_fn = data_sources.train_batches
  if step is not None and devices is not None:
    raise ValueError("pass devices or a built step (which has its mesh), not both")
  workdir = Path(workdir)
  step = step or build_step(config, sharding.make_mesh(devices))
  sharding.check_batch_divisible(config.batch_size, step.mesh)
  # Reads and checks the held-out sets now, so a bad path fails before step 1.
  hook = eval_hook.from_config(config, step.models, step.mesh)
  state = step.create_state()
  ckpt = checkpoint_lib.Checkpointer(workdir / "checkpoints", keep=config.keep_checkpoints)
  if ckpt.latest_step() is not None:
    state, _ = ckpt.restore(state)
    logging.info("resumed from step %d", int(state.step))
  elif config.init_from:
    state = load_pretrained(state, config.init_from, step.mesh)
  writer = writers.MetricWriter(workdir)
  writer.write_hparams(config.to_dict())
  try:
    return _run(config, state, step, batches_fn, ckpt, writer, hook)
  finally:
    ckpt.wait()
    ckpt.close()
    writer.close()


def _run(config, state, step_fn: TrainStep, batches_fn, ckpt, writer, hook) -> dict:
  models, mesh = step_fn.models, step_fn.mesh
  start = int(state.step)
  local_rows = config.batch_size // jax.process_count()
  rng = jax.device_put(jax.random.fold_in(jax.random.PRNGKey(config.seed), 1),
                       sharding.replicated(mesh))
  batches = batches_fn(config, start)
  batch_sharding = sharding.batch_sharded(mesh)
  progress = writers.Progress(start, config.num_iter, config.batch_size, _task_name(config))
  preview = None
  pending = None  # (step, metrics) of the previous iteration, read one step late.
  last, last_eval = {}, {}
  meta = lambda step: {"step": step, "data_position": step, "task": _task_name(config),
                       "config": config.to_json()}
  with _sigterm_flag() as sigterm:
    for step in range(start, config.num_iter):
      batch = next(batches)
      if step == start:  # A clear error, not a shape error deep in the step.
        batch_lib.check(batch, config, rows=local_rows)
      if preview is None and config.train_fas and config.image_every:
        preview = sharding.replicate(np.asarray(batch["image"][:8]), mesh)
      state, metrics = step_fn(state, sharding.put_batch(batch, batch_sharding), rng)
      if pending is not None:
        last = _check_and_log(pending, config, writer, progress, ckpt)
      pending = (step + 1, metrics)
      done = step + 1
      if preview is not None and done % config.image_every == 0:
        _write_grid(writer, models, state, config, preview, done)
      if hook is not None and hook.due(done):
        last_eval = hook(state.variables, done)
        writer.write_scalars(done, last_eval)
      if done % config.checkpoint_every == 0 or done == config.num_iter or sigterm["stop"]:
        ckpt.save(done, state, meta(done))
      if sigterm["stop"]:
        logging.warning("SIGTERM: saved step %d and stopping", done)
        break
    if pending is not None:
      last = _check_and_log(pending, config, writer, progress, ckpt)
  progress.close()
  return {"step": int(state.step), "task": _task_name(config),
          "nonfinite_total": int(state.nonfinite_total), "last_metrics": last,
          "last_eval": last_eval, "checkpoint": str(ckpt.directory),
          "images_per_s": progress.images_per_s}


def _check_and_log(pending, config, writer, progress, ckpt) -> dict:
  """Fails on too many non-finite steps in a row; logs every ``log_every`` steps."""
  step, metrics = pending
  streak = int(metrics["nonfinite_streak"])
  if streak:
    logging.warning("step %d: non-finite loss, update skipped (%d in a row)", step, streak)
  if streak >= config.max_consecutive_nonfinite:
    ckpt.wait()
    raise NonFiniteLossError(
        f"{streak} consecutive non-finite losses up to step {step}; stopping. The last good "
        f"checkpoint is step {ckpt.latest_step()} in {ckpt.directory}")
  if step % config.log_every and step != config.num_iter:
    return {}
  values = {k: float(v) for k, v in jax.device_get(metrics).items()}
  values["images_per_s"] = progress.update(step, {"loss": f"{values.get('fr/loss', values.get('fas/g_loss', 0)):.3f}"})
  writer.write_scalars(step, values)
  return values
