"""MTLFace losses as pure, keyword-only functions.

Labels of -1 mark unknown identity/age (e.g. LFW has no ages, UTKFace no
identities); every loss here takes the mean over the known samples only and
is 0 when a batch has none. All losses are computed in float32.
"""

import jax
import jax.numpy as jnp
import optax


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of ``values`` where ``mask`` is true; 0 if nothing is selected."""
  mask = mask.astype(jnp.float32)
  return jnp.sum(values.astype(jnp.float32) * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def classification_loss(*, logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Softmax cross-entropy over samples with ``labels >= 0``.

  Args:
    logits: [N, K] logits (CosFace margin logits, or group logits).
    labels: [N] integer labels, -1 for unknown.

  Returns:
    Scalar mean cross-entropy over the labelled samples.
  """
  known = labels >= 0
  ce = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), jnp.where(known, labels, 0))
  return masked_mean(ce, known)


def cosface_loss(*, logits: jax.Array, labels: jax.Array) -> jax.Array:
  """CosFace loss: cross-entropy of the margin logits (``CosFace(emb, labels)``)."""
  return classification_loss(logits=logits, labels=labels)


def age_loss(*, expected_age: jax.Array, group_logits: jax.Array, ages: jax.Array,
             groups: jax.Array) -> jax.Array:
  """MSE(expected age, age) + cross-entropy(group logits, group), known ages only.

  Args:
    expected_age: [N] DEX expected ages.
    group_logits: [N, G] age-group logits.
    ages: [N] true ages, negative for unknown.
    groups: [N] true groups, -1 for unknown.

  Returns:
    Scalar loss.
  """
  known = ages >= 0
  mse = masked_mean(jnp.square(expected_age.astype(jnp.float32) - ages.astype(jnp.float32)), known)
  return mse + classification_loss(logits=group_logits, labels=jnp.where(known, groups, -1))


def lsgan_discriminator_loss(*, real_scores: jax.Array, fake_scores: jax.Array) -> jax.Array:
  """0.5 * (mean((D(real) - 1)^2) + mean(D(fake)^2))."""
  real = jnp.mean(jnp.square(real_scores.astype(jnp.float32) - 1.0))
  fake = jnp.mean(jnp.square(fake_scores.astype(jnp.float32)))
  return 0.5 * (real + fake)


def lsgan_generator_loss(*, fake_scores: jax.Array) -> jax.Array:
  """0.5 * mean((D(fake) - 1)^2)."""
  return 0.5 * jnp.mean(jnp.square(fake_scores.astype(jnp.float32) - 1.0))


def feature_mse(*, source: jax.Array, target: jax.Array) -> jax.Array:
  """Mean squared error between two feature maps (identity preservation)."""
  return jnp.mean(jnp.square(source.astype(jnp.float32) - target.astype(jnp.float32)))


def accuracy(*, logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Top-1 accuracy over samples with ``labels >= 0``."""
  return masked_mean(jnp.argmax(logits, axis=-1) == labels, labels >= 0)


def patch_classification_loss(*, logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy of every patch's logits against its image's label.

  Args:
    logits: [N, h, w, K] per-patch logits.
    labels: [N] integer labels in [0, K).

  Returns:
    Scalar mean over images and patches.
  """
  labels = jnp.broadcast_to(labels[:, None, None], logits.shape[:3])
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels))


def classifier_discriminator_loss(*, real_logits: jax.Array, fake_logits: jax.Array,
                                  real_groups: jax.Array) -> jax.Array:
  """0.5 * (CE(D(real), its age group) + CE(D(fake), the "synthesized" class G)).

  For the ``classifier`` discriminator: G + 1 logits per patch, the last one
  the "synthesized" class.
  """
  num_groups = real_logits.shape[-1] - 1
  fake_class = jnp.full(fake_logits.shape[:1], num_groups, jnp.int32)
  return 0.5 * (patch_classification_loss(logits=real_logits, labels=real_groups)
                + patch_classification_loss(logits=fake_logits, labels=fake_class))


def classifier_generator_loss(*, fake_logits: jax.Array, target_groups: jax.Array) -> jax.Array:
  """CE(D(fake), target group): the fake must pass for a real face of its target group."""
  return patch_classification_loss(logits=fake_logits, labels=target_groups)


def masked_l1(*, source: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean |source - target| over the images where ``mask`` [N] is true (0 if none)."""
  per_image = jnp.mean(jnp.abs(source.astype(jnp.float32) - target.astype(jnp.float32)),
                       axis=tuple(range(1, source.ndim)))
  return masked_mean(per_image, mask)
