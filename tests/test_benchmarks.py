"""Tests of the throughput benchmark helpers and the one-pass BatchNorm statistics."""

import json
import os
from pathlib import Path
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import flop_count  # pylint: disable=g-import-not-at-top
from benchmarks import profile_summary  # pylint: disable=g-import-not-at-top
from benchmarks import side_by_side  # pylint: disable=g-import-not-at-top
from benchmarks import train_loop  # pylint: disable=g-import-not-at-top
from benchmarks import train_throughput  # pylint: disable=g-import-not-at-top
from mtlface_jax.models import layers  # pylint: disable=g-import-not-at-top
from tests import conftest  # pylint: disable=g-import-not-at-top


def test_parse_run_accepts_tasks_and_rejects_bad_input():
  assert train_throughput.parse_run("aifr:128") == ("aifr", 128)
  assert train_throughput.parse_run("infer:8") == ("infer", 8)
  for bad in ("aifr", "aifr:0", "aifr:x", "train:64", "fas:-1"):
    with pytest.raises(ValueError, match="bad run"):
      train_throughput.parse_run(bad)


def test_kernel_class_names():
  cls = profile_summary.kernel_class
  assert cls("sm90_xmma_fprop_implicit_gemm_bf16bf16") == "convolution (cuDNN)"
  assert cls("input_reduce_fusion_65") == "xla reduction fusion"
  assert cls("loop_add_fusion_76") == "xla loop fusion"
  assert cls("Memset 3") == "memcpy/memset"
  assert cls("triton_gemm_dot_1") == "triton fusion"


def test_count_flops_of_reduced_aifr_step_scales_with_batch():
  args = train_throughput.argparse.Namespace(model="reduced", dtype="float32")
  small = train_throughput.count_flops(args, "aifr", 2)
  large = train_throughput.count_flops(args, "aifr", 4)
  assert small["flops_source"] == "xla_cpu_cost_analysis"
  assert small["flops_per_step"] > 0 and large["xla_gflop_per_image"] > 0
  # Per-image cost is batch independent up to the batch-free optimizer work.
  assert large["xla_gflop_per_image"] <= small["xla_gflop_per_image"] * 1.05


