"""Train MTLFace (AIFR, FAS or both): a thin entry point over mtlface_jax.training.

  python train.py --config=configs/aifr_scaf.py --workdir=runs/aifr \\
      --config.data.mtlface_list.file=scaf.txt \\
      --config.data.mtlface_list.image_root=/data/casia
  python train.py --config=configs/fas_scaf.py --workdir=runs/fas --config.init_from=runs/aifr

Multi-host: launch one process per host with --multihost (JAX reads the
coordinator from the environment, e.g. on TPU pods and SLURM) or pass
--coordinator_address/--num_processes/--process_id explicitly.

Exit status (docs/reliability.md): 0 finished; 75 stopped by SIGTERM/SIGINT
after saving, resume by running the same command again; 1 an error, printed
as one ``train.py: error:`` message (bad config or data, a resume whose config
changed, too many non-finite losses); 2 a bad command line.

  until python train.py ...; do [ $? -eq 75 ] || exit 1; done
"""

import json
import signal
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

# Locked: an override naming a key configs/common.py does not declare fails.
_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs).", required=True)
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize().")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  from mtlface_jax.training import distributed  # pylint: disable=g-import-not-at-top
  distributed.maybe_initialize(_MULTIHOST.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                               _PROCESS_ID.value)
  from mtlface_jax.training import loop  # pylint: disable=g-import-not-at-top
  # Until the loop takes over: a stop during start-up saves after the first step.
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, loop.early_stop_handler)
  try:
    summary = loop.train(_CONFIG.value, _WORKDIR.value)
  except loop.user_errors() as error:
    # What the user can fix: one message, no traceback.
    print(f"train.py: error: {error}", file=sys.stderr)
    return 1
  logging.info("finished: %s", json.dumps(summary, default=str))
  print(json.dumps(summary, default=str))
  code = loop.exit_code(summary)
  if code == loop.EXIT_PREEMPTED:
    print(f"train.py: stopped by {summary['signal']} at step {summary['step']} after saving; "
          f"exit {code}: run the same command again to resume", file=sys.stderr)
  return code


if __name__ == "__main__":
  app.run(main)
