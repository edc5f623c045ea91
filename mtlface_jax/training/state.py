"""The training state: every variable, optimizer state and counter in one pytree."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from mtlface_jax.models import spec as spec_lib

FR_MODULES = ("encoder", "head", "age", "da_age")
FAS_MODULES = ("generator", "discriminator")


@flax.struct.dataclass
class TrainState:
  """Everything needed to continue a run exactly.

  Attributes:
    step: completed iterations.
    variables: module name -> Flax variable collections ('params',
      'batch_stats', 'spectral').
    opt_states: 'fr' (SGD over encoder/head/age/da_age), 'g' and 'd' (Adam).
    nonfinite_streak: consecutive iterations skipped for a non-finite loss.
    nonfinite_total: all iterations skipped so far.
  """
  step: jax.Array
  variables: dict
  opt_states: dict
  nonfinite_streak: jax.Array
  nonfinite_total: jax.Array


def active_modules(config) -> tuple[str, ...]:
  """Modules a run needs: the AIFR ones, plus G and D when FAS is trained."""
  names = FR_MODULES if config.train_fr else ("encoder", "age")
  return names + (FAS_MODULES if config.train_fas else ())


def init_variables(models: spec_lib.MTLFaceModels, config, rng: jax.Array) -> dict:
  """Initialises the variables of the active modules at the config's image size."""
  return spec_lib.init_variables(models, config.image_size, active_modules(config), rng)


def fr_params(variables: dict) -> dict:
  """The parameters the AIFR optimizer updates."""
  return {name: variables[name]["params"] for name in FR_MODULES}


def init_state(variables: dict, config, fr_tx: optax.GradientTransformation,
               g_tx: optax.GradientTransformation, d_tx: optax.GradientTransformation) -> TrainState:
  """Creates the state with fresh optimizer states for the trained modules."""
  opt_states: dict[str, Any] = {}
  if config.train_fr:
    opt_states["fr"] = fr_tx.init(fr_params(variables))
  if config.train_fas:
    if config.get("fas_ema_decay", 0.0):
      # Shapes only: the average starts from the weights at step 0 (after
      # init_from), see :func:`generator_with_ema`.
      variables = {**variables, "generator": {
          **variables["generator"], spec_lib.GENERATOR_EMA: variables["generator"]["params"]}}
    opt_states["g"] = g_tx.init(variables["generator"]["params"])
    opt_states["d"] = d_tx.init(variables["discriminator"]["params"])
  zero = jnp.zeros((), jnp.int32)
  return TrainState(step=zero, variables=variables, opt_states=opt_states,
                    nonfinite_streak=zero, nonfinite_total=zero)


def generator_with_ema(generator: dict, new_params: Any, step: jax.Array, decay: float) -> dict:
  """The generator's collections after an update: new ``params`` and, if kept, their average.

  Args:
    generator: the generator's collections before the update (``params``,
      optional ``params_ema`` and any others, which are kept).
    new_params: the updated parameters.
    step: the state's step before the update; at 0 the average restarts from
      the weights the run started with (fresh or ``init_from``).
    decay: ``config.fas_ema_decay``; 0 keeps no average.

  Returns:
    The collections with ``params`` = ``new_params`` (and ``params_ema``).
  """
  updated = {**generator, "params": new_params}
  if decay:
    previous = jax.tree_util.tree_map(lambda avg, start: jnp.where(step == 0, start, avg),
                                      generator[spec_lib.GENERATOR_EMA], generator["params"])
    updated[spec_lib.GENERATOR_EMA] = jax.tree_util.tree_map(
        lambda avg, new: decay * avg + (1.0 - decay) * new, previous, new_params)
  return updated
