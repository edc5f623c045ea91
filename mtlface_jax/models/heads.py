"""Heads on top of the encoder: identity embedding, age estimation, CosFace.

Reference: docs/architecture.md sections 3 (output layer), 4 (age estimation
module) and 5 (CosFace).
"""

from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtlface_jax import ages
from mtlface_jax.models import layers


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """``x / max(||x||, eps)`` like ``F.normalize``, computed in float32."""
  x32 = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=axis, keepdims=True))
  return (x32 / jnp.maximum(norm, eps)).astype(x.dtype)


def flatten(x: jax.Array) -> jax.Array:
  """Flattens NHWC maps in NHWC order.

  The reference flattens NCHW (channel-major); we keep the cheap NHWC order and
  permute the rows of the following Linear kernel when converting PyTorch
  weights (see ``mtlface_jax.torch_mapping``).
  """
  return x.reshape(x.shape[0], -1)


class EmbeddingHead(nn.Module):
  """BN2d -> Dropout -> flatten -> Linear(25088, 512) -> BN1d (``output_layer``)."""
  dropout_rate: float = 0.5
  embedding_size: int = 512
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_id: jax.Array, train: bool) -> jax.Array:
    h = layers.BatchNorm(dtype=self.dtype, name="bn_in")(x_id, train)
    h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    h = nn.Dense(self.embedding_size, kernel_init=layers.xavier_uniform, dtype=self.dtype,
                 param_dtype=jnp.float32, name="fc")(flatten(h))
    return layers.BatchNorm(dtype=self.dtype, name="bn_out")(h, train)


class AgeOutputs(NamedTuple):
  """Age estimator outputs: 101 age logits, group logits, expected (DEX) age."""
  age_logits: jax.Array
  group_logits: jax.Array
  expected_age: jax.Array


def expected_age(age_logits: jax.Array) -> jax.Array:
  """DEX expected age: sum_k softmax(logits)_k * k over k = 0..100."""
  probs = jax.nn.softmax(age_logits.astype(jnp.float32), axis=-1)
  return probs @ jnp.arange(age_logits.shape[-1], dtype=jnp.float32)


class AgeEstimator(nn.Module):
  """BN2d -> flatten -> Linear(25088,512) -> ReLU -> Linear(512,101); group head on top.

  PyTorch default initialisation throughout, as in the reference.
  """
  num_groups: int = 7
  hidden: int = 512
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_age: jax.Array, train: bool) -> AgeOutputs:
    h = layers.BatchNorm(dtype=self.dtype, name="bn")(x_age, train)
    h = flatten(h)
    h = layers.torch_default_dense(self.hidden, h.shape[-1], dtype=self.dtype, name="fc1")(h)
    h = nn.relu(h)
    age_logits = layers.torch_default_dense(ages.NUM_AGE_CLASSES, self.hidden,
                                            dtype=self.dtype, name="fc2")(h)
    group_logits = layers.torch_default_dense(self.num_groups, ages.NUM_AGE_CLASSES,
                                              dtype=self.dtype, name="group_fc")(age_logits)
    age_logits = age_logits.astype(jnp.float32)
    return AgeOutputs(age_logits, group_logits.astype(jnp.float32), expected_age(age_logits))


class CosFace(nn.Module):
  """Large-margin cosine head: s * (cos(theta) - m * onehot(label)).

  The kernel is stored as [embedding, classes] so the class matmul needs no
  transpose; the PyTorch ``weight`` is its transpose. The matmul runs in
  ``dtype`` with float32 accumulation; normalisation and the margin in float32.

  Attributes:
    num_classes: identities.
    scale: s (64).
    margin: m (0.35).
    dtype: matmul input dtype.
  """
  num_classes: int
  scale: float = 64.0
  margin: float = 0.35
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, embedding: jax.Array, labels: Optional[jax.Array] = None) -> jax.Array:
    """Returns margin logits when ``labels`` are given, else the plain cosines.

    Labels of -1 (unknown identity) receive no margin; the loss masks them.
    """
    kernel = self.param("kernel", layers.xavier_uniform,
                        (embedding.shape[-1], self.num_classes), jnp.float32)
    emb = l2_normalize(embedding.astype(jnp.float32))
    weight = l2_normalize(kernel, axis=0)
    cosine = jnp.matmul(emb.astype(self.dtype), weight.astype(self.dtype),
                        preferred_element_type=jnp.float32)
    if labels is None:
      return cosine
    margin = self.margin * jax.nn.one_hot(labels, self.num_classes, dtype=jnp.float32)
    return self.scale * (cosine - margin)
