"""train.py as a process: SIGKILL during an async save, SIGTERM, and resume.

Every run uses configs/tiny.py on the synthetic faces through the real input
pipeline; compiled programs are shared through the persistent JAX cache.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import jax
import numpy as np
import pytest

from mtlface_jax import checkpoint_io
from mtlface_jax.training import checkpoint as checkpoint_lib
from mtlface_jax.training import loop

REPO = Path(__file__).resolve().parents[1]
TINY = ["--config=configs/tiny.py", "--config.train_fas=True", "--config.checkpoint_every=2"]


def _env(devices: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices} "
                      "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
  env["PYTHONPATH"] = str(REPO)
  return env


def _start(workdir: Path, extra=(), devices: int = 4, env=None) -> subprocess.Popen:
  cmd = [sys.executable, "train.py", f"--workdir={workdir}", *TINY, *extra]
  return subprocess.Popen(cmd, cwd=REPO, env={**_env(devices), **(env or {})},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 600, status: int = 0) -> str:
  try:
    out, _ = proc.communicate(timeout=timeout)
  finally:
    if proc.poll() is None:  # Timed out (or interrupted): never leave a trainer behind.
      proc.kill()
      proc.wait()
  assert proc.returncode == status, out[-3000:]
  return out


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """An uninterrupted 10-step run, started once and shared.

  It runs in the background while the test kills and resumes its own run
  (the 2-core CI box overlaps them); ``straight()`` waits for it and returns
  its workdir, whose checkpoints 2, 4, ..., 10 are all kept.
  """
  workdir = tmp_path_factory.mktemp("straight")
  proc = _start(workdir, ["--config.num_iter=10", "--config.keep_checkpoints=5"])
  done = []

  def wait() -> Path:
    if not done:
      _finish(proc)
      done.append(True)
    return workdir

  yield wait
  if proc.poll() is None:
    proc.kill()
    proc.wait()


def _wait_for_checkpoint(workdir: Path, proc: subprocess.Popen, at_least: int, timeout=600):
  deadline = time.time() + timeout
  while time.time() < deadline:
    steps = [int(p.name) for p in (workdir / "checkpoints").glob("[0-9]*") if p.name.isdigit()]
    if steps and max(steps) >= at_least:
      return max(steps)
    if proc.poll() is not None:
      pytest.fail(f"training ended before step {at_least}: {proc.stdout.read()[-3000:]}")
    time.sleep(0.2)
  proc.kill()
  pytest.fail(f"no checkpoint >= {at_least} within {timeout}s")


def _variables(workdir: Path, step: Optional[int] = None) -> dict:
  raw, _, _ = checkpoint_io.restore_state(workdir / "checkpoints", step)
  return {"step": int(raw["step"]), "variables": raw["variables"], "opt": raw["opt_states"]}


def test_kill_in_a_save_then_sigterm_and_resumes_match_uninterrupted(tmp_path, straight):
  """kill -9 inside step 4's asynchronous save, a refused resume, SIGTERM, and two resumes.

  ``MTLFACE_TEST_SAVE_DELAY=4:600`` holds step 4's commit (the atomic rename
  that ends an orbax save) for 600 s, so the kill lands inside that save
  deterministically: step 4 exists only as orbax's temporary directory. One
  process chain covers both signals (each train.py start costs ~35 s of CI).
  """
  steps = ["--config.num_iter=10", "--config.keep_checkpoints=5"]
  work = tmp_path / "interrupted"
  victim = _start(work, steps, env={checkpoint_lib.SAVE_DELAY_ENV: "4:600"})
  deadline = time.time() + 600
  while not list((work / "checkpoints").glob("4.orbax-checkpoint-tmp*")):
    assert victim.poll() is None and time.time() < deadline, victim.stdout.read()[-3000:]
    time.sleep(0.2)
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  committed = sorted(p.name for p in (work / "checkpoints").iterdir() if p.name.isdigit())
  assert committed == ["2"]
  # A resume with another computation is refused in one line, touching nothing.
  out = _finish(_start(work, [*steps, "--config.batch_size=16"]), status=1)
  assert "train.py: error: this workdir's checkpoint (step 2)" in out
  assert "batch_size: 8 -> 16" in out and "Traceback" not in out
  preempted = _start(work, steps)
  seen = _wait_for_checkpoint(work, preempted, 6)
  preempted.send_signal(signal.SIGTERM)
  out = _finish(preempted, status=loop.EXIT_PREEMPTED)  # SIGTERM: saved, "resume me"
  assert "stopped by SIGTERM" in out
  assert _variables(work)["step"] >= seen
  _finish(_start(work, steps))
  # Step 4, recomputed from step 2 after the kill, is bit-identical to the straight run's.
  a, b = _variables(straight(), 4), _variables(work, 4)
  assert a["step"] == b["step"] == 4
  jax.tree_util.tree_map(np.testing.assert_array_equal, a["variables"], b["variables"])
  jax.tree_util.tree_map(np.testing.assert_array_equal, a["opt"], b["opt"])
  a, b = _variables(straight()), _variables(work)
  assert a["step"] == b["step"] == 10
  # Across the SIGTERM's fresh process XLA:CPU has shown 1-ulp differences,
  # hence the float32-ulp bound (in one process resume is bit-identical:
  # test_training.py).
  close = lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  jax.tree_util.tree_map(close, a["variables"], b["variables"])
  jax.tree_util.tree_map(close, a["opt"], b["opt"])