def test_dense_flops_of_one_convolution_and_matmul():
  x = jax.ShapeDtypeStruct((2, 10, 10, 3), jnp.float32)
  w = jax.ShapeDtypeStruct((3, 3, 3, 16), jnp.float32)
  m = jax.ShapeDtypeStruct((16, 5), jnp.float32)

  def f(x, w, m):
    y = jax.lax.conv_general_dilated(x, w, (2, 2), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.jit(lambda y: y @ m)(y)  # the matmul inside a nested jit

  # conv: 2 * (2*5*5*16 outputs) * (3*3*3 MACs each); matmul: 2 * (2*5*5*5) * 16.
  expected = 2 * (2 * 5 * 5 * 16) * 27 + 2 * (2 * 5 * 5 * 5) * 16
  assert flop_count.dense_flops(jax.make_jaxpr(f)(x, w, m)) == expected


def test_dense_flops_of_the_full_ir50_forward_is_the_published_12_6_gflop():
  from mtlface_jax.models import spec as spec_lib  # pylint: disable=g-import-not-at-top
  config = train_throughput.build_config("infer", 1, "full", "bfloat16")
  encoder = spec_lib.build_from_config(config).encoder
  _, variables_fn = train_throughput.inference_fns(config)
  variables = jax.eval_shape(variables_fn, jax.random.PRNGKey(0))
  image = jax.ShapeDtypeStruct((1, 112, 112, 3), jnp.float32)
  jaxpr = jax.make_jaxpr(lambda v, x: encoder.apply(v, x, train=False))(variables, image)
  assert flop_count.dense_flops(jaxpr) / 1e9 == pytest.approx(12.6, rel=0.01)


def test_timed_run_reports_the_cpu_lowering_flop_count():
  args = train_throughput.argparse.Namespace(
      model="reduced", dtype="float32", warmup=1, steps=1, repeats=1, hlo_dir="",
      profile_dir="", top=5)
  timed = train_throughput.measure_train(args, "aifr", 2)
  counted = train_throughput.count_flops(args, "aifr", 2)
  assert timed["flops_source"] == counted["flops_source"] == "xla_cpu_cost_analysis"
  assert timed["flops_per_step"] == counted["flops_per_step"] > 0
  # Plausible: within a factor 2 of the dense conv/matmul count of the same trace
  # (XLA skips padding; the dense count omits elementwise work).
  assert 0.5 < timed["xla_vs_dense"] < 2.0
  expected_tflops = timed["flops_per_step"] / (timed["ms_per_step"] / 1e3) / 1e12
  assert timed["achieved_tflops"] == pytest.approx(expected_tflops, abs=0.06)
  assert timed["images_per_s"] > 0 and timed["step"] == 2


def test_batchnorm_one_pass_variance_with_large_mean_offset():
  """The running-mean shift keeps one-pass statistics exact when |mean| >> std."""
  rng = np.random.default_rng(0)
  bn = layers.BatchNorm(decay=0.0)  # running stats := the last batch's
  draw = lambda: (50.0 + 2.0 * rng.standard_normal((64, 7, 7, 8))).astype(np.float32)
  variables = bn.init(jax.random.PRNGKey(0), jnp.asarray(draw()), train=False)
  # First step: the shift is the initial running mean (0); float32 still holds.
  x = draw()
  _, updates = bn.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
  flat = x.reshape(-1, 8).astype(np.float64)
  np.testing.assert_allclose(updates["batch_stats"]["var"], flat.var(0, ddof=1), rtol=1e-3)
  # Next step: shifted by the tracked mean, the cancellation is gone.
  variables = {**variables, **updates}
  x = draw()
  y, updates = bn.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
  flat = x.reshape(-1, 8).astype(np.float64)
  np.testing.assert_allclose(updates["batch_stats"]["mean"], flat.mean(0), rtol=1e-6)
  np.testing.assert_allclose(updates["batch_stats"]["var"], flat.var(0, ddof=1), rtol=2e-5)
  expected = (flat - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-5)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 8), expected, rtol=1e-4, atol=1e-4)


def test_timed_batches_times_the_steady_state_between_requests():
  timed = train_loop.TimedBatches(lambda config, start: iter(range(start, start + 6)))
  assert list(timed(None, 10)) == list(range(10, 16))
  timed.asked = [0.0, 5.0, 6.0, 7.0, 8.0, 9.0]  # step 0 compiles; one second per step after
  timed.waited = [0.1, 0.5, 0.5, 0.5, 0.5, 0.5]
  assert timed.steady_state(1) == (4.0, 4, 0.5)
  with pytest.raises(ValueError, match="none to time"):
    timed.steady_state(5)


def test_train_loop_benchmark_runs_the_tiny_config(tmp_path):
  result = train_loop.main([
      "train_loop", f"--config={Path(__file__).resolve().parents[1] / 'configs' / 'tiny.py'}",
      "--steps=5", "--warmup=2", "--pipeline_batches=2", "--num_devices=1",
      f"--workdir={tmp_path}", "--config.log_every=2"])
  for field in ("loop_images_per_s", "pure_step_images_per_s", "loop_vs_pure",
                "input_pipeline_images_per_s", "loop_ms_per_step", "pure_ms_per_step"):
    assert result[field] > 0, field
  assert result["loop_vs_pure"] == pytest.approx(
      result["loop_images_per_s"] / result["pure_step_images_per_s"], rel=1e-3)
  assert result["timed_steps"] == 2 and result["final_step"] == 5
  assert result["task"] == "aifr" and result["batch_size"] == 8 and result["num_devices"] == 1
  assert 0 <= result["loop_input_wait_fraction"] < 1
  assert {"jax", "jaxlib", "flax", "device", "backend"} <= set(result["environment"])
  assert (tmp_path / "run" / "metrics.jsonl").is_file()  # the real loop ran


def _run(framework, task, batch, rate, config=None, digest="d0"):
  run = {"framework": framework, "task": task, "batch": batch, "images_per_s": rate,
         "batch_digest": digest}
  return {**run, "config": config} if config else run


