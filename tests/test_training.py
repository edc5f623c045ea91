"""Training steps, schedules, resume and data parallelism on the tiny config (issue 4)."""

import functools

import jax
import numpy as np
import pytest

from configs import tiny
from mtlface_jax import batch as batch_lib
from mtlface_jax import checkpoint_io
from mtlface_jax.training import loop
from mtlface_jax.training import optim
from mtlface_jax.training import steps


def _config(**overrides):
  config = tiny.get_config()
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value
  return config


def _params(workdir):
  raw, _, _ = checkpoint_io.restore_state(workdir / "checkpoints")
  return raw["variables"], raw


def test_learning_rate_rule():
  schedule = optim.learning_rate_schedule(lr=0.1, warmup=1000, milestone=(20000, 23000),
                                          gamma=0.1, min_lr=1e-4)
  lr_at = lambda t: float(schedule(t - 1))  # t is the 1-indexed step.
  np.testing.assert_allclose(lr_at(1), 0.1 / 1000, rtol=1e-5)
  np.testing.assert_allclose(lr_at(500), 0.05, rtol=1e-5)
  np.testing.assert_allclose(lr_at(1000), 0.1, rtol=1e-5)
  np.testing.assert_allclose(lr_at(1001), 0.1, rtol=1e-5)
  np.testing.assert_allclose(lr_at(20000), 0.1, rtol=1e-5)
  np.testing.assert_allclose(lr_at(20001), 0.01, rtol=1e-5)
  np.testing.assert_allclose(lr_at(23000), 0.01, rtol=1e-5)
  np.testing.assert_allclose(lr_at(23001), 1e-3, rtol=1e-5)
  floor = optim.learning_rate_schedule(lr=0.1, warmup=1, milestone=(2, 3, 4), gamma=0.1, min_lr=1e-4)
  np.testing.assert_allclose(float(floor(10)), 1e-4, rtol=1e-5)


def test_weight_decay_mask():
  params = {"encoder": {"trunk": {"c": {"kernel": 0}, "bn": {"scale": 0, "bias": 0},
                                  "p": {"slope": 0}}},
            "head": {"kernel": 0},
            "age": {"fc1": {"kernel": 0, "bias": 0}},
            "da_age": {"fc1": {"kernel": 0, "bias": 0}}}
  mask = optim.weight_decay_mask(params)
  assert mask["encoder"]["trunk"]["c"]["kernel"] and mask["encoder"]["trunk"]["p"]["slope"]
  assert not mask["encoder"]["trunk"]["bn"]["scale"] and not mask["encoder"]["trunk"]["bn"]["bias"]
  assert mask["head"]["kernel"] and mask["age"]["fc1"]["kernel"] and not mask["age"]["fc1"]["bias"]
  assert not mask["da_age"]["fc1"]["kernel"]


@pytest.mark.parametrize("fr,fas", [(True, False), (False, True), (True, True)])
def test_steps_run_and_loss_falls_on_a_fixed_batch(tmp_path, fr, fas):
  # tiny's own schedule (as in the tests below): the same step programs, so
  # the persistent compilation cache serves them to the later tests.
  config = _config(train_fr=fr, train_fas=fas, num_iter=8, checkpoint_every=100, log_every=1)
  batches = functools.partial(batch_lib.fake_batches, fixed=True)
  first = {}

  def record(config, start):
    it = batches(config, start)
    return it

  summary = loop.train(config, tmp_path, batches_fn=record)
  assert summary["step"] == 8 and summary["nonfinite_total"] == 0
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  import json
  records = [json.loads(l) for l in lines]
  key = "fr/loss" if fr else "fas/d_loss"
  first, last = records[0][key], records[-1][key]
  assert np.isfinite(first) and last < first
  assert (tmp_path / "checkpoints").is_dir()


def test_resume_is_bit_identical(tmp_path):
  config = _config(train_fas=True, num_iter=6, checkpoint_every=3)
  loop.train(config, tmp_path / "straight", batches_fn=batch_lib.fake_batches)
  interrupted = _config(train_fas=True, num_iter=3, checkpoint_every=3)
  loop.train(interrupted, tmp_path / "resumed", batches_fn=batch_lib.fake_batches)
  loop.train(config, tmp_path / "resumed", batches_fn=batch_lib.fake_batches)
  a, raw_a = _params(tmp_path / "straight")
  b, raw_b = _params(tmp_path / "resumed")
  assert int(raw_a["step"]) == int(raw_b["step"]) == 6
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
  jax.tree_util.tree_map(np.testing.assert_array_equal, raw_a["opt_states"], raw_b["opt_states"])


def test_four_devices_match_one(tmp_path):
  if jax.device_count() < 4:
    pytest.skip("needs 4 (simulated) devices")
  # AIFR (SGD): Adam's first steps are sign(g) * lr, so FAS parameters whose
  # gradient is ~0 may legitimately differ by ~lr between reduction orders.
  config = _config(num_iter=3, checkpoint_every=3)
  loop.train(config, tmp_path / "one", batches_fn=batch_lib.fake_batches, devices=jax.devices()[:1])
  loop.train(config, tmp_path / "four", batches_fn=batch_lib.fake_batches, devices=jax.devices()[:4])
  a, _ = _params(tmp_path / "one")
  b, _ = _params(tmp_path / "four")
  jax.tree_util.tree_map(functools.partial(np.testing.assert_allclose, rtol=2e-4, atol=2e-5), a, b)


def test_all_finite_sees_one_nan_or_inf_in_any_leaf():
  grads = {"a": np.ones((3, 2), np.float32), "b": [np.zeros(4, np.float32), np.float32(2.0)]}
  assert bool(steps._all_finite(grads))  # pylint: disable=protected-access
  for bad in (np.nan, np.inf, -np.inf):
    broken = jax.tree_util.tree_map(np.copy, grads)
    broken["b"][0][3] = bad
    assert not bool(steps._all_finite(broken)), bad  # pylint: disable=protected-access
  # Finite elements whose squares overflow float32 also stop the step.
  assert not bool(steps._all_finite({"a": np.full(2, 3e19, np.float32)}))  # pylint: disable=protected-access


def test_nonfinite_steps_are_skipped_then_stop(tmp_path):
  config = _config(num_iter=4, checkpoint_every=1)
  batches = functools.partial(batch_lib.fake_batches, nan_steps=(2,))
  summary = loop.train(config, tmp_path / "skip", batches_fn=batches)
  assert summary["nonfinite_total"] == 1 and summary["step"] == 4
  stop = _config(num_iter=10, checkpoint_every=1, max_consecutive_nonfinite=3)
  batches = functools.partial(batch_lib.fake_batches, nan_steps=range(2, 10))
  with pytest.raises(loop.NonFiniteLossError, match="consecutive non-finite"):
    loop.train(stop, tmp_path / "stop", batches_fn=batches)
  params, raw = _params(tmp_path / "stop")
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(params))
