"""orbax checkpoints of the training state, with metadata and safe resume.

Each checkpoint holds the whole :class:`TrainState` (``state``) and a JSON
``meta`` item (config, step, data position). Reading only the variables or the
metadata of any checkpoint (for evaluation, export, ``init_from``) is
:mod:`mtlface_jax.checkpoint_io`. orbax writes into a temporary
directory and renames it when complete, so a crash or SIGKILL during a save
leaves the previous checkpoint as the latest usable one.

Restoring the latest checkpoint falls back to the previous intact step when
the newest one cannot be read (a truncated file, lost metadata): the broken
step is moved to ``<workdir>/broken_checkpoints/`` and named in a warning.
A checkpoint whose shapes do not fit the model is an error naming the
parameter and the config key, not a fallback.
"""

import asyncio
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp

from mtlface_jax.training import transfer

BROKEN_DIR = "broken_checkpoints"
# Test hook (fault injection): "STEP:SECONDS" makes the asynchronous save of
# every step >= STEP wait SECONDS before its atomic rename, so a test can
# SIGKILL the process while a save is in flight. Never set in real runs.
SAVE_DELAY_ENV = "MTLFACE_TEST_SAVE_DELAY"


def _slow_finalize_class(spec: str):
  """A temporary-path class whose finalize (the commit rename) waits as ``spec`` says."""
  first_step, seconds = (float(x) for x in spec.split(":"))

  class SlowFinalize(ocp.path.atomicity.AtomicRenameTemporaryPath):

    async def finalize(self, *args, **kwargs):
      step = self.get_final().name
      if step.isdigit() and int(step) >= first_step:
        logging.warning("%s: delaying the commit of step %s by %gs", SAVE_DELAY_ENV, step,
                        seconds)
        await asyncio.sleep(seconds)
      return await super().finalize(*args, **kwargs)

  return SlowFinalize


