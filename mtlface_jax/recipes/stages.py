"""The MTLFace recipe's stages: AIFR, then FAS from the trained encoder, then
(TPAMI, optional) selective fine-tuning of AIFR with the FAS run's faces."""

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


def selective_finetuning(config, workdir: str | Path) -> dict:
  """The TPAMI stage after :func:`train_aifr_then_fas`: the selective fine-tuning ablation.

  Args:
    config: a config with a ``selective`` section (``configs/selective_ft.py``;
      every demo and recipe config declares it).
    workdir: the folder :func:`train_aifr_then_fas` wrote (``aifr/``, ``fas/``);
      the three arms and ``ablation.json`` go to ``workdir/selective``.

  Returns:
    The ablation (``recipes/selective.py``: selection, kept fractions, arms).
  """
  # Imported here: the ablation pulls in the whole evaluation stack.
  from mtlface_jax.recipes import selective  # pylint: disable=g-import-not-at-top
  return selective.run_ablation(config, Path(workdir) / "selective", workdir)
