"""The one host-side reader of checkpoints: variables and metadata, no Flax.

Every checkpoint this project writes (training runs, converted PyTorch
weights, a bundle's ``variables/``) is an orbax ``CheckpointManager``
directory of step folders, each with two items:

* ``state``: a pytree whose ``variables`` entry maps module name -> Flax
  collections (training checkpoints also hold ``opt_states``, ``step``, ...);
* ``meta``: a JSON object saying which model the variables belong to (a
  training ``config``, a conversion's ``converted_from``, or a bundle's
  ``model``; ``mtlface_jax.models.spec.from_meta`` reads it).

Everything here returns host NumPy arrays, whatever devices wrote the
checkpoint, and reads only what is asked for (the optimizer states of a
training run stay on disk). Writing belongs to
``mtlface_jax.training.checkpoint.Checkpointer``.
"""

from pathlib import Path
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINTS_DIR = "checkpoints"
STATE_ITEM = "state"
META_ITEM = "meta"
VARIABLES_KEY = "variables"


class CheckpointError(ValueError):
  """A checkpoint that is missing, incomplete or of another kind (one-line message)."""


def checkpoint_dir(path: str | Path) -> Path:
  """The folder holding the step folders: a workdir's ``checkpoints/`` or ``path`` itself.

  Args:
    path: a training workdir, its ``checkpoints/`` folder, a converted
      checkpoint or a bundle's ``variables/``.

  Returns:
    The absolute directory.
  """
  path = Path(path).absolute()
  return path / CHECKPOINTS_DIR if (path / CHECKPOINTS_DIR).is_dir() else path


def _manager(directory: Path) -> ocp.CheckpointManager:
  # Handlers that restore host NumPy arrays: StandardRestore would insist on
  # the saving run's device topology.
  return ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(create=False),
      item_handlers={STATE_ITEM: ocp.PyTreeCheckpointHandler(),
                     META_ITEM: ocp.JsonCheckpointHandler()})


def _open(path: str | Path, step: Optional[int]) -> tuple[Path, ocp.CheckpointManager, int]:
  """(directory, manager, step) with ``step`` resolved to an existing one."""
  directory = checkpoint_dir(path)
  if not directory.is_dir():
    raise FileNotFoundError(f"checkpoint directory not found: {directory}")
  manager = _manager(directory)
  steps = manager.all_steps()
  chosen = manager.latest_step() if step is None else step
  if chosen is None or chosen not in steps:
    manager.close()
    raise FileNotFoundError(f"no checkpoint{'' if step is None else f' at step {step}'} in "
                            f"{directory} (steps found: {sorted(steps)})")
  return directory, manager, int(chosen)


def _require_meta(directory: Path, step: int) -> None:
  """A one-line error for a step folder without its ``meta`` item."""
  if not (directory / str(step) / META_ITEM).exists():
    raise CheckpointError(f"checkpoint {directory}/{step} has no '{META_ITEM}' item: it was not "
                          "written by this project, or it is incomplete")


def read_meta(path: str | Path, step: Optional[int] = None) -> tuple[dict, int]:
  """The JSON metadata of a checkpoint.

  Args:
    path: see :func:`checkpoint_dir`.
    step: which step; the latest if None.

  Returns:
    (meta, step).

  Raises:
    FileNotFoundError: if there is no checkpoint (or not ``step``).
    CheckpointError: if the step has no readable metadata.
  """
  directory, manager, step = _open(path, step)
  try:
    meta = manager.restore(step, args=ocp.args.Composite(
        **{META_ITEM: ocp.args.JsonRestore()}))[META_ITEM]
  except (FileNotFoundError, ValueError, KeyError) as error:
    raise CheckpointError(f"checkpoint {directory}/{step} has no readable metadata "
                          f"({type(error).__name__}); it was not written by this project "
                          "or is incomplete") from error
  finally:
    manager.close()
  if not isinstance(meta, dict):
    raise CheckpointError(f"checkpoint {directory}/{step} has no metadata")
  return dict(meta), step


def restore_variables(path: str | Path, step: Optional[int] = None,
                      modules: Optional[tuple[str, ...]] = None) -> tuple[dict, dict, int]:
  """Reads only the variables (and metadata) of a checkpoint, as host NumPy arrays.

  Args:
    path: see :func:`checkpoint_dir`.
    step: which step; the latest if None.
    modules: restore only these modules (those present); all if None.

  Returns:
    (module -> collections of NumPy arrays, the JSON meta, the step).

  Raises:
    FileNotFoundError: if there is no checkpoint (or not ``step``).
    CheckpointError: if the checkpoint has no ``variables`` or no readable
      structure metadata.
  """
  directory, manager, step = _open(path, step)
  try:
    _require_meta(directory, step)
    metadata = manager.item_metadata(step)
    tree = getattr(metadata.get(STATE_ITEM) if metadata else None, "tree", None)
    if not isinstance(tree, dict) or not isinstance(tree.get(VARIABLES_KEY), dict):
      raise CheckpointError(f"checkpoint {directory}/{step} holds no readable '{VARIABLES_KEY}' "
                            "(its orbax metadata is missing or it is not a model checkpoint)")
    stored = {name: value for name, value in tree[VARIABLES_KEY].items()
              if modules is None or name in modules}
    # Partial restore: only the wanted subtree is read.
    item = {VARIABLES_KEY: jax.tree_util.tree_map(lambda m: np.zeros((), m.dtype), stored)}
    restore_args = jax.tree_util.tree_map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    restored = manager.restore(step, args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.PyTreeRestore(item, restore_args=restore_args,
                                           partial_restore=True),
        META_ITEM: ocp.args.JsonRestore()}))
  finally:
    manager.close()
  return (dict(restored[STATE_ITEM][VARIABLES_KEY]), dict(restored[META_ITEM] or {}), step)


def restore_state(path: str | Path, step: Optional[int] = None) -> tuple[dict, dict, int]:
  """The whole saved state (variables, optimizer states, counters) as host NumPy arrays.

  For inspection and tests; training resumes through ``Checkpointer.restore``,
  which places the state on the run's devices.

  Args:
    path: see :func:`checkpoint_dir`.
    step: which step; the latest if None.

  Returns:
    (state as nested dicts, the JSON meta, the step).
  """
  directory, manager, step = _open(path, step)
  try:
    _require_meta(directory, step)
    metadata = manager.item_metadata(step)
    tree = getattr(metadata.get(STATE_ITEM) if metadata else None, "tree", None)
    if tree is None:
      raise CheckpointError(f"checkpoint {directory}/{step} has no readable state metadata")
    restore_args = jax.tree_util.tree_map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    restored = manager.restore(step, args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.PyTreeRestore(restore_args=restore_args),
        META_ITEM: ocp.args.JsonRestore()}))
  finally:
    manager.close()
  return dict(restored[STATE_ITEM]), dict(restored[META_ITEM] or {}), step
