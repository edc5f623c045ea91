"""Training a user can trust (issue 12): fine-tuning, resume safety, exit codes, bad input.

In-process on configs/tiny.py. Most tests build states without a training
step (no step compile); one trains, stops by SIGINT, loses its newest
checkpoint to a truncated file and resumes.
"""

import functools
import json
import os
import signal
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import tiny
from mtlface_jax import convert
from mtlface_jax import data_sources
from mtlface_jax import input_pipeline
from mtlface_jax.formats.parse_report import ParseReport
from mtlface_jax.training import checkpoint as checkpoint_lib
from mtlface_jax.training import loop
from mtlface_jax.training import run_config
from mtlface_jax.training import sharding
from mtlface_jax.training import transfer
from mtlface_jax.training import writers
from mtlface_jax import batch as batch_lib


def _config(**overrides):
  config = tiny.get_config()
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value
  return config


def _fresh_state(config):
  mesh = sharding.make_mesh(jax.devices()[:1])
  return loop.build_step(config, mesh).create_state(), mesh


def _save_run(workdir: Path, config, step: int = 0):
  """A checkpoint as a run of ``config`` writes it (no training step needed)."""
  state, _ = _fresh_state(config)
  state = state.replace(step=np.int32(step))
  saver = checkpoint_lib.Checkpointer(workdir / "checkpoints", async_save=False)
  saver.save(step, state, {"step": step, "config": config.to_json()})
  saver.wait()
  saver.close()
  return state


def _leaves(tree):
  return transfer.flatten(jax.tree_util.tree_map(np.asarray, tree))


def test_init_from_fine_tunes_a_new_head(tmp_path):
  # Another seed: the source's encoder differs from this run's fresh one.
  source = _save_run(tmp_path / "aifr", _config(seed=1))
  finetune = _config(**{"model.num_classes": 20})
  fresh, mesh = _fresh_state(finetune)
  with pytest.raises(transfer.VariableMismatchError) as error:
    loop.load_pretrained(fresh, str(tmp_path / "aifr"), mesh, finetune)
  message = str(error.value)
  assert "head/params/kernel" in message and "(512, 10)" in message and "(512, 20)" in message
  assert "model.num_classes (checkpoint 10, this config 20)" in message

  finetune.init_from_exclude = ("head",)
  state = loop.load_pretrained(fresh, str(tmp_path / "aifr"), mesh, finetune)
  got, want, init = (_leaves(s.variables) for s in (state, source, fresh))
  encoder = [p for p in got if p.startswith("encoder/")]
  assert encoder and all(np.array_equal(got[p], want[p]) for p in encoder)
  assert not np.array_equal(got["encoder/params/output_layer/fc/kernel"],
                            init["encoder/params/output_layer/fc/kernel"])
  assert got["head/params/kernel"].shape == (512, 20)
  np.testing.assert_array_equal(got["head/params/kernel"], init["head/params/kernel"])

  # A path inside a module, with or without its collection.
  assert transfer.matches_exclude("encoder/params/output_layer/fc/kernel",
                                  ["encoder/output_layer"])
  assert transfer.matches_exclude("encoder/batch_stats/output_layer/bn_in/mean",
                                  ["encoder/output_layer"])
  assert not transfer.matches_exclude("encoder/params/output_layer_2/x", ["encoder/output_layer"])
  deeper = _config(**{"model.depths": (8, 8, 16, 32)})
  state, mesh = _fresh_state(deeper)
  with pytest.raises(transfer.VariableMismatchError, match=r"model\.depths \(checkpoint"):
    loop.load_pretrained(state, str(tmp_path / "aifr"), mesh, deeper)


