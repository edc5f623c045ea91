"""The TPAMI face age synthesis step: style path + StyleGAN2 decoder (issue 15, item 1).

No training code or objective for the TPAMI decoder is published
(docs/architecture.md T1.7); this objective is OURS. It is the CVPR FAS step of
:mod:`mtlface_jax.training.steps` (section 9: discriminator first, then the
generator against the updated discriminator; LSGAN, identity MSE on the frozen
encoder's ``x_id``, age cross-entropy from the frozen estimator) with two
pSp-style terms added to the generator loss:

* reconstruction, ``fas_tpami_rec_loss_weight``: L2 (or L1) between the
  synthesised face and the input on the samples whose target group is their
  own group (a StyleGAN2 decoder re-synthesises the whole image, so nothing
  else ties it to the input's pixels);
* latent regulariser, ``fas_tpami_latent_reg_weight``: the mean square of the
  latent offsets, i.e. of the codes' distance from ``latent_avg``.

Only the generator's ``params`` are differentiated; its ``buffers`` (noise maps,
``latent_avg``) pass through unchanged, as do the frozen encoder and age
estimator. The step has the signature and jit/sharding of
:func:`mtlface_jax.training.steps.make_train_step`, so the loop picks either.
"""

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from mtlface_jax.training import state as state_lib
from mtlface_jax.training import steps

Metrics = dict[str, jax.Array]
REC_NORMS = ("l2", "l1")


