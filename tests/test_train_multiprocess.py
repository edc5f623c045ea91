"""Two processes x two devices (gloo) against one process x four devices, through ``train.py``.

Separate from ``test_train_process.py`` so that ``pytest -n 2 --dist loadfile``
runs the two expensive subprocess files on different workers.
"""

import shutil
import socket
import subprocess
from pathlib import Path

import jax
import numpy as np

from tests.test_train_process import _finish, _start, _variables


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start_two_processes(workdir: Path, extra) -> list[subprocess.Popen]:
  port = _free_port()
  return [_start(workdir, [*extra, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                           f"--process_id={i}"], devices=2) for i in range(2)]


def test_two_processes_match_one_process(tmp_path):
  """2 processes x 2 devices (gloo) take the same steps as 1 process x 4 devices.

  Each comparison covers ONE step from a common state: from scratch (init,
  first global batch, dropout keys) and resumed from the one-process step-2
  checkpoint (cross-process restore, data position, fold_in(rng, 2), full lr).
  The runs cannot be bit-identical: gloo's ring all-reduce adds the four
  devices' partial sums in a rotated order per quarter of each buffer (e.g.
  ((2+3)+1)+0 for the first quarter) where one process adds 0+1+2+3, so about
  30% of the cross-device sums (BatchNorm statistics, gradients) differ by a
  few ulps. One step keeps that at <= 1.9e-6 absolute and <= 2.2e-5 relative
  (|x| > 1e-2) in every variable, as do 1 vs 4 devices in one process. Over
  several steps the tiny model amplifies it chaotically: after 3 steps from
  scratch 2x2 vs 1x4 differ by up to 3e-4, 1 vs 4 devices by 2e-2, and a
  1-ulp nudge of one initial weight by 1.5e-4, so only a per-step comparison
  can be tight. A layout bug (the two hosts' halves of the batch swapped, so
  dropout masks meet other examples) moves 27% of the values by up to 0.47
  after one step.
  """
  # AIFR (SGD): Adam's first FAS steps are sign(g) * lr, so near-zero
  # gradients can differ by ~lr between reduction orders (see test_training).
  aifr = ["--config.train_fas=False", "--config.checkpoint_every=1", "--config.keep_checkpoints=3"]
  single = tmp_path / "single"
  # The one-process reference and the from-scratch pair are independent: run them together.
  reference = _start(single, [*aifr, "--config.num_iter=3"], devices=4)
  for proc in _start_two_processes(tmp_path / "scratch", [*aifr, "--config.num_iter=1"]):
    _finish(proc)
  _finish(reference)
  shutil.copytree(single / "checkpoints" / "2", tmp_path / "resumed" / "checkpoints" / "2")
  for proc in _start_two_processes(tmp_path / "resumed", [*aifr, "--config.num_iter=3"]):
    _finish(proc)
  # 5x the measured one-step differences (see the docstring).
  close = lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
  for step, multi in ((1, "scratch"), (3, "resumed")):
    a, b = _variables(single, step), _variables(tmp_path / multi)
    assert a["step"] == b["step"] == step
    jax.tree_util.tree_map(close, a["variables"], b["variables"])
