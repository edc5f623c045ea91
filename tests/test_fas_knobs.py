"""The FAS departures from the reference: classifier discriminator, augmentation, reconstruction."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from mtlface_jax import checkpoint_io
from mtlface_jax import losses
from mtlface_jax import predict
from mtlface_jax.models import discriminator as disc_lib
from mtlface_jax.models import spec as spec_lib
from mtlface_jax.training import augment
from mtlface_jax.training import loop
from mtlface_jax.training import optim
from mtlface_jax.training import state as state_lib
from mtlface_jax import batch as batch_lib


def test_classifier_discriminator_has_a_logit_per_group_and_for_fakes():
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 48, 48, 3)), jnp.float32)
  disc = disc_lib.PatchDiscriminator(7, features=(8, 8, 16, 16, 16), conditioning="classifier")
  variables = disc.init(jax.random.PRNGKey(0), images, jnp.array([0, 6]))
  logits = disc.apply(variables, images, jnp.array([0, 6]))
  assert logits.shape == (2, 1, 1, 8)
  # The target group is not an input of the classifier: its logits say which group.
  np.testing.assert_array_equal(logits, disc.apply(variables, images, jnp.array([3, 3])))
  with pytest.raises(ValueError, match="conditioning"):
    disc_lib.PatchDiscriminator(7, conditioning="projection").init(
        jax.random.PRNGKey(0), images, jnp.array([0, 6]))


def test_classifier_losses():
  logits = jnp.zeros((2, 3, 3, 8))  # Uniform: every cross-entropy is log(8).
  real = losses.classifier_discriminator_loss(real_logits=logits, fake_logits=logits,
                                              real_groups=jnp.array([0, 5]))
  assert float(real) == pytest.approx(np.log(8), rel=1e-6)
  confident = jnp.zeros((1, 2, 2, 8)).at[..., 7].set(20.0)  # Says "synthesized".
  assert float(losses.classifier_generator_loss(
      fake_logits=confident, target_groups=jnp.array([2]))) == pytest.approx(20.0, abs=1e-3)
  d_loss = losses.classifier_discriminator_loss(
      real_logits=jnp.zeros((1, 2, 2, 8)).at[..., 2].set(20.0), fake_logits=confident,
      real_groups=jnp.array([2]))
  assert float(d_loss) == pytest.approx(0.0, abs=1e-6)


def test_masked_l1_counts_only_masked_images():
  source = jnp.zeros((3, 2, 2, 3))
  target = jnp.stack([jnp.full((2, 2, 3), v) for v in (1.0, 2.0, 4.0)])
  assert float(losses.masked_l1(source=source, target=target,
                                mask=jnp.array([True, False, True]))) == pytest.approx(2.5)
  assert float(losses.masked_l1(source=source, target=target, mask=jnp.zeros(3, bool))) == 0.0


def test_augmentations_keep_shapes_and_pass_gradients():
  images = jnp.asarray(np.random.default_rng(1).uniform(0.5, 1, (4, 16, 16, 3)), jnp.float32)
  rng = jax.random.PRNGKey(3)
  moved = augment.translate(images, rng)
  assert moved.shape == images.shape
  # A shift by at most 2 pixels (1/8 of 16) fills at most 2 rows/columns with 0.
  zero_rows = (np.asarray(moved) == 0).all(axis=(2, 3)).sum(axis=1)
  assert zero_rows.max() <= 2
  cut = np.asarray(augment.cutout(images, rng))
  assert ((cut == 0).all(axis=-1).sum(axis=(1, 2)) == 64).all()  # An 8x8 square each.
  policy = augment.parse_policy("translation, cutout")
  assert policy == ("translation", "cutout") and augment.parse_policy("") == ()
  np.testing.assert_array_equal(augment.augment(images, rng, ()), images)
  grads = jax.grad(lambda x: jnp.sum(augment.augment(x, rng, policy)))(images)
  assert 0 < float(jnp.sum(grads)) < images.size
  with pytest.raises(ValueError, match="unknown augmentation"):
    augment.parse_policy("color")


def test_fas_runs_with_every_departure(tmp_path):
  config = tiny.get_config()
  config.train_fr, config.train_fas = False, True
  config.num_iter, config.log_every, config.checkpoint_every = 3, 1, 100
  config.model.discriminator_conditioning = "classifier"
  config.fas_d_augment = "translation,cutout"
  config.fas_rec_loss_weight = 10.0
  config.fas_gan_loss_weight = 1.0
  config.fas_ema_decay = 0.5
  summary = loop.train(config, tmp_path, batches_fn=batch_lib.fake_batches)
  assert summary["step"] == 3 and summary["nonfinite_total"] == 0
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert all(np.isfinite(r["fas/g_loss"]) and np.isfinite(r["fas/g_rec"]) for r in records)
  # Uniform D logits at the start: its loss begins near log(G + 1).
  assert records[0]["fas/d_loss"] == pytest.approx(np.log(8), rel=0.2)
  # The checkpoint keeps the trained weights and their average; loading predicts with the average.
  saved, _, _ = checkpoint_io.restore_variables(tmp_path)
  trained, averaged = saved["generator"]["params"], saved["generator"][spec_lib.GENERATOR_EMA]
  gaps = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
      lambda a, b: np.abs(a - b).max(), trained, averaged))
  assert max(gaps) > 0
  loaded = predict.load(tmp_path)
  assert spec_lib.GENERATOR_EMA not in loaded.variables["generator"]
  assert "generator_weights" in loaded.info
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded.variables["generator"]["params"],
                         averaged)


def test_generator_average_restarts_at_step_zero_and_decays():
  generator = {"params": {"w": jnp.zeros(2)}, spec_lib.GENERATOR_EMA: {"w": jnp.full(2, 9.0)},
               "batch_stats": {"m": jnp.ones(1)}}
  first = state_lib.generator_with_ema(generator, {"w": jnp.full(2, 4.0)}, jnp.array(0), 0.75)
  # At step 0 the stale average (9) is replaced by the starting weights (0): 0.75*0 + 0.25*4.
  np.testing.assert_allclose(first[spec_lib.GENERATOR_EMA]["w"], [1.0, 1.0])
  np.testing.assert_array_equal(first["params"]["w"], [4.0, 4.0])
  assert first["batch_stats"] is generator["batch_stats"]
  later = state_lib.generator_with_ema(first, {"w": jnp.full(2, 8.0)}, jnp.array(1), 0.75)
  np.testing.assert_allclose(later[spec_lib.GENERATOR_EMA]["w"], [2.75, 2.75])  # .75*1 + .25*8
  off = state_lib.generator_with_ema({"params": {"w": jnp.zeros(2)}}, {"w": jnp.ones(2)},
                                     jnp.array(5), 0.0)
  assert set(off) == {"params"}


def test_fas_learning_rate_decay():
  config = tiny.get_config()
  params = {"w": jnp.ones(3)}
  grads = {"w": jnp.ones(3)}

  def first_and_last_step(decay, num_iter=4):
    with config.unlocked():
      config.fas_optim.decay = decay
    generator, _ = optim.fas_optimizers(config.fas_optim, num_iter)
    state, moves = generator.init(params), []
    for _ in range(num_iter):
      updates, state = generator.update(grads, state, params)
      moves.append(float(jnp.abs(updates["w"][0])))
    return moves[0], moves[-1]

  lr = config.fas_optim.g_lr
  assert first_and_last_step("constant") == pytest.approx((lr, lr), rel=1e-3)
  first, last = first_and_last_step("linear")
  assert first == pytest.approx(lr, rel=1e-3) and last == pytest.approx(lr / 4, rel=1e-3)
  with pytest.raises(ValueError, match="decay"):
    first_and_last_step("cosine")


def test_spec_carries_the_discriminator_conditioning():
  config = tiny.get_config()
  with config.unlocked():
    config.model.discriminator_conditioning = "classifier"
  spec = spec_lib.from_config(config)
  again = spec_lib.ModelSpec.from_dict(spec.to_dict())
  assert spec_lib.build(again).discriminator.conditioning == "classifier"
  # Specs written before the key existed build the reference discriminator.
  older = dict(spec.to_dict(), discriminator={"features": spec.discriminator["features"]})
  assert spec_lib.build(spec_lib.ModelSpec.from_dict(older)).discriminator.conditioning == "concat"
