"""mtlface-jax: MTLFace (age-invariant face recognition and face age synthesis) in JAX/Flax.

``mtlface_jax.load(path)`` gives a :class:`mtlface_jax.api.FaceModel` that
verifies, ages, age-progresses and embeds photos (see ``mtlface_jax.api``).
"""

__version__ = "0.1.0"


def load(path, **kwargs):
  """Loads a checkpoint for photos; see :func:`mtlface_jax.api.load`.

  JAX and the models are imported here, on first use, so that importing the
  package (e.g. for ``mtlface --help``) stays fast.
  """
  from mtlface_jax import api  # pylint: disable=g-import-not-at-top
  return api.load(path, **kwargs)