def test_resume_with_another_computation_is_refused(tmp_path):
  _save_run(tmp_path, _config(), step=2)
  changed = _config(batch_size=16, **{"optim.lr": 0.2})
  with pytest.raises(run_config.ResumeConfigError) as error:
    loop.train(changed, tmp_path, batches_fn=batch_lib.fake_batches)
  message = str(error.value)
  assert "batch_size: 8 -> 16" in message and "optim.lr: 0.1 -> 0.2" in message
  assert "resume_config_change=allow" in message
  assert not (tmp_path / run_config.HISTORY_DIR).exists()
  # Allowed keys pass; a model change allowed through names parameter and key.
  assert run_config.changed_keys(_config(), _config(num_iter=60, log_every=7))[0] == []
  # The selective ablation's keys are read after training only.
  refused, allowed = run_config.changed_keys(_config(), _config(**{"selective.ft_lr": 0.5}))
  assert refused == [] and allowed == ["selective.ft_lr: 0.01 -> 0.5"]
  bigger = _config(resume_config_change="allow", **{"model.depths": (8, 8, 16, 32)})
  with pytest.raises(transfer.VariableMismatchError) as error:
    loop.train(bigger, tmp_path, batches_fn=batch_lib.fake_batches)
  message = str(error.value)
  assert "cannot resume from" in message and "encoder/params/" in message
  assert "model.depths (checkpoint [8, 8, 16, 16], this config [8, 8, 16, 32])" in message
  assert "strict" not in message


def test_metric_writer_keeps_each_step_once_after_a_restart(tmp_path):
  first = writers.MetricWriter(tmp_path, enabled=True)
  for step in (1, 2, 3, 4):
    first.write_scalars(step, {"loss": step})
  first.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 5, "lo')  # torn by a kill
  second = writers.MetricWriter(tmp_path, enabled=True, start_step=2)
  for step in (3, 4):
    second.write_scalars(step, {"loss": 10 + step})
  second.close()
  records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["loss"]) for r in records] == [(1, 1), (2, 2), (3, 13), (4, 14)]
  assert _tensorboard_steps(tmp_path / "tensorboard", "loss") == [1, 2, 3, 4]


def _tensorboard_steps(logdir: Path, tag: str) -> list[int]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
  steps = []
  for path in sorted(logdir.rglob("events.out.tfevents.*")):
    for record in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
      event = event_pb2.Event.FromString(record)
      steps += [event.step for v in event.summary.value if v.tag == tag]
  return sorted(steps)


class _Interrupting:
  """Fake batches that raise SIGINT while fetching step ``at``, with a skip report."""

  def __init__(self, config, start, at):
    self._it, self._step, self._at = batch_lib.fake_batches(config, start), start, at
    self.report = ParseReport(num_ok=78)
    self.report.skip("list.txt:3", "image file a.jpg not found")
    self.report.skip("list.txt:9", "cannot decode image")

  def __iter__(self):
    return self

  def __next__(self):
    if self._step == self._at:
      os.kill(os.getpid(), signal.SIGINT)
    self._step += 1
    return next(self._it)


def test_interrupt_fallback_resume_and_metrics_once(tmp_path, caplog):
  config = _config(num_iter=4, checkpoint_every=2)
  summary = loop.train(config, tmp_path,
                       batches_fn=functools.partial(_Interrupting, at=2))
  # SIGINT while step 3 was prepared: step 3 finishes, is saved, exit 75.
  assert summary["step"] == 3 and summary["preempted"] and summary["signal"] == "SIGINT"
  assert loop.exit_code(summary) == loop.EXIT_PREEMPTED == 75
  assert summary["skipped"]["count"] == 2
  assert summary["skipped"]["first"][0] == {"location": "list.txt:3",
                                             "reason": "image file a.jpg not found"}
  skipped = [json.loads(l) for l in (tmp_path / "skipped.jsonl").read_text().splitlines()]
  assert [s["location"] for s in skipped] == ["list.txt:3", "list.txt:9"]
  assert _tensorboard_steps(tmp_path / "tensorboard", "data/skipped") == [0]
  # The newest checkpoint is damaged (a file cut short): resume falls back to 2.
  data = sorted((tmp_path / "checkpoints" / "3" / "state").rglob("d/*"),
                key=lambda p: p.stat().st_size)[-1]
  data.write_bytes(data.read_bytes()[:16])
  caplog.set_level("WARNING")
  summary = loop.train(config, tmp_path, batches_fn=batch_lib.fake_batches)
  assert summary["step"] == 4 and not summary["preempted"] and loop.exit_code(summary) == 0
  assert any("checkpoints/3 cannot be restored" in r.getMessage() for r in caplog.records)
  assert len(list((tmp_path / checkpoint_lib.BROKEN_DIR).glob("3-*"))) == 1
  records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if "fr/loss" in r] == [1, 2, 3, 4]
  assert _tensorboard_steps(tmp_path / "tensorboard", "fr/loss") == [1, 2, 3, 4]
  history = run_config.history(tmp_path)
  assert [h["resumed_from_step"] for h in history] == [None, 2]
  assert json.loads((tmp_path / "config.json").read_text())["num_iter"] == 4


