"""Loss functions: known values and masking of unknown labels."""

import jax.numpy as jnp
import numpy as np

from mtlface_jax import losses


def test_classification_loss_masks_unknown_labels():
  logits = jnp.array([[2.0, 0.0], [0.0, 2.0], [5.0, -5.0]])
  labels = jnp.array([0, 0, -1])
  ce0 = np.log1p(np.exp(-2.0))
  ce1 = np.log1p(np.exp(2.0))
  np.testing.assert_allclose(losses.cosface_loss(logits=logits, labels=labels), (ce0 + ce1) / 2, rtol=1e-6)
  assert float(losses.classification_loss(logits=logits, labels=jnp.array([-1, -1, -1]))) == 0.0


def test_age_loss_is_mse_plus_group_ce_over_known_ages():
  expected_age = jnp.array([20.0, 40.0, 3.0])
  group_logits = jnp.zeros((3, 7))
  loss = losses.age_loss(expected_age=expected_age, group_logits=group_logits,
                         ages=jnp.array([22.0, 37.0, -1.0]), groups=jnp.array([2, 3, -1]))
  np.testing.assert_allclose(loss, (4.0 + 9.0) / 2 + np.log(7.0), rtol=1e-6)


def test_lsgan_losses():
  real = jnp.full((2, 5, 5, 1), 1.0)
  fake = jnp.full((2, 5, 5, 1), 0.5)
  np.testing.assert_allclose(losses.lsgan_discriminator_loss(real_scores=real, fake_scores=fake), 0.125)
  np.testing.assert_allclose(losses.lsgan_generator_loss(fake_scores=fake), 0.125)
  np.testing.assert_allclose(losses.feature_mse(source=jnp.ones(3), target=jnp.zeros(3)), 1.0)