def reconstruction_loss(*, fake: jax.Array, images: jax.Array, same_group: jax.Array,
                        norm: str = "l2") -> jax.Array:
  """Pixel loss between synthesised faces and their inputs where ``same_group``.

  Args:
    fake: [B, S, S, 3] synthesised faces.
    images: [B, S, S, 3] input faces.
    same_group: [B] bool, true where the target group is the input's own group.
    norm: "l2" (mean squared error) or "l1" (mean absolute error) per sample.

  Returns:
    The mean per-sample error over the selected samples; 0 when none is.
  """
  if norm not in REC_NORMS:
    raise ValueError(f"fas_tpami_rec_norm must be one of {REC_NORMS}, got {norm!r}")
  diff = fake.astype(jnp.float32) - images.astype(jnp.float32)
  per_pixel = jnp.square(diff) if norm == "l2" else jnp.abs(diff)
  per_sample = jnp.mean(per_pixel.reshape(per_pixel.shape[0], -1), axis=1)
  mask = same_group.astype(jnp.float32)
  return jnp.sum(per_sample * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def latent_regulariser(latents: jax.Array) -> jax.Array:
  """Mean square of the latent offsets [B, n_styles, style_dim] (distance from latent_avg)."""
  return jnp.mean(jnp.square(latents.astype(jnp.float32)))


def tpami_generator_loss(outputs, *, batch, models, config, variables, d_variables, source_id,
                         rng):
  """The CVPR generator loss of ``steps`` plus our reconstruction and latent terms.

  Args:
    outputs: (fake [B,S,S,3], latents [B,n,D]) of the generator.
    batch: the batch contract (``image``, ``group``: the inputs' own groups, -1
      unknown and never reconstructed; ``target_group``).
    models, config, variables, d_variables, source_id, rng: as
      ``steps._generator_loss``.

  Returns:
    (loss, (discriminator spectral state, metrics)).
  """
  fake, latents = outputs
  target, source_group = batch["target_group"], batch["group"]
  cvpr_loss, (spectral, metrics) = steps._generator_loss(  # pylint: disable=protected-access
      fake, models=models, config=config, variables=variables, d_variables=d_variables,
      batch=batch, source_id=source_id, rng=rng)
  same = (target == source_group) & (source_group >= 0)
  rec = reconstruction_loss(fake=fake, images=batch["image"], same_group=same,
                            norm=config.fas_tpami_rec_norm)
  reg = latent_regulariser(latents)
  loss = (cvpr_loss + config.fas_tpami_rec_loss_weight * rec
          + config.fas_tpami_latent_reg_weight * reg)
  # Its own name: "fas/g_rec" is the CVPR L1 reconstruction, also in the loss.
  metrics = {**metrics, "fas/g_tpami_rec": rec, "fas/g_latent_reg": reg,
             "fas/rec_fraction": jnp.mean(same.astype(jnp.float32))}
  return loss, (spectral, metrics)


def tpami_fas_update(state: state_lib.TrainState, batch, rng, *, models, config,
                     g_tx: optax.GradientTransformation, d_tx: optax.GradientTransformation):
  """One TPAMI FAS iteration: D update, then G (params only) against the updated D.

  Returns:
    (state, metrics, finite) without advancing the step.
  """
  # rng drives only the discriminator's input augmentation (config.fas_d_augment);
  # the decoder uses its noise buffers and the targets come with the batch.
  d_rng, g_rng = jax.random.split(rng)
  v = state.variables
  target = batch["target_group"]
  source = jax.tree_util.tree_map(
      jax.lax.stop_gradient,
      steps._frozen_encode(models, v, batch["image"]))  # pylint: disable=protected-access
  buffers = v["generator"]["buffers"]

  def generate(g_params):
    return models.generator.apply({"params": g_params, "buffers": buffers}, batch["image"],
                                  source.x2, source.x3, source.x4, source.x_id, target,
                                  train=True, return_latents=True)

  # One generator forward serves both updates: keep its VJP for the G step.
  (fake, latents), generator_vjp = jax.vjp(generate, v["generator"]["params"])
  d_loss, spectral, d_grads = steps._discriminator_grads(  # pylint: disable=protected-access
      models, config, v["discriminator"], batch["target_image"], jax.lax.stop_gradient(fake),
      target, d_rng)
  d_updates, d_opt = d_tx.update(d_grads, state.opt_states["d"], v["discriminator"]["params"])
  d_params = optax.apply_updates(v["discriminator"]["params"], d_updates)

  g_loss_fn = functools.partial(
      tpami_generator_loss, batch=batch, models=models, config=config, variables=v,
      d_variables={"params": d_params, "spectral": spectral}, source_id=source.x_id, rng=g_rng)
  (g_loss, (spectral, metrics)), output_grads = jax.value_and_grad(
      g_loss_fn, has_aux=True)((fake, latents))
  (g_grads,) = generator_vjp(output_grads)
  g_updates, g_opt = g_tx.update(g_grads, state.opt_states["g"], v["generator"]["params"])
  g_params = optax.apply_updates(v["generator"]["params"], g_updates)

  finite = (jnp.isfinite(d_loss) & jnp.isfinite(g_loss)
            & steps._all_finite((d_grads, g_grads)))  # pylint: disable=protected-access
  generator = state_lib.generator_with_ema(v["generator"], g_params, state.step,
                                           config.get("fas_ema_decay", 0.0))
  new_vars = {**v, "generator": generator,
              "discriminator": {"params": d_params, "spectral": spectral}}
  new_opts = {**state.opt_states, "g": g_opt, "d": d_opt}
  select = steps._select  # pylint: disable=protected-access
  metrics.update({"fas/d_loss": d_loss, "fas/g_loss": g_loss,
                  "fas/g_grad_norm": optax.global_norm(g_grads),
                  "fas/d_grad_norm": optax.global_norm(d_grads)})
  return (state.replace(variables=select(finite, new_vars, v),
                        opt_states=select(finite, new_opts, state.opt_states)),
          metrics, finite)


def train_step(state: state_lib.TrainState, batch: dict, rng: jax.Array, *, models, config,
               g_tx, d_tx) -> tuple[state_lib.TrainState, Metrics]:
  """One TPAMI FAS iteration; advances ``state.step`` and the non-finite counters.

  Args:
    state: the current state (donated by the jitted wrapper).
    batch: the batch contract with ``target_group``/``target_image``.
    rng: the run's base key (folded with the step, as in ``steps.train_step``).
    models: the :class:`MTLFaceModels` of a ``tpami`` spec.
    config: the training config (``configs/fas_tpami.py``).
    g_tx, d_tx: the generator and discriminator optimizers.

  Returns:
    The new state and a dict of scalar metrics.
  """
  rng = jax.random.fold_in(rng, state.step)
  state, metrics, finite = tpami_fas_update(state, batch, rng, models=models, config=config,
                                            g_tx=g_tx, d_tx=d_tx)
  streak = jnp.where(finite, 0, state.nonfinite_streak + 1)
  total = state.nonfinite_total + (~finite).astype(jnp.int32)
  metrics.update({"nonfinite_streak": streak, "nonfinite_total": total})
  return state.replace(step=state.step + 1, nonfinite_streak=streak, nonfinite_total=total), metrics


def check_config(config) -> None:
  """Refuses configs this step cannot train (one-line ValueErrors)."""
  if config.model.get("family", "cvpr") != "tpami":
    raise ValueError("the TPAMI FAS step needs config.model.family = 'tpami'")
  if config.train_fr or not config.train_fas:
    raise ValueError("the TPAMI FAS step trains FAS only: set train_fr=False, train_fas=True "
                     "(the encoder trunk and age estimator stay frozen)")
  if config.fas_tpami_rec_norm not in REC_NORMS:
    raise ValueError(f"fas_tpami_rec_norm must be one of {REC_NORMS}, "
                     f"got {config.fas_tpami_rec_norm!r}")


def make_train_step(models, config, *, fr_tx=None, g_tx, d_tx, state_sharding: Any,
                    batch_sharding: Any) -> Callable:
  """Jits :func:`train_step` once, donated state, shardings as ``steps.make_train_step``."""
  del fr_tx  # Same signature as steps.make_train_step; nothing of AIFR is trained.
  check_config(config)
  step = functools.partial(train_step, models=models, config=config, g_tx=g_tx, d_tx=d_tx)
  return jax.jit(step, donate_argnums=(0,),
                 in_shardings=(state_sharding, batch_sharding, state_sharding),
                 out_shardings=(state_sharding, state_sharding))
