"""TPAMI FAS training (issue 15, item 1): configs/fas_tpami.py:tiny and training/tpami_steps.py.

One jitted step is compiled in the module fixture; the loop tests run the same
programs (same config, same 4-device mesh), which the persistent compilation
cache of conftest.py serves without compiling again. That first compile of the
StyleGAN2 step's backward pass takes about a minute on a 2-core CPU (the
tests that need it ~3 minutes together), beyond the suite's budget, so they
run with ``MTLFACE_SLOW_TESTS=1`` (``make test-slow``); the config and the
loss's known answer run always.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import fas_tpami
from mtlface_jax import batch as batch_lib
from mtlface_jax import checkpoint_io
from mtlface_jax import convert
from mtlface_jax.models import spec as spec_lib
from mtlface_jax.training import loop
from mtlface_jax.training import sharding
from mtlface_jax.training import steps
from mtlface_jax.training import tpami_steps
from tests import conftest


def _config(**overrides):
  config = fas_tpami.get_config("tiny")
  for key, value in overrides.items():
    config[key] = value
  return config


def _batch(config):
  batch = next(batch_lib.fake_batches(config, 0))
  # Two samples aged to their own group (the reconstruction term), two to another.
  batch["target_group"][:2] = batch["group"][:2]
  batch["target_group"][2:] = (batch["group"][2:] + 1) % config.age_group
  return batch


@pytest.fixture(scope="module")
def one_step():
  """(config, variables before, variables after, metrics) of one compiled TPAMI step."""
  config = _config()
  mesh = sharding.make_mesh()
  if not conftest.SLOW_TESTS:
    pytest.skip("compiles the TPAMI training step (about a minute on a CPU): MTLFACE_SLOW_TESTS=1")
  step = loop.build_step(config, mesh)
  state = step.create_state()
  before = jax.device_get(state.variables)
  step_fn = step.fn
  rng = jax.device_put(jax.random.PRNGKey(1), sharding.replicated(mesh))
  batch = sharding.put_batch(_batch(config), sharding.batch_sharded(mesh))
  state, metrics = step_fn(state, batch, rng)
  return config, before, jax.device_get(state.variables), jax.device_get(metrics)


def test_tiny_config_builds_the_tpami_generator():
  config = _config()
  spec = spec_lib.from_config(config)
  assert spec.family == "tpami" and spec.image_size == 112
  models = spec_lib.build(spec)
  assert type(models.generator).__name__ == "TPAMIGenerator"
  assert models.generator.style_dim == 32 and models.generator.channels == (32, 32, 32, 24, 16, 16)
  with pytest.raises(ValueError, match="train_fas"):
    tpami_steps.check_config(_config(train_fr=True))
  with pytest.raises(ValueError, match="variant"):
    fas_tpami.get_config("huge")


def test_demo_aifr_trains_the_encoder_that_demo_fas_loads():
  """configs/fas_tpami.py:demo_aifr is AIFR of the TPAMI encoder (steps.py's step, not
  tpami_steps'), and every encoder / age variable it trains has the path and shape
  the :demo FAS model expects, so init_from transfers them all (training/transfer.py)."""
  aifr, fas = fas_tpami.get_config("demo_aifr"), fas_tpami.get_config("demo")
  assert (aifr.train_fr, aifr.train_fas, fas.train_fr, fas.train_fas) == (True, False, False, True)
  assert aifr.image_size == fas.image_size == 112 and aifr.eval_every > 0
  step = loop.build_step(aifr, sharding.make_mesh())
  assert "fr" in jax.eval_shape(step.initial_state, jax.random.PRNGKey(0)).opt_states

  def shapes(config):
    models = spec_lib.build(spec_lib.from_config(config))
    tree = jax.eval_shape(lambda: spec_lib.init_variables(
        models, config.image_size, ("encoder", "age"), jax.random.PRNGKey(0)))
    return {jax.tree_util.keystr(p): v.shape
            for p, v in jax.tree_util.tree_leaves_with_path(tree)}

  assert shapes(aifr) == shapes(fas)


def test_step_traces_in_the_default_suite():
  """The whole TPAMI step, traced (shapes only, no compile): a changed signature of
  the steps it shares with the CVPR FAS fails here, not only under MTLFACE_SLOW_TESTS."""
  config = _config()
  step = loop.build_step(config, sharding.make_mesh())
  state = jax.eval_shape(step.initial_state, jax.random.PRNGKey(0))
  new_state, metrics = jax.eval_shape(step.fn, state, batch_lib.spec(config),
                                      jax.random.PRNGKey(1))
  assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)
  for key in ("fas/g_loss", "fas/g_rec", "fas/g_tpami_rec", "fas/g_latent_reg", "fas/d_loss"):
    assert metrics[key].shape == (), key


def test_loss_terms_are_finite_and_add_up(one_step):
  config, _, _, metrics = one_step
  for key in ("fas/d_loss", "fas/g_loss", "fas/g_gan", "fas/g_id", "fas/g_age", "fas/g_rec",
              "fas/g_tpami_rec", "fas/g_latent_reg", "fas/g_grad_norm", "fas/d_grad_norm"):
    assert np.isfinite(metrics[key]), key
  assert int(metrics["nonfinite_total"]) == 0
  assert metrics["fas/g_tpami_rec"] > 0 and metrics["fas/rec_fraction"] == pytest.approx(0.5)
  expected = (config.fas_gan_loss_weight * metrics["fas/g_gan"]
              + config.fas_id_loss_weight * metrics["fas/g_id"]
              + config.fas_age_loss_weight * metrics["fas/g_age"]
              + config.fas_rec_loss_weight * metrics["fas/g_rec"]
              + config.fas_tpami_rec_loss_weight * metrics["fas/g_tpami_rec"]
              + config.fas_tpami_latent_reg_weight * metrics["fas/g_latent_reg"])
  np.testing.assert_allclose(metrics["fas/g_loss"], expected, rtol=1e-5)


def _changed(a, b) -> bool:
  return any(not np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                       jax.tree_util.tree_leaves(b)))


def test_one_step_trains_only_generator_params_and_discriminator(one_step):
  _, before, after, _ = one_step
  assert _changed(before["generator"]["params"], after["generator"]["params"])
  assert _changed(before["discriminator"]["params"], after["discriminator"]["params"])
  jax.tree_util.tree_map(np.testing.assert_array_equal, before["encoder"], after["encoder"])
  jax.tree_util.tree_map(np.testing.assert_array_equal, before["age"], after["age"])
  jax.tree_util.tree_map(np.testing.assert_array_equal, before["generator"]["buffers"],
                         after["generator"]["buffers"])


def test_generator_loss_known_answer(monkeypatch):
  """Reconstruction and latent terms on constant inputs, with the CVPR part stubbed to 0."""
  monkeypatch.setattr(steps, "_generator_loss", lambda fake, **_: (jnp.float32(0.0), (None, {})))
  fake = jnp.zeros((4, 2, 2, 3))
  images = jnp.full((4, 2, 2, 3), 2.0)
  latents = jnp.full((4, 3, 5), 0.5)
  target = jnp.array([1, 2, 3, 4])
  source_group = jnp.array([1, 0, 3, -1])  # samples 0 and 2 reconstruct; -1 never does

  def loss(**weights):
    config = _config(**weights)
    batch = {"image": images, "group": source_group, "target_group": target}
    value, (_, metrics) = tpami_steps.tpami_generator_loss(
        (fake, latents), batch=batch, models=None, config=config, variables=None,
        d_variables=None, source_id=None, rng=jax.random.PRNGKey(0))
    return float(value), metrics

  value, metrics = loss(fas_tpami_rec_loss_weight=0.0, fas_tpami_latent_reg_weight=0.0)
  assert value == 0.0 and float(metrics["fas/g_tpami_rec"]) == pytest.approx(4.0)
  assert loss(fas_tpami_rec_loss_weight=0.5, fas_tpami_latent_reg_weight=0.0)[0] == pytest.approx(2.0)
  assert loss(fas_tpami_rec_loss_weight=0.5, fas_tpami_latent_reg_weight=0.0,
              fas_tpami_rec_norm="l1")[0] == pytest.approx(1.0)
  assert loss(fas_tpami_rec_loss_weight=0.0, fas_tpami_latent_reg_weight=2.0)[0] == pytest.approx(0.5)
  none = tpami_steps.reconstruction_loss(fake=fake, images=images,
                                         same_group=jnp.zeros(4, bool))
  assert float(none) == 0.0


def _variables(workdir):
  raw, _, _ = checkpoint_io.restore_state(workdir / "checkpoints")
  return raw


def test_train_py_path_resumes_bit_identically(tmp_path, one_step):
  del one_step  # compiled first: the loop runs hit the persistent cache
  config = _config(num_iter=2, checkpoint_every=1)
  summary = loop.train(config, tmp_path / "straight", batches_fn=batch_lib.fake_batches)
  assert summary["step"] == 2 and "fas/g_tpami_rec" in summary["last_metrics"]
  loop.train(_config(num_iter=1, checkpoint_every=1), tmp_path / "resumed",
             batches_fn=batch_lib.fake_batches)
  loop.train(config, tmp_path / "resumed", batches_fn=batch_lib.fake_batches)
  a, b = _variables(tmp_path / "straight"), _variables(tmp_path / "resumed")
  assert int(a["step"]) == int(b["step"]) == 2
  jax.tree_util.tree_map(np.testing.assert_array_equal, a["variables"], b["variables"])
  jax.tree_util.tree_map(np.testing.assert_array_equal, a["opt_states"], b["opt_states"])


def test_init_from_a_converted_release(tmp_path, one_step):
  """A conversion-format checkpoint (encoder, age, generator; no discriminator) seeds the run."""
  config, before, after, _ = one_step
  # Distinct from a fresh initialisation: a scaled encoder and the stepped generator.
  release = {"encoder": jax.tree_util.tree_map(lambda x: x * 1.5, before["encoder"]),
             "age": before["age"], "generator": after["generator"]}
  meta = {"converted_from": "pytorch", "layout": "tpami", "age_group": config.age_group,
          "model": spec_lib.from_config(config).to_dict()}
  source = convert.save_conversion(convert.Conversion(release, meta, convert.ConversionReport()),
                                   tmp_path / "release")
  run = _config(num_iter=1, checkpoint_every=1, init_from=str(source))
  loop.train(run, tmp_path / "run", batches_fn=batch_lib.fake_batches)
  trained = _variables(tmp_path / "run")["variables"]
  jax.tree_util.tree_map(np.testing.assert_array_equal, release["encoder"], trained["encoder"])
  jax.tree_util.tree_map(np.testing.assert_array_equal, release["age"], trained["age"])
  assert _changed(release["generator"]["params"], trained["generator"]["params"])
