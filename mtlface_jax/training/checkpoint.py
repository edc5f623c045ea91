"""orbax checkpoints of the training state, with metadata and safe resume.

Each checkpoint holds the whole :class:`TrainState` (``state``) and a JSON
``meta`` item (config, step, data position). orbax writes into a temporary
directory and renames it when complete, so a crash or SIGKILL during a save
leaves the previous checkpoint as the latest usable one.
"""

from pathlib import Path
from typing import Any, Optional

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpointer:
  """A thin wrapper of ``ocp.CheckpointManager`` for the training state.

  Args:
    directory: where step directories are written.
    keep: how many recent checkpoints to keep.
    async_save: save in a background thread (training continues meanwhile).
  """

  def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
    self.directory = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "meta"))

  def latest_step(self) -> Optional[int]:
    """The newest complete checkpoint's step, or None."""
    return self._manager.latest_step()

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Starts saving ``state`` (any pytree) and JSON ``meta`` at ``step``."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(flax.serialization.to_state_dict(state)),
        meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, target: Any, step: Optional[int] = None) -> tuple[Any, dict]:
    """Restores into the structure, shapes and shardings of ``target``.

    Args:
      target: a state pytree (concrete or ``jax.ShapeDtypeStruct`` leaves with
        shardings) giving structure and placement.
      step: which checkpoint; the latest if None.

    Returns:
      (state, meta).

    Raises:
      FileNotFoundError: if there is no checkpoint in the directory.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    abstract = jax.tree_util.tree_map(_abstract_leaf, flax.serialization.to_state_dict(target))
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return flax.serialization.from_state_dict(target, restored["state"]), dict(restored["meta"])

  def restore_meta(self, step: Optional[int] = None) -> dict:
    """Only the JSON metadata of a checkpoint (e.g. its config)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    return dict(self._manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"])

  def restore_raw(self, step: Optional[int] = None) -> dict:
    """The state as saved, as nested dicts of NumPy arrays on the host.

    Targets are shaped from the checkpoint's own metadata, so this works
    whatever devices saved it (orbax would otherwise restore onto the saving
    run's mesh and fail with a topology mismatch on other device counts).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    # A separate manager whose 'state' handler restores NumPy arrays on the
    # host: StandardRestore insists on the saving run's device topology.
    manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
        create=False), item_handlers={"state": ocp.PyTreeCheckpointHandler()})
    try:
      on_disk = manager.item_metadata(step)["state"]
      restore_args = jax.tree_util.tree_map(
          lambda _: ocp.RestoreArgs(restore_type=np.ndarray), on_disk)
      return manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(restore_args=restore_args)))["state"]
    finally:
      manager.close()

  def wait(self) -> None:
    """Blocks until any asynchronous save has finished."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def _abstract_leaf(leaf):
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return leaf
  sharding = getattr(leaf, "sharding", None)
  return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)


def checkpoint_dir(path: str | Path) -> Path:
  """Accepts a workdir (with ``checkpoints/``) or a checkpoints directory."""
  path = Path(path)
  return path / "checkpoints" if (path / "checkpoints").is_dir() else path
