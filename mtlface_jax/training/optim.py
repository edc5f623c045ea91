"""Optimizers and the reference learning-rate and weight-decay rules."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

# Leaves that the reference decays: conv/linear weights and PReLU slopes.
DECAYED_LEAVES = ("kernel", "slope")
# Modules whose weights are decayed; the adversarial age estimator is not.
DECAYED_MODULES = ("encoder", "head", "age")


def learning_rate_schedule(*, lr: float, warmup: int, milestone, gamma: float,
                           min_lr: float) -> optax.Schedule:
  """The reference rule with step t counted from 1.

  t <= warmup: lr * t / warmup; afterwards lr * gamma ** (#milestones < t);
  never below ``min_lr``. optax passes the 0-based update count, so t = count + 1.

  Returns:
    A schedule ``count -> learning rate``.
  """
  milestones = jnp.asarray(tuple(milestone) or (jnp.iinfo(jnp.int32).max,), jnp.int32)

  def schedule(count):
    t = jnp.asarray(count, jnp.int32) + 1
    warm = lr * t.astype(jnp.float32) / max(warmup, 1)
    decayed = lr * gamma ** jnp.sum(milestones < t).astype(jnp.float32)
    return jnp.maximum(jnp.where(t <= warmup, warm, decayed), min_lr)

  return schedule


def schedule_from_config(optim_config) -> optax.Schedule:
  """:func:`learning_rate_schedule` from a config's ``optim`` section."""
  return learning_rate_schedule(lr=optim_config.lr, warmup=optim_config.warmup,
                                milestone=optim_config.milestone, gamma=optim_config.gamma,
                                min_lr=optim_config.min_lr)


def weight_decay_mask(params) -> dict:
  """True for the leaves that get weight decay (see DECAYED_LEAVES/MODULES)."""
  def decide(path, _):
    keys = [getattr(p, "key", None) for p in path]
    return keys[0] in DECAYED_MODULES and keys[-1] in DECAYED_LEAVES
  return jax.tree_util.tree_map_with_path(decide, params)


def aifr_optimizer(optim_config) -> optax.GradientTransformation:
  """SGD with momentum, decay added to the gradients as ``torch.optim.SGD`` does."""
  schedule = schedule_from_config(optim_config)
  return optax.chain(optax.add_decayed_weights(optim_config.weight_decay, weight_decay_mask),
                     optax.sgd(schedule, momentum=optim_config.momentum))


FAS_DECAYS = ("constant", "linear")


def fas_optimizers(fas_config, num_iter: int = 0
                   ) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
  """Adam for the generator and the discriminator.

  Args:
    fas_config: ``config.fas_optim``; ``decay`` "constant" (the reference's
      fixed learning rates) or "linear" (to 0 at step ``num_iter``: a short
      run ends on a settled generator instead of a snapshot of the GAN's
      oscillation).
    num_iter: steps of the run (for "linear").

  Returns:
    ``(generator, discriminator)`` optimizers.
  """
  decay = fas_config.get("decay", "constant")
  if decay not in FAS_DECAYS:
    raise ValueError(f"fas_optim.decay must be one of {FAS_DECAYS}, got {decay!r}")
  if decay == "linear" and num_iter < 1:
    raise ValueError(f"fas_optim.decay 'linear' needs num_iter >= 1, got {num_iter}")

  def rate(lr):
    return optax.linear_schedule(lr, 0.0, num_iter) if decay == "linear" else lr

  generator = optax.adam(rate(fas_config.g_lr), b1=fas_config.b1, b2=fas_config.b2)
  discriminator = optax.adam(rate(fas_config.d_lr), b1=fas_config.b1, b2=fas_config.b2)
  return generator, discriminator


class Optimizers(NamedTuple):
  """The three optimizers of a run: AIFR SGD, FAS generator and discriminator Adam."""
  fr: optax.GradientTransformation
  g: optax.GradientTransformation
  d: optax.GradientTransformation


def optimizers_from_config(config) -> Optimizers:
  """The optimizers of a training config (``optim`` and ``fas_optim``)."""
  generator, discriminator = fas_optimizers(config.fas_optim, config.num_iter)
  return Optimizers(aifr_optimizer(config.optim), generator, discriminator)
