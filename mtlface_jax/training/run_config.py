"""The config of every start of a run, and the check that a resume computes the same thing.

Each start writes ``workdir/config.json`` (this start's config) and appends
``workdir/config_history/NNN.json`` (``{"start", "time", "resumed_from_step",
"config"}``), so the config of every segment of a run is kept.

A resume compares this start's config with the one stored in the checkpoint
it resumes from. Any difference outside :data:`RESUME_ALLOWED` (model, batch
size, optimizer, schedule, data, seed, dtype, loss weights, ...) would make
the resumed run compute something else than the run it continues, so it is
refused with the list of changed keys, unless
``config.resume_config_change="allow"``, which logs the same list.
"""

import datetime
import json
import logging
from pathlib import Path
from typing import Any, Optional

HISTORY_DIR = "config_history"
# Keys a resume may change: they decide how long the run goes and what is
# logged or kept, never what a step computes.
RESUME_ALLOWED = frozenset({
    "num_iter",             # extending (or shortening) a run
    "log_every", "checkpoint_every", "keep_checkpoints", "image_every", "eval_every",
    "max_consecutive_nonfinite",
    "init_from", "init_from_exclude",  # only read on a fresh start
    "resume_config_change",
    "data.verify_images",  # how files are checked up front, not which are used
})
# Config sections no training step reads: the selective fine-tuning ablation
# (recipes/selective.py) runs after training, from the finished checkpoints.
RESUME_ALLOWED_SECTIONS = ("selective.",)
POLICIES = ("refuse", "allow")


def _allowed_keys_text() -> str:
  return ", ".join(sorted(RESUME_ALLOWED) + [f"{s}*" for s in RESUME_ALLOWED_SECTIONS])


class ResumeConfigError(ValueError):
  """A resume whose config changes the computation (lists the changed keys)."""


def flat_config(config: Any) -> dict[str, Any]:
  """``{'model.depths': [64, ...], ...}`` with JSON values (tuples become lists)."""
  tree = config.to_dict() if hasattr(config, "to_dict") else config
  tree = json.loads(json.dumps(tree, default=list))
  out = {}

  def walk(node, prefix):
    for key, value in node.items():
      if isinstance(value, dict) and value:
        walk(value, f"{prefix}{key}.")
      else:
        out[f"{prefix}{key}"] = value

  walk(tree, "")
  return out


def changed_keys(saved: Any, current: Any) -> tuple[list[str], list[str]]:
  """Differences between the checkpoint's config and this start's.

  Args:
    saved: the config stored with the checkpoint (ConfigDict or dict).
    current: this start's config.

  Returns:
    ``(refused, allowed)``: lines ``"key: old -> new"``; ``refused`` holds
    the keys that change the computation. Keys the saved config lacks (added
    to the code later) are not compared: the run they would change predates
    them.
  """
  old, new = flat_config(saved), flat_config(current)
  refused, allowed = [], []
  for key in sorted(set(old) | set(new)):
    if key not in old or old.get(key) == new.get(key):
      continue
    line = f"{key}: {json.dumps(old[key])} -> {json.dumps(new.get(key, '(removed)'))}"
    harmless = key in RESUME_ALLOWED or key.startswith(RESUME_ALLOWED_SECTIONS)
    (allowed if harmless else refused).append(line)
  return refused, allowed


def check_resume(saved: Any, current: Any, step: int) -> list[str]:
  """Refuses (or, when allowed, logs) a resume whose config changes the computation.

  Args:
    saved: the config stored with the checkpoint being resumed.
    current: this start's config.
    step: the checkpoint's step, for messages.

  Returns:
    Every changed key (``"key: old -> new"``), refused ones first.

  Raises:
    ResumeConfigError: listing the changed keys, unless
      ``current.resume_config_change == "allow"``.
    ValueError: an unknown ``resume_config_change``.
  """
  policy = current.get("resume_config_change", "refuse")
  if policy not in POLICIES:
    raise ValueError(f"config.resume_config_change must be one of {POLICIES}, got {policy!r}")
  refused, allowed = changed_keys(saved, current)
  if allowed:
    logging.info("resuming step %d with changed %s", step, "; ".join(allowed))
  if refused and policy != "allow":
    raise ResumeConfigError(
        f"this workdir's checkpoint (step {step}) was written with another config, and "
        f"resuming would change what training computes: {'; '.join(refused)}. Use the "
        "original values, a new --workdir, or --config.resume_config_change=allow to "
        f"resume anyway (keys a resume may change: {_allowed_keys_text()})")
  if refused:
    logging.warning("resume_config_change=allow: resuming step %d with changed %s", step,
                    "; ".join(refused))
  return refused + allowed


def record_start(workdir: str | Path, config: Any, resumed_from: Optional[int]) -> Path:
  """Writes ``config.json`` and the next ``config_history/NNN.json``.

  Args:
    workdir: the run directory.
    config: this start's config.
    resumed_from: the restored step, or None for a fresh start.

  Returns:
    The history file written.
  """
  workdir = Path(workdir)
  history = workdir / HISTORY_DIR
  history.mkdir(parents=True, exist_ok=True)
  tree = json.loads(json.dumps(config.to_dict(), default=list))
  taken = [int(p.stem) for p in history.glob("[0-9][0-9][0-9]*.json") if p.stem.isdigit()]
  number = max(taken, default=-1) + 1
  entry = {"start": number, "time": datetime.datetime.now().astimezone().isoformat(),
           "resumed_from_step": resumed_from, "config": tree}
  path = history / f"{number:03d}.json"
  path.write_text(json.dumps(entry, indent=2, sort_keys=True))
  (workdir / "config.json").write_text(json.dumps(tree, indent=2, sort_keys=True))
  return path


def history(workdir: str | Path) -> list[dict]:
  """Every recorded start of a run, oldest first."""
  files = sorted((Path(workdir) / HISTORY_DIR).glob("[0-9][0-9][0-9]*.json"),
                 key=lambda p: int(p.stem))
  return [json.loads(p.read_text()) for p in files]