class Checkpointer:
  """A thin wrapper of ``ocp.CheckpointManager`` for the training state.

  Args:
    directory: where step directories are written.
    keep: how many recent checkpoints to keep.
    async_save: save in a background thread (training continues meanwhile).
  """

  def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
    self.directory = Path(directory).absolute()
    delay = os.environ.get(SAVE_DELAY_ENV)
    self._options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        temporary_path_class=_slow_finalize_class(delay) if delay else None)
    self._manager = self._open()
    self.broken_steps: list[int] = []

  def _open(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        self.directory, options=self._options,
        item_handlers={"state": _state_handler(), "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> Optional[int]:
    """The newest complete checkpoint's step, or None."""
    return self._manager.latest_step()

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Starts saving ``state`` (any pytree) and JSON ``meta`` at ``step``."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(flax.serialization.to_state_dict(state)),
        meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, target: Any, step: Optional[int] = None,
              check_meta: Optional[Callable[[dict, int], None]] = None,
              config: Any = None) -> tuple[Any, dict]:
    """Restores into the structure, shapes and shardings of ``target``.

    Args:
      target: a state pytree (concrete or ``jax.ShapeDtypeStruct`` leaves with
        shardings) giving structure and placement.
      step: which checkpoint; the latest intact one if None.
      check_meta: called with ``(meta, step)`` before the state is read (e.g.
        to refuse a resume with another config); its errors propagate.
      config: this run's config, named in shape-mismatch messages.

    Returns:
      (state, meta).

    Raises:
      FileNotFoundError: if there is no checkpoint in the directory.
      transfer.VariableMismatchError: if the stored shapes do not fit
        ``target``, naming the parameters and the config keys.
      IOError: if no step can be read (each broken step is named).
    """
    steps = [step] if step is not None else sorted(self._manager.all_steps(), reverse=True)
    if not steps or steps[0] is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    failures = []
    for candidate in steps:
      try:
        meta = self._read_meta(candidate)
        tree = self._stored_tree(candidate)
      except Exception as error:  # pylint: disable=broad-except
        failures.append(self._give_up_on(candidate, error, step is None))
        continue
      if check_meta is not None:
        check_meta(meta, candidate)
      _check_shapes(tree, target, meta, f"{self.directory}/{candidate}", config)
      try:
        return self._restore_state(target, candidate), meta
      except Exception as error:  # pylint: disable=broad-except
        failures.append(self._give_up_on(candidate, error, step is None))
    raise IOError(f"no intact checkpoint in {self.directory}: " + "; ".join(failures))

  def _give_up_on(self, step: int, error: Exception, move: bool) -> str:
    """Warns about (and, when falling back, moves away) a step that cannot be read."""
    reason = f"step {step}: {type(error).__name__}: {str(error).splitlines()[0][:300]}"
    if move and jax.process_index() == 0:
      target = self.directory.parent / BROKEN_DIR / f"{step}-{int(time.time())}"
      target.parent.mkdir(parents=True, exist_ok=True)
      shutil.move(str(self.directory / str(step)), str(target))
      self._manager.close()
      self._manager = self._open()
      reason += f" (moved to {target})"
    self.broken_steps.append(step)
    logging.warning("checkpoint %s/%s cannot be restored, trying the previous step: %s",
                    self.directory, step, reason)
    return reason

  def _read_meta(self, step: int) -> dict:
    restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    if not isinstance(restored["meta"], dict):
      raise ValueError("no metadata")
    return dict(restored["meta"])

  def _stored_tree(self, step: int) -> dict:
    """The stored state's structure (ArrayMetadata leaves with shapes)."""
    reader = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(create=False),
        item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})
    try:
      tree = getattr(reader.item_metadata(step).get("state"), "tree", None)
    finally:
      reader.close()
    if not isinstance(tree, dict):
      raise ValueError("no readable state metadata")
    return tree

  def _restore_state(self, target: Any, step: int) -> Any:
    abstract = jax.tree_util.tree_map(_abstract_leaf, flax.serialization.to_state_dict(target))
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))))
    return flax.serialization.from_state_dict(target, restored["state"])

  def wait(self) -> None:
    """Blocks until any asynchronous save has finished."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def _state_handler() -> ocp.PyTreeCheckpointHandler:
  """orbax's pytree handler; on CPU it saves arrays without replica parallelism.

  Replica-parallel saving splits each replicated array among its devices: it
  compiles one slice program per array and device before the first save (132
  programs, ~7 s per process for configs/tiny.py on 4 host devices) and gains
  nothing on one host's CPU. orbax already turns it off on GPUs; elsewhere its
  defaults stay. The files are the same either way.
  """
  if jax.default_backend() != "cpu":
    return ocp.PyTreeCheckpointHandler()
  handlers = ocp.type_handlers
  scalar = handlers.ScalarHandler()
  registry = handlers.create_type_handler_registry(
      (int, scalar), (float, scalar), (bytes, scalar), (np.number, scalar),
      (np.ndarray, handlers.NumpyHandler()),
      (jax.Array, handlers.ArrayHandler(use_replica_parallel=False)),
      (str, handlers.StringHandler()))
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def _abstract_leaf(leaf):
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return leaf
  sharding = getattr(leaf, "sharding", None)
  return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)


def _check_shapes(stored: dict, target: Any, meta: dict, where: str, config: Any) -> None:
  """Raises ``VariableMismatchError`` naming what does not fit (instead of orbax's dump)."""
  want = transfer.flatten(flax.serialization.to_state_dict(target))
  have = transfer.flatten(stored)
  problems = []
  # The encoder first: its keys (model.depths, model.units) explain the rest.
  order = {m: i for i, m in enumerate(("encoder", "head", "age", "da_age"))}
  rank = lambda p: (order.get(p.split("/")[1] if p.startswith("variables/") else "", 9),
                    "/params/" not in p, p)
  for path in sorted(set(want) | set(have), key=rank):
    mine, theirs = want.get(path), have.get(path)
    if mine is not None and theirs is not None and tuple(mine.shape) == tuple(theirs.shape):
      continue
    shape = lambda x: "absent" if x is None else tuple(x.shape)
    problems.append((path, f"checkpoint {shape(theirs)}, this model {shape(mine)}"))
  if not problems:
    return
  # Variable paths name parameters and their config keys; optimizer-state
  # paths only repeat them (or follow from train_fr / train_fas).
  variables = [(p[len("variables/"):], d) for p, d in problems if p.startswith("variables/")]
  listed = variables or [(p, d + " (decided by train_fr / train_fas)") for p, d in problems]
  raise transfer.VariableMismatchError(transfer.mismatch_message(
      [f"{path}: {detail}" for path, detail in listed], config,
      transfer.source_config_of(meta), f"cannot resume from {where}",
      explain_keys=bool(variables)))
