"""TensorFlow Datasets builders of mtlface-jax (one package per dataset)."""
