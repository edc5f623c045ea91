"""Pure training steps ``(state, batch, rng) -> (state, metrics)``.

The AIFR step (docs/architecture.md section 6), the FAS step (section 9: D first,
then G against the updated D, encoder and age estimator frozen in inference
mode) and the joint step (AIFR then FAS with the current encoder). A step
whose loss or gradients are not finite leaves every variable and optimizer
state untouched and counts itself in ``nonfinite_streak``/``nonfinite_total``.
"""

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from mtlface_jax import losses
from mtlface_jax.models import layers
from mtlface_jax.models import spec as spec_lib
from mtlface_jax.training import augment as augment_lib
from mtlface_jax.training import optim
from mtlface_jax.training import state as state_lib

Metrics = dict[str, jax.Array]


def _all_finite(tree) -> jax.Array:
  """Whether every element of ``tree`` is finite, through its global norm.

  A NaN or inf anywhere makes the norm non-finite (so does a sum of squares
  past float32's range, ~1e19 per element: a step worth skipping too). Not
  per-leaf ``all(isfinite)``: XLA copies that chain of ~200 scalar ANDs into
  each of the ~400 selects of ``_select`` (the square root is not copied),
  which made the tiny FAS step compile 3x slower on the CPU (40 s -> 12 s).
  """
  return jnp.isfinite(optax.global_norm(tree))


def _select(ok: jax.Array, new, old):
  return jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new, old)


def _age_terms(outputs, batch) -> jax.Array:
  return losses.age_loss(expected_age=outputs.expected_age, group_logits=outputs.group_logits,
                         ages=batch["age"], groups=batch["group"])


def _fr_loss(params, variables, batch, rng, *, models, config):
  """AIFR loss: CosFace + w_age * age loss(x_age) + w_da * age loss(GRL(x_id))."""
  def run(name, module, *args, **kwargs):
    return module.apply({"params": params[name], "batch_stats": variables[name]["batch_stats"]},
                        *args, train=True, mutable=["batch_stats"], **kwargs)

  out, enc_stats = run("encoder", models.encoder, batch["image"], rngs={"dropout": rng})
  logits = models.head.apply({"params": params["head"]}, out.embedding, batch["id"])
  age_out, age_stats = run("age", models.age, out.x_age.astype(jnp.float32))
  reversed_id = layers.gradient_reversal(out.x_id.astype(jnp.float32), config.grl_coefficient)
  da_out, da_stats = run("da_age", models.da_age, reversed_id)
  id_loss = losses.cosface_loss(logits=logits, labels=batch["id"])
  age_loss = _age_terms(age_out, batch)
  da_loss = _age_terms(da_out, batch)
  loss = id_loss + config.fr_age_loss_weight * age_loss + config.fr_da_loss_weight * da_loss
  stats = {"encoder": enc_stats, "age": age_stats, "da_age": da_stats}
  metrics = {"fr/loss": loss, "fr/id_loss": id_loss, "fr/age_loss": age_loss,
             "fr/da_loss": da_loss, "fr/id_acc": losses.accuracy(logits=logits, labels=batch["id"])}
  return loss, (stats, metrics)


def fr_update(state: state_lib.TrainState, batch, rng, *, models, config,
              tx: optax.GradientTransformation) -> tuple[state_lib.TrainState, Metrics, jax.Array]:
  """One AIFR update; returns (state, metrics, finite) without advancing the step."""
  params = state_lib.fr_params(state.variables)
  grad_fn = jax.value_and_grad(functools.partial(_fr_loss, models=models, config=config), has_aux=True)
  (loss, (stats, metrics)), grads = grad_fn(params, state.variables, batch, rng)
  updates, opt_state = tx.update(grads, state.opt_states["fr"], params)
  new_params = optax.apply_updates(params, updates)
  finite = jnp.isfinite(loss) & _all_finite(grads)
  variables = dict(state.variables)
  for name in state_lib.FR_MODULES:
    new = {"params": new_params[name], **stats.get(name, {})}
    variables[name] = _select(finite, {**variables[name], **new}, variables[name])
  opt_states = {**state.opt_states, "fr": _select(finite, opt_state, state.opt_states["fr"])}
  metrics["fr/grad_norm"] = optax.global_norm(grads)
  metrics["fr/lr"] = _current_lr(config, state.opt_states["fr"])
  return state.replace(variables=variables, opt_states=opt_states), metrics, finite


