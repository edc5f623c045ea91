"""Tests of the throughput benchmark helpers and the one-pass BatchNorm statistics."""

from pathlib import Path
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import profile_summary  # pylint: disable=g-import-not-at-top
from benchmarks import train_throughput  # pylint: disable=g-import-not-at-top
from mtlface_jax.models import layers  # pylint: disable=g-import-not-at-top


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
  assert small["hlo_gflop_per_step"] >= 0 and large["hlo_gflop_per_image"] > 0
  # Per-image cost is batch independent up to the batch-free optimizer work.
  assert large["hlo_gflop_per_image"] <= small["hlo_gflop_per_image"] * 1.05


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
