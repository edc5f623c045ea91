"""mtlface-jax: MTLFace (age-invariant face recognition and face age synthesis) in JAX/Flax."""

__version__ = "0.1.0"