def _current_lr(config, opt_state) -> jax.Array:
  """The learning rate the SGD update of this step used."""
  return optim.schedule_from_config(config.optim)(optax.tree_utils.tree_get(opt_state, "count"))


def _frozen_encode(models, variables, images):
  """Encoder in inference mode (the FAS stage never updates it)."""
  return models.encoder.apply(variables["encoder"], images, train=False)


def fas_update(state: state_lib.TrainState, batch, rng, *, models, config,
               g_tx: optax.GradientTransformation,
               d_tx: optax.GradientTransformation) -> tuple[state_lib.TrainState, Metrics, jax.Array]:
  """One FAS iteration: D update, then G update against the updated D.

  ``rng`` only drives the discriminator's input augmentation
  (``config.fas_d_augment``); without it the step is deterministic given the
  batch (targets come with it).
  """
  v = state.variables
  target = batch["target_group"]
  d_rng, g_rng = jax.random.split(rng)
  source = jax.tree_util.tree_map(jax.lax.stop_gradient,
                                  _frozen_encode(models, v, batch["image"]))

  def generate(g_params):
    return models.generator.apply(
        {"params": g_params, "batch_stats": v["generator"]["batch_stats"]}, batch["image"],
        source.x2, source.x3, source.x4, source.x_id, target, train=True, mutable=["batch_stats"])

  # One generator forward serves both updates: keep its VJP for the G step.
  fake, generator_vjp, g_stats = jax.vjp(generate, v["generator"]["params"], has_aux=True)
  d_loss, spectral, d_grads = _discriminator_grads(
      models, config, v["discriminator"], batch["target_image"], jax.lax.stop_gradient(fake),
      target, d_rng)
  d_updates, d_opt = d_tx.update(d_grads, state.opt_states["d"], v["discriminator"]["params"])
  d_params = optax.apply_updates(v["discriminator"]["params"], d_updates)

  g_loss_fn = functools.partial(_generator_loss, models=models, config=config, variables=v,
                                d_variables={"params": d_params, "spectral": spectral},
                                batch=batch, source_id=source.x_id, rng=g_rng)
  (g_loss, (spectral, metrics)), fake_grad = jax.value_and_grad(g_loss_fn, has_aux=True)(fake)
  (g_grads,) = generator_vjp(fake_grad)
  g_updates, g_opt = g_tx.update(g_grads, state.opt_states["g"], v["generator"]["params"])
  g_params = optax.apply_updates(v["generator"]["params"], g_updates)

  finite = jnp.isfinite(d_loss) & jnp.isfinite(g_loss) & _all_finite((d_grads, g_grads))
  generator = state_lib.generator_with_ema(v["generator"], g_params, state.step,
                                           config.get("fas_ema_decay", 0.0))
  new_vars = {**v, "generator": {**generator, **g_stats},
              "discriminator": {"params": d_params, "spectral": spectral}}
  new_opts = {**state.opt_states, "g": g_opt, "d": d_opt}
  variables = _select(finite, new_vars, v)
  opt_states = _select(finite, new_opts, state.opt_states)
  metrics.update({"fas/d_loss": d_loss, "fas/g_loss": g_loss,
                  "fas/g_grad_norm": optax.global_norm(g_grads),
                  "fas/d_grad_norm": optax.global_norm(d_grads)})
  return state.replace(variables=variables, opt_states=opt_states), metrics, finite


def _classifier_d(models) -> bool:
  """Whether the discriminator classifies age groups + "synthesized" (see discriminator.py)."""
  return models.discriminator.conditioning == "classifier"


def _discriminator_grads(models, config, d_vars, real, fake, target, rng):
  """D loss and gradient; real and fake share one forward (one power iteration).

  ``real`` are real faces OF the target groups (the batch's target images).
  """
  images = augment_lib.augment(jnp.concatenate([real, fake]), rng,
                               augment_lib.parse_policy(config.fas_d_augment))

  def loss_fn(d_params):
    scores, updates = models.discriminator.apply(
        {"params": d_params, "spectral": d_vars["spectral"]}, images,
        jnp.concatenate([target, target]), train=True, mutable=["spectral"])
    real_scores, fake_scores = jnp.split(scores, 2)
    if _classifier_d(models):
      loss = losses.classifier_discriminator_loss(real_logits=real_scores,
                                                  fake_logits=fake_scores, real_groups=target)
    else:
      loss = losses.lsgan_discriminator_loss(real_scores=real_scores, fake_scores=fake_scores)
    return loss, updates["spectral"]

  (loss, spectral), grads = jax.value_and_grad(loss_fn, has_aux=True)(d_vars["params"])
  return loss, spectral, grads


