"""The two-stage MTLFace recipe: AIFR first, then FAS from the trained encoder."""

import time
from pathlib import Path

from mtlface_jax.training import loop


def stage_configs(config):
  """The AIFR and FAS configs of a recipe config (``fas_num_iter`` FAS steps).

  Args:
    config: a training config with ``num_iter`` (AIFR) and ``fas_num_iter``.

  Returns:
    ``(aifr_config, fas_config)``; the FAS one still lacks ``init_from``.
  """
  aifr = config.copy_and_resolve_references()
  aifr.train_fr, aifr.train_fas = True, False
  fas = config.copy_and_resolve_references()
  fas.train_fr, fas.train_fas = False, True
  fas.num_iter = config.fas_num_iter
  return aifr, fas


def train_aifr_then_fas(config, workdir: str | Path) -> dict[str, float]:
  """Trains AIFR into ``workdir/aifr``, then FAS from it into ``workdir/fas``.

  Both stages resume from their own checkpoints, so re-running after a crash
  or kill continues where it stopped.

  Args:
    config: see :func:`stage_configs`.
    workdir: output directory.

  Returns:
    Wall-clock seconds: ``aifr_s`` and ``fas_s``.
  """
  workdir = Path(workdir)
  aifr, fas = stage_configs(config)
  start = time.time()
  loop.train(aifr, workdir / "aifr")
  middle = time.time()
  fas.init_from = str(workdir / "aifr")
  loop.train(fas, workdir / "fas")
  return {"aifr_s": middle - start, "fas_s": time.time() - middle}
