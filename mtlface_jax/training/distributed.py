"""Multi-process (multi-host) start-up."""

from typing import Optional

import jax


def maybe_initialize(multihost: bool, coordinator_address: Optional[str] = None,
                     num_processes: Optional[int] = None, process_id: Optional[int] = None) -> None:
  """Calls ``jax.distributed.initialize`` when asked to or given a coordinator.

  On CPU the cross-process collectives need gloo, which is selected here.

  Args:
    multihost: initialise from the environment (TPU pods, SLURM, ...).
    coordinator_address: ``host:port`` of process 0 (explicit set-up).
    num_processes: processes in the job.
    process_id: this process's index.
  """
  if not multihost and coordinator_address is None:
    return
  try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except (AttributeError, KeyError, ValueError):
    pass  # Older/newer JAX without the option: its default is used.
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)
