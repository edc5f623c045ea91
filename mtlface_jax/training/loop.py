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
from mtlface_jax.training import run_config
from mtlface_jax.training import sharding
from mtlface_jax.training import state as state_lib
from mtlface_jax.training import steps
from mtlface_jax.training import tpami_steps
from mtlface_jax.training import transfer
from mtlface_jax.training import writers

BatchesFn = Callable[..., Iterator[dict]]


class NonFiniteLossError(FloatingPointError):
  """Raised after ``max_consecutive_nonfinite`` skipped steps in a row."""


# Errors the user can act on from their message alone: train.py prints them
# as one ``train.py: error:`` line (exit 1) instead of a traceback.
USER_ERRORS = (NonFiniteLossError, run_config.ResumeConfigError,
               transfer.VariableMismatchError, checkpoint_io.CheckpointError, OSError)


def user_errors() -> tuple[type, ...]:
  """:data:`USER_ERRORS` plus the input pipeline's bad-example error (imports TensorFlow)."""
  from mtlface_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  return USER_ERRORS + (input_pipeline.BadExampleError,)


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
    models: the :class:`~mtlface_jax.models.spec.MTLFaceModels`.
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
  spec = spec_lib.from_config(config)
  models = spec_lib.build(spec, config.dtype)
  txs = optim.optimizers_from_config(config)
  # The TPAMI StyleGAN2 FAS has its own step (same signature); everything else,
  # AIFR of a TPAMI-family encoder included, is steps.py's (tpami_steps refuses
  # train_fr, so joint MTL of that family still fails there with its message).
  tpami_fas = spec.family == "tpami" and config.train_fas
  make_step = tpami_steps.make_train_step if tpami_fas else steps.make_train_step
  fn = make_step(models, config, fr_tx=txs.fr, g_tx=txs.g, d_tx=txs.d,
                 state_sharding=sharding.replicated(mesh),
                 batch_sharding=sharding.batch_sharded(mesh))
  return TrainStep(config=config, models=models, mesh=mesh, txs=txs, fn=fn)


def load_pretrained(state: state_lib.TrainState, path: str, mesh,
                    config=None) -> state_lib.TrainState:
  """Copies every checkpoint variable whose path and shape match this model.

  Used to start FAS from a finished AIFR run or to fine-tune on a new dataset
  (``config.init_from``): modules present in both runs are taken variable by
  variable; paths in ``config.init_from_exclude`` (e.g. ``("head",)`` for a
  new ``model.num_classes``) keep their fresh initialisation; optimizer
  states start fresh.

  Raises:
    transfer.VariableMismatchError: a shared variable that is missing or of
      another shape and not excluded, naming it, both shapes and the config
      key that decides it.
    checkpoint_io.CheckpointError: a checkpoint without encoder variables
      (unless excluded).
  """
  exclude = tuple(config.get("init_from_exclude", ())) if config is not None else ()
  # Only the variables are read: the source run's optimizer states stay on disk.
  source, meta, step = checkpoint_io.restore_variables(path)
  what = f"init_from {path} (step {step})"
  target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                  dict(state.variables))
  taken, kept, ignored = transfer.match_variables(
      target, source, exclude, config, transfer.source_config_of(meta), what)
  if not any(p.startswith("encoder/") for p in taken) and not transfer.matches_exclude(
      "encoder/params", exclude):
    raise checkpoint_io.CheckpointError(f"{what}: checkpoint has no encoder variables")
  flat = transfer.flatten(dict(state.variables))
  flat.update({p: sharding.replicate(v.astype(flat[p].dtype), mesh) for p, v in taken.items()})
  modules = sorted({p.split("/")[0] for p in taken})
  logging.warning("%s: loaded %d variables of %s; %d freshly initialised%s", what, len(taken),
                  ", ".join(modules), len(kept),
                  f"; {len(ignored)} excluded checkpoint variables unused" if ignored else "")
  return state.replace(variables=transfer.unflatten(flat))


# Exit status of train.py when a run was stopped by SIGTERM or SIGINT after
# saving its state: "preempted, resume me" (sysexits.h EX_TEMPFAIL). A retry
# loop resumes while the status is 75 and stops on 0 (finished) or anything
# else (an error, already printed).
EXIT_PREEMPTED = 75
EXIT_FINISHED = 0
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# A stop requested before the loop's own handlers are installed (train.py
# catches signals from its start: compiling can take minutes).
_PENDING_STOP: list[str] = []


def request_stop(signal_name: str) -> None:
  """Asks the next (or running) training loop to save after its step and stop.

  train.py's early signal handler calls this, so a SIGTERM during start-up
  (restoring, compiling) still ends in a saved step and exit 75.
  """
  _PENDING_STOP.append(signal_name)


def early_stop_handler(signum, frame) -> None:
  """A signal handler for start-up: the first signal requests a stop, a second interrupts."""
  del frame
  if _PENDING_STOP:
    for sig in _STOP_SIGNALS:
      signal.signal(sig, signal.SIG_DFL if sig == signal.SIGTERM else signal.default_int_handler)
    raise KeyboardInterrupt(f"second {signal.Signals(signum).name} during start-up")
  logging.warning("%s during start-up: will save after the first step and stop (send again to "
                  "stop at once)", signal.Signals(signum).name)
  request_stop(signal.Signals(signum).name)