def test_side_by_side_compares_jax_with_the_best_torch_configuration():
  runs = [_run("jax", "aifr", 256, 9000.0), _run("torch", "aifr", 256, 2000.0, "amp_eager"),
          _run("torch", "aifr", 256, 4000.0, "channels_last"),
          {"framework": "torch", "task": "aifr", "batch": 256, "config": "channels_last_compile",
           "error": "RuntimeError: boom"},
          _run("jax", "fas", 128, 4100.0), _run("torch", "fas", 128, 1000.0, "amp_eager", "d1")]
  table = side_by_side.compare(runs)
  aifr = table["aifr:256"]
  assert aifr["best_torch_config"] == "channels_last" and aifr["best_torch_images_per_s"] == 4000
  assert aifr["ratio_to_best_torch"] == 2.25
  assert aifr["ratio_to_each_torch"] == {"amp_eager": 4.5, "channels_last": 2.25}
  assert aifr["same_batches"] is True and table["fas:128"]["same_batches"] is False
  judged = side_by_side.targets(table, tiny=False)
  assert judged["aifr:256"]["met"] is False  # 9,000 < 10,000 and 2.25 < 2.5
  assert judged["fas:128"]["met"] is True  # 4,100 >= 4,000 and 4.1 >= 4
  assert side_by_side.targets(table, tiny=True)["fas:128"]["met"] == "not judged (--tiny)"


def test_side_by_side_plan_orders_children_and_groups_them():
  args = side_by_side.parse_args(["--runs", "aifr:256,fas:128", "--torch_configs",
                                  "amp_eager,channels_last"])
  children = side_by_side.plan(args)
  assert [[(s["framework"], s["task"], s.get("config")) for s in c] for c in children] == [
      [("jax", "aifr", None)], [("torch", "aifr", "amp_eager"), ("torch", "aifr", "channels_last")],
      [("jax", "fas", None)], [("torch", "fas", "amp_eager"), ("torch", "fas", "channels_last")]]
  assert args.steps == 20 and args.group == "run"
  tiny = side_by_side.parse_args(["--tiny"])
  assert len(side_by_side.plan(tiny)) == 2 and tiny.runs == side_by_side.TINY_RUNS


# side_by_side's planning and JSON are tested above in the default suite; the
# script's whole CPU dry run (JAX and PyTorch) costs ~65 s of CI's 10 minutes.
@conftest.slow("the GPU script's CPU dry run (about a minute)")
def test_device_check_dry_run_writes_one_side_by_side_json(tmp_path):
  """The GPU script's own path with tiny shapes on the CPU: JAX and PyTorch, same batches."""
  env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
  script = Path(__file__).resolve().parents[1] / "benchmarks" / "device_check.sh"
  proc = subprocess.run(["bash", str(script), "--dry-run"], env=env, capture_output=True,
                        text=True, timeout=1800, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  doc = json.loads((tmp_path / "side_by_side.json").read_text())
  assert doc["finished"] and doc["tiny"] and doc["schema"] == "mtlface_jax.side_by_side/1"
  for key in ("jax", "jaxlib", "flax", "optax", "torch", "python"):
    assert doc["environment"][key], key
  runs = {(r["framework"], r["task"], r.get("config")): r for r in doc["runs"]}
  assert set(runs) == {(f, t, c) for t in ("aifr", "fas", "infer")
                       for f, c in (("jax", None), ("torch", "amp_eager"),
                                    ("torch", "channels_last"))}
  for run in runs.values():
    assert "error" not in run, run
    assert run["images_per_s"] > 0 and run["ms_per_step"] > 0 and run["peak_memory_gib"] > 0
    # images/s is rounded to 2 decimals: tiny CPU runs make well under 1 image/s.
    assert run["images_per_s"] == pytest.approx(2 / run["ms_per_step"] * 1e3, rel=1e-3, abs=0.006)
  for task in ("aifr", "fas", "infer"):
    row = doc["comparison"][f"{task}:2"]
    assert row["same_batches"] is True  # one digest for the JAX and both PyTorch runs
    best = row["best_torch_images_per_s"]
    assert row["ratio_to_best_torch"] == pytest.approx(row["jax_images_per_s"] / best, rel=1e-2)