def test_a_stop_requested_during_start_up_saves_the_first_step(tmp_path):
  # What train.py's early handler does for a SIGTERM while restoring/compiling.
  loop.request_stop("SIGTERM")
  summary = loop.train(_config(num_iter=4, checkpoint_every=4), tmp_path,
                       batches_fn=batch_lib.fake_batches)
  assert summary["step"] == 1 and summary["preempted"] and loop.exit_code(summary) == 75
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]


def _write_faces(root: Path, count: int, size: int = 48) -> list[str]:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  names = []
  for i in range(count):
    names.append(f"f{i}.png")
    Image.fromarray(rng.integers(0, 255, (size, size, 3), np.uint8)).save(root / names[-1])
  return names


def test_bad_list_entries_found_before_the_first_step(tmp_path):
  names = _write_faces(tmp_path, 10)
  (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
  png = (tmp_path / names[1]).read_bytes()
  (tmp_path / "cut.png").write_bytes(png[:len(png) // 2])  # header fine, pixels cut
  lines = [f"{i % 10} {n} 30 1" for i, n in enumerate(names)]
  lines[3:3] = ["1 missing.jpg 30 1", "2 junk.jpg 30 0", "3 cut.png 40 1"]
  (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
  config = _config(**{"data.name": "mtlface_list", "data.mtlface_list.file": str(tmp_path / "list.txt"),
                      "data.mtlface_list.image_root": str(tmp_path)})
  with pytest.raises(input_pipeline.BadExampleError, match=r"list\.txt:4: image file .*missing"):
    data_sources.train_source(config)
  config.data.verify_images = "full"
  config.data.skip_bad_examples = True
  report = data_sources.train_source(config).report
  assert [loc.rsplit("/", 1)[-1] for loc, _ in report.skipped] == [
      "list.txt:4", "list.txt:5", "list.txt:6"]
  # Header checks only: the pipeline's own decode finds the cut file; one report.
  config.data.verify_images = "header"
  batches = data_sources.train_batches(config, 0)
  where = [loc for loc, _ in batches.report.skipped]
  assert [Path(w).name for w in where[:2]] == ["list.txt:4", "list.txt:5"]
  assert "list.txt:6 (" in where[2] and where[2].endswith("cut.png)")
  assert batches.report.num_ok == 10
  assert next(batches)["image"].shape == (8, 48, 48, 3)


def test_converter_names_the_other_layout(tmp_path):
  tpami = {"encoder.input_layer.0.weight": np.zeros(1), "age_estimator.x": np.zeros(1),
           "decoder.y": np.zeros(1)}
  cvpr = {"module.input_layer.0.weight": np.zeros(1), "module.block1.0.x": np.zeros(1)}
  assert convert.detect_layout(tpami) == "tpami" and convert.detect_layout(cvpr) == "cvpr"
  with pytest.raises(convert.ConversionError,
                     match="this looks like a TPAMI state_dict .*: use --layout tpami$"):
    convert.check_layout("cvpr", [("m.pth", tpami)])
  with pytest.raises(convert.ConversionError, match="use --layout cvpr"):
    convert.check_layout("tpami", [("backbone-1", cvpr)])
  convert.check_layout("tpami", [("m.pth", tpami)])


def test_converter_cli_wrong_layout_is_one_line(tmp_path, capsys):
  torch = pytest.importorskip("torch")
  torch.save({"encoder.input_layer.0.weight": torch.zeros(2), "age_estimator.a": torch.zeros(1),
              "decoder.b": torch.zeros(1)}, tmp_path / "mtlface.pth")
  status = convert.main(["--layout", "cvpr", "--input", str(tmp_path / "mtlface.pth"),
                         "--output", str(tmp_path / "out")])
  error = capsys.readouterr().err.strip()
  assert status == 1 and len(error.splitlines()) == 1
  assert error.endswith("this looks like a TPAMI state_dict (keys encoder.*, age_estimator.*, "
                        "decoder.*): use --layout tpami")
