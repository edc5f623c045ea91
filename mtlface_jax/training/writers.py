"""Metric and image writers: TensorBoard, a JSONL file, PNG grids, a progress bar.

Only the main process (``jax.process_index() == 0``) writes; other processes get
no-op writers.

A run (re)started at step N first drops what an earlier start logged after
step N (``metrics.jsonl`` lines and TensorBoard events), since those steps are
computed again: after any number of resumes each step is logged once.
"""

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np
from tqdm import tqdm


class MetricWriter:
  """Writes scalars to TensorBoard and ``metrics.jsonl``, images to TB and PNG.

  Args:
    workdir: run directory; files go to ``workdir/tensorboard``,
      ``workdir/metrics.jsonl`` and ``workdir/images``.
    enabled: False on non-main processes.
  """

  def __init__(self, workdir: str | Path, enabled: Optional[bool] = None, start_step: int = 0):
    self.workdir = Path(workdir)
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.start_step = start_step
    self._tb = None
    self._jsonl = None
    if self.enabled:
      self.workdir.mkdir(parents=True, exist_ok=True)
      dropped = truncate_jsonl(self.workdir / "metrics.jsonl", start_step)
      dropped += purge_tensorboard(self.workdir / "tensorboard", start_step)
      if dropped:
        logging.warning("restarting at step %d: dropped %d metric records of later steps "
                        "logged by an earlier start", start_step, dropped)
      self._jsonl = open(self.workdir / "metrics.jsonl", "a", encoding="utf-8")

  def _summary(self):
    if self._tb is None:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      self._tb = tf.summary.create_file_writer(str(self.workdir / "tensorboard"))
    return self._tb

  def write_scalars(self, step: int, scalars: dict[str, Any]) -> None:
    """Logs ``scalars`` (numbers or 0-d arrays) at ``step``."""
    if not self.enabled:
      return
    values = {k: float(np.asarray(v)) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
    self._jsonl.flush()
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    with self._summary().as_default(step=step):
      for k, v in values.items():
        tf.summary.scalar(k, v)

  def write_hparams(self, config_dict: dict) -> None:
    """Records the hyper-parameters as ``config.json`` and a TB text summary."""
    if not self.enabled:
      return
    text = json.dumps(config_dict, indent=2, sort_keys=True, default=str)
    (self.workdir / "config.json").write_text(text)
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    # At the start step: each start's config once, at the step it begins.
    with self._summary().as_default(step=self.start_step):
      tf.summary.text("config", "```\n" + text + "\n```")

  def write_skipped(self, step: int, report: Any, max_listed: int = 10) -> dict:
    """Records the examples the data skipped (a ``formats.parse_report.ParseReport``).

    Writes ``skipped.jsonl`` (one ``{"location", "reason"}`` per entry) and,
    on a fresh start (``step == 0``; a resume reads the same data), the counts
    to ``metrics.jsonl`` and TensorBoard (``data/skipped``, ``data/ok``, and a
    text summary of the first entries).

    Returns:
      ``{"count", "ok", "first": [{"location", "reason"}, ...]}`` for the
      run summary.
    """
    entries = [{"location": loc, "reason": why} for loc, why in report.skipped]
    summary = {"count": len(entries), "ok": int(report.num_ok), "first": entries[:max_listed]}
    if not self.enabled:
      return summary
    _replace(self.workdir / "skipped.jsonl",
             "".join(json.dumps(e) + "\n" for e in entries).encode("utf-8"))
    if step == 0:
      self.write_scalars(0, {"data/skipped": len(entries), "data/ok": report.num_ok})
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      with self._summary().as_default(step=0):
        tf.summary.text("data/skipped_examples", "\n".join(
            f"    {e['location']}: {e['reason']}" for e in entries[:max_listed]) or "none")
    return summary

  def write_image(self, step: int, name: str, image: np.ndarray, png_path: Optional[Path] = None):
    """Logs an HWC uint8 image to TensorBoard and optionally as a PNG."""
    if not self.enabled:
      return
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    with self._summary().as_default(step=step):
      tf.summary.image(name, image[None], step=step)
    if png_path is not None:
      from PIL import Image  # pylint: disable=g-import-not-at-top
      png_path.parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(image).save(png_path)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.flush()


def truncate_jsonl(path: Path, last_step: int) -> int:
  """Keeps the records of ``path`` with ``step <= last_step`` (and drops a torn last line).

  Returns:
    The number of lines dropped.
  """
  if not path.is_file():
    return 0
  kept, dropped = [], 0
  for line in path.read_text(encoding="utf-8").splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:  # a line cut short by a kill
      dropped += 1
      continue
    if isinstance(record, dict) and record.get("step", 0) > last_step:
      dropped += 1
      continue
    kept.append(line)
  if dropped:
    _replace(path, "".join(l + "\n" for l in kept).encode("utf-8"))
  return dropped


def purge_tensorboard(logdir: Path, last_step: int) -> int:
  """Rewrites every event file under ``logdir`` without the events after ``last_step``.

  TF2's summary writers have no purge step, and TensorBoard would otherwise
  show two values for every step logged again after a resume.

  Returns:
    The number of events dropped.
  """
  if not logdir.is_dir():
    return 0
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
  dropped = 0
  for path in sorted(logdir.rglob("events.out.tfevents.*")):
    kept, removed = [], 0
    try:
      for record in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
        event = event_pb2.Event.FromString(record)
        if event.step > last_step and event.HasField("summary"):
          removed += 1
        else:
          kept.append(record)
    except tf.errors.DataLossError:  # a record cut short by a kill
      removed += 1
    if removed:
      tmp = path.with_name(path.name + ".tmp")
      with tf.io.TFRecordWriter(str(tmp)) as out:
        for record in kept:
          out.write(record)
      os.replace(tmp, path)
      dropped += removed
  return dropped


def _replace(path: Path, data: bytes) -> None:
  """Writes ``data`` to ``path`` atomically (a kill leaves the old or the new file)."""
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_bytes(data)
  os.replace(tmp, path)


class Progress:
  """A tqdm bar with images/s and ETA, shown on the main process only."""

  def __init__(self, start: int, total: int, batch_size: int, desc: str):
    self.batch_size = batch_size
    self._bar = tqdm(total=total, initial=start, desc=desc, unit="it", dynamic_ncols=True,
                     disable=jax.process_index() != 0, mininterval=2.0)
    self._last = (time.perf_counter(), start)
    self.images_per_s = 0.0

  def update(self, step: int, postfix: Optional[dict] = None) -> float:
    """Advances to ``step``; returns the images/s since the last call."""
    now = time.perf_counter()
    then, last_step = self._last
    if step > last_step and now > then:
      self.images_per_s = (step - last_step) * self.batch_size / (now - then)
    self._last = (now, step)
    self._bar.update(step - self._bar.n)
    self._bar.set_postfix({"img/s": f"{self.images_per_s:.0f}", **(postfix or {})}, refresh=False)
    return self.images_per_s

  def close(self) -> None:
    self._bar.close()
