"""Metric and image writers: TensorBoard, a JSONL file, PNG grids, a progress bar.

Only the main process (``jax.process_index() == 0``) writes; other processes get
no-op writers.
"""

import json
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

  def __init__(self, workdir: str | Path, enabled: Optional[bool] = None):
    self.workdir = Path(workdir)
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._jsonl = None
    if self.enabled:
      self.workdir.mkdir(parents=True, exist_ok=True)
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
    with self._summary().as_default(step=0):
      tf.summary.text("config", "```\n" + text + "\n```")

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
