"""Data parallelism with ``jax.sharding``: one mesh axis ``data`` over all devices.

Parameters and optimizer states are replicated; batches are split along
their first axis. Under ``jit`` BatchNorm statistics are therefore computed
over the GLOBAL batch (synchronised BatchNorm), unlike the reference's
per-GPU statistics; with the reference's 64 images per GPU the difference is
small, and global statistics make results independent of the device count.
"""

from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: Optional[list] = None) -> Mesh:
  """A 1-D mesh over ``devices`` (all devices of all processes by default)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding that keeps a full copy on every device."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Sharding that splits the leading (batch) axis over the ``data`` axis."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def put_batch(batch: dict, sharding: NamedSharding) -> dict:
  """Assembles a global batch from this process's rows of it.

  Args:
    batch: numpy arrays holding this process's ``global_batch / process_count`` rows.
    sharding: from :func:`batch_sharded`.

  Returns:
    Global ``jax.Array`` s sharded over all devices of all processes.
  """
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places every leaf of ``tree`` fully on every device of ``mesh``."""
  return jax.device_put(tree, replicated(mesh))


def check_batch_divisible(global_batch: int, mesh: Mesh) -> None:
  """Raises a clear error when the batch does not split evenly."""
  if global_batch % mesh.size or global_batch % jax.process_count():
    raise ValueError(f"batch_size {global_batch} must divide evenly over {mesh.size} devices "
                     f"and {jax.process_count()} processes")
