"""Face age synthesis with trained variables: every age group for each input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mtlface_jax.models import mtlface


def synthesize(models: mtlface.MTLFaceModels, variables: dict, images: jax.Array,
               target_group: jax.Array) -> jax.Array:
  """Ages ``images`` [N,H,W,3] in [-1,1] to ``target_group`` [N] (inference mode)."""
  out = models.encoder.apply(variables["encoder"], images, train=False)
  return models.generator.apply(variables["generator"], images, out.x2, out.x3, out.x4,
                                out.x_id, target_group, train=False)


def synthesize_all_groups(models: mtlface.MTLFaceModels, variables: dict,
                          images: jax.Array, num_groups: int) -> jax.Array:
  """Returns [N, G, H, W, 3]: each input rendered at every age group.

  The encoder runs once per input; only the generator repeats per group.
  """
  out = models.encoder.apply(variables["encoder"], images, train=False)
  n = images.shape[0]

  def one_group(group):
    target = jnp.full((n,), group, jnp.int32)
    return models.generator.apply(variables["generator"], images, out.x2, out.x3, out.x4,
                                  out.x_id, target, train=False)

  return jnp.stack([one_group(g) for g in range(num_groups)], axis=1)


@functools.lru_cache(maxsize=8)
def jitted_all_groups(models: mtlface.MTLFaceModels, num_groups: int):
  """A cached jitted :func:`synthesize_all_groups` for ``models``."""
  return jax.jit(functools.partial(synthesize_all_groups, models, num_groups=num_groups))


def progression_grid(images: np.ndarray, synthesized: np.ndarray) -> np.ndarray:
  """Tiles rows of [input, group 0, ..., group G-1] into one uint8 HWC image.

  Args:
    images: [N, H, W, 3] inputs in [-1, 1].
    synthesized: [N, G, H, W, 3] outputs in [-1, 1].

  Returns:
    uint8 array of shape [N*H, (G+1)*W, 3].
  """
  rows = np.concatenate([np.asarray(images)[:, None], np.asarray(synthesized)], axis=1)
  n, cols, h, w, c = rows.shape
  grid = rows.transpose(0, 2, 1, 3, 4).reshape(n * h, cols * w, c)
  return np.clip((grid + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
