"""Differentiable augmentation of the discriminator's input (DiffAugment-style).

Both real and synthesized faces are augmented the same way before the
discriminator sees them, in its own update and in the generator's, so the
generator gets gradients through the augmentation. With few FAS steps this
keeps the discriminator from memorising the few real faces it saw and from
keying on exact pixel positions. Colour augmentations are left out on
purpose: hair and skin colour are what age changes most.
"""

import jax
import jax.numpy as jnp

POLICIES = ("translation", "cutout")


def parse_policy(policy: str) -> tuple[str, ...]:
  """"translation,cutout" -> ("translation", "cutout"); "" -> () (no augmentation)."""
  names = tuple(p.strip() for p in policy.split(",") if p.strip())
  unknown = [p for p in names if p not in POLICIES]
  if unknown:
    raise ValueError(f"unknown augmentation {unknown}; use a comma-separated subset of {POLICIES}")
  return names


def translate(images: jax.Array, rng: jax.Array, ratio: float = 0.125) -> jax.Array:
  """Shifts each image by up to ``ratio`` of its side, filling with 0 (mid-grey).

  Args:
    images: [N, H, W, C] in [-1, 1].
    rng: PRNG key.
    ratio: the largest shift as a fraction of the side.

  Returns:
    The shifted images (differentiable in ``images``).
  """
  n, h, w, _ = images.shape
  pad = max(int(round(h * ratio)), 1)
  shifts = jax.random.randint(rng, (n, 2), 0, 2 * pad + 1)
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

  def crop(image, shift):
    return jax.lax.dynamic_slice(image, (shift[0], shift[1], 0), (h, w, image.shape[-1]))

  return jax.vmap(crop)(padded, shifts)


def cutout(images: jax.Array, rng: jax.Array, ratio: float = 0.5) -> jax.Array:
  """Sets a random square of ``ratio`` x the side to 0 (mid-grey) in each image."""
  n, h, w, _ = images.shape
  size_h, size_w = int(h * ratio), int(w * ratio)
  corner = jax.random.uniform(rng, (n, 2)) * jnp.array([h - size_h, w - size_w])
  corner = jnp.round(corner).astype(jnp.int32)
  rows = jnp.arange(h)[None, :, None]
  cols = jnp.arange(w)[None, None, :]
  inside = ((rows >= corner[:, 0, None, None]) & (rows < corner[:, 0, None, None] + size_h)
            & (cols >= corner[:, 1, None, None]) & (cols < corner[:, 1, None, None] + size_w))
  return images * (~inside)[..., None].astype(images.dtype)


def augment(images: jax.Array, rng: jax.Array, policy: tuple[str, ...]) -> jax.Array:
  """Applies the ``policy`` (from :func:`parse_policy`) in order; () returns ``images``."""
  for name, key in zip(policy, jax.random.split(rng, max(len(policy), 1))):
    images = {"translation": translate, "cutout": cutout}[name](images, key)
  return images