@contextlib.contextmanager
def _stop_flag():
  """Turns SIGTERM (preemption) and SIGINT (Ctrl-C) into a flag checked after each step.

  The loop then saves and stops. A second signal of either kind restores the
  default handlers and interrupts at once (a user pressing Ctrl-C twice).
  """
  flag = {"stop": _PENDING_STOP.pop() if _PENDING_STOP else None}
  _PENDING_STOP.clear()
  previous = {sig: signal.getsignal(sig) for sig in _STOP_SIGNALS}

  def handler(signum, frame):
    del frame
    if flag["stop"] is not None:
      for sig, old in previous.items():
        signal.signal(sig, old)
      raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping without saving")
    flag["stop"] = signal.Signals(signum).name
    logging.warning("%s: saving and stopping after this step (send again to stop at once)",
                    flag["stop"])

  for sig in _STOP_SIGNALS:
    signal.signal(sig, handler)
  try:
    yield flag
  finally:
    for sig, old in previous.items():
      signal.signal(sig, old)


def exit_code(summary: dict) -> int:
  """train.py's exit status for a summary of :func:`train`: 75 if preempted, else 0."""
  return EXIT_PREEMPTED if summary.get("preempted") else EXIT_FINISHED


def resume(ckpt: checkpoint_lib.Checkpointer, state: state_lib.TrainState,
           config) -> state_lib.TrainState:
  """Restores the latest intact checkpoint, refusing one written with another computation.

  Raises:
    run_config.ResumeConfigError: the checkpoint's config differs in keys
      that change the computation (unless ``resume_config_change="allow"``).
    transfer.VariableMismatchError: its shapes do not fit this model.
  """

  def check(meta, step):
    saved = transfer.source_config_of(meta)
    if saved is not None:
      run_config.check_resume(saved, config, step)

  state, _ = ckpt.restore(state, check_meta=check, config=config)
  logging.info("resumed from step %d", int(state.step))
  return state


def _write_grid(writer, models, state, config, images, step):
  """Logs an age-progression grid of the fixed preview images."""
  fn = predict.jitted_all_groups(models, config.age_group)
  synthesized = fn(spec_lib.inference_variables(dict(state.variables)), images)
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
    'checkpoint', 'images_per_s', 'preempted', 'signal', 'skipped'}``:
    ``last_eval`` holds the last held-out verification (``config.eval_every``,
    :mod:`mtlface_jax.training.eval_hook`); ``preempted`` is True when
    SIGTERM/SIGINT stopped the run early after saving (train.py exits
    :data:`EXIT_PREEMPTED`); ``skipped`` holds the data's skipped examples
    (``count``, ``ok``, ``first``).

  Raises:
    NonFiniteLossError: after ``config.max_consecutive_nonfinite`` skipped
      steps in a row; the last good checkpoint stays on disk.
    run_config.ResumeConfigError: a resume whose config changes the
      computation (see :mod:`mtlface_jax.training.run_config`).
    transfer.VariableMismatchError: ``init_from`` or a resumed checkpoint
      whose variables do not fit this model.
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
    state = resume(ckpt, state, config)
  elif config.init_from:
    state = load_pretrained(state, config.init_from, step.mesh, config)
  resumed = int(state.step) if ckpt.latest_step() is not None else None
  if jax.process_index() == 0:
    run_config.record_start(workdir, config, resumed)
  writer = writers.MetricWriter(workdir, start_step=int(state.step))
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
  skipped = _record_skips(getattr(batches, "report", None), writer, start)
  batch_sharding = step_fn.batch_sharding
  progress = writers.Progress(start, config.num_iter, config.batch_size, _task_name(config))
  preview = None
  pending = None  # (step, metrics) of the previous iteration, read one step late.
  last, last_eval = {}, {}
  meta = lambda step: {"step": step, "data_position": step, "task": _task_name(config),
                       "config": config.to_json()}
  with _stop_flag() as stop:
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
      if done % config.checkpoint_every == 0 or done == config.num_iter or stop["stop"]:
        ckpt.save(done, state, meta(done))
      if stop["stop"]:
        logging.warning("%s: saved step %d and stopping", stop["stop"], done)
        break
    if pending is not None:
      last = _check_and_log(pending, config, writer, progress, ckpt)
  progress.close()
  return {"step": int(state.step), "task": _task_name(config),
          "nonfinite_total": int(state.nonfinite_total), "last_metrics": last,
          "last_eval": last_eval, "checkpoint": str(ckpt.directory),
          "images_per_s": progress.images_per_s,
          "preempted": stop["stop"] is not None and int(state.step) < config.num_iter,
          "signal": stop["stop"], "skipped": skipped}


def _record_skips(report, writer, start: int) -> dict:
  """Puts the data's skipped examples in the workdir, metrics and the summary."""
  if report is None:
    return {"count": 0, "ok": None, "first": []}
  summary = writer.write_skipped(start, report)
  if summary["count"]:
    logging.warning("data: %d examples skipped (%d kept); see %s", summary["count"],
                    summary["ok"], writer.workdir / "skipped.jsonl")
  return summary


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
