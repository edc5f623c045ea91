"""orbax checkpoints of the training state, with metadata and safe resume.

Each checkpoint holds the whole :class:`TrainState` (``state``) and a JSON
``meta`` item (config, step, data position). Reading only the variables or the
metadata of any checkpoint (for evaluation, export, ``init_from``) is
:mod:`mtlface_jax.checkpoint_io`. orbax writes into a temporary
directory and renames it when complete, so a crash or SIGKILL during a save
leaves the previous checkpoint as the latest usable one.
"""

from pathlib import Path
from typing import Any, Optional

import flax
import jax
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