def _generator_loss(fake, *, models, config, variables, d_variables, batch, source_id, rng):
  """w_gan * adversarial + w_id * MSE(x_id) + w_age * CE(age group of fake, target)
  (+ w_rec * L1(fake, input) on the samples whose target is their own group)."""
  target = batch["target_group"]
  seen = augment_lib.augment(fake, rng, augment_lib.parse_policy(config.fas_d_augment))
  scores, d_updates = models.discriminator.apply(d_variables, seen, target, train=True,
                                                 mutable=["spectral"])
  fake_out = _frozen_encode(models, variables, fake)
  age_out = models.age.apply(variables["age"], fake_out.x_age.astype(jnp.float32), False)
  if _classifier_d(models):
    gan = losses.classifier_generator_loss(fake_logits=scores, target_groups=target)
  else:
    gan = losses.lsgan_generator_loss(fake_scores=scores)
  identity = losses.feature_mse(source=source_id, target=fake_out.x_id)
  age = losses.classification_loss(logits=age_out.group_logits, labels=target)
  rec = losses.masked_l1(source=fake, target=batch["image"], mask=target == batch["group"])
  loss = (config.fas_gan_loss_weight * gan + config.fas_id_loss_weight * identity
          + config.fas_age_loss_weight * age + config.fas_rec_loss_weight * rec)
  metrics = {"fas/g_gan": gan, "fas/g_id": identity, "fas/g_age": age, "fas/g_rec": rec,
             "fas/age_acc": losses.accuracy(logits=age_out.group_logits, labels=target)}
  return loss, (d_updates["spectral"], metrics)


def train_step(state: state_lib.TrainState, batch: dict, rng: jax.Array, *, models, config,
               fr_tx=None, g_tx=None, d_tx=None) -> tuple[state_lib.TrainState, Metrics]:
  """One iteration of the configured task(s); advances ``state.step`` by one.

  Args:
    state: the current state (donated by the jitted wrapper).
    batch: arrays of the batch contract (FAS needs target_group/target_image).
    rng: the run's base key; this step uses ``fold_in(rng, state.step)``.
    models: the :class:`MTLFaceModels`.
    config: the training config.
    fr_tx, g_tx, d_tx: the optimizers of the trained tasks.

  Returns:
    The new state and a dict of scalar metrics.
  """
  rng = jax.random.fold_in(rng, state.step)
  metrics: Metrics = {}
  finite = jnp.array(True)
  if config.train_fr:
    state, fr_metrics, ok = fr_update(state, batch, rng, models=models, config=config, tx=fr_tx)
    metrics.update(fr_metrics)
    finite &= ok
  if config.train_fas:
    state, fas_metrics, ok = fas_update(state, batch, rng, models=models, config=config,
                                        g_tx=g_tx, d_tx=d_tx)
    metrics.update(fas_metrics)
    finite &= ok
  streak = jnp.where(finite, 0, state.nonfinite_streak + 1)
  total = state.nonfinite_total + (~finite).astype(jnp.int32)
  metrics.update({"nonfinite_streak": streak, "nonfinite_total": total})
  return state.replace(step=state.step + 1, nonfinite_streak=streak, nonfinite_total=total), metrics


def make_train_step(models: spec_lib.MTLFaceModels, config, *, fr_tx, g_tx, d_tx,
                    state_sharding: Any, batch_sharding: Any) -> Callable:
  """Jits :func:`train_step` once, with donated state and explicit shardings."""
  step = functools.partial(train_step, models=models, config=config,
                           fr_tx=fr_tx, g_tx=g_tx, d_tx=d_tx)
  return jax.jit(step, donate_argnums=(0,),
                 in_shardings=(state_sharding, batch_sharding, state_sharding),
                 out_shardings=(state_sharding, state_sharding))
