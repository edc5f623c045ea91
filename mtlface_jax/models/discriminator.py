"""Spectral-norm patch discriminator conditioned on the target age group.

Reference: docs/architecture.md section 8. Spectral normalisation follows
``torch.nn.utils.spectral_norm``: one power iteration per training forward,
``u``/``v`` kept as state (collection ``'spectral'``), the stored estimate used
at inference. ``u``/``v`` are kept in PyTorch's layout (the weight viewed as
[out, in*kh*kw]) so converted weights continue their power iteration exactly.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtlface_jax.models import layers


def _normalize(x: jax.Array, eps: float) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x), eps)


def torch_weight_matrix(kernel: jax.Array) -> jax.Array:
  """HWIO kernel -> PyTorch's [out, in * kh * kw] weight matrix."""
  return jnp.transpose(kernel, (3, 2, 0, 1)).reshape(kernel.shape[-1], -1)


class SpectralNormConv(nn.Module):
  """A 4x4 conv whose kernel is divided by its spectral norm estimate.

  Attributes:
    features: output channels.
    stride: conv stride.
    eps: normalisation epsilon (1e-12).
    dtype: computation dtype.
  """
  features: int
  stride: int
  eps: float = 1e-12
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    in_features = x.shape[-1]
    fan_in = in_features * 16
    kernel = self.param("kernel", layers.torch_default_kernel_init(),
                        (4, 4, in_features, self.features), jnp.float32)
    bias = self.param("bias", layers.torch_default_bias_init(fan_in), (self.features,), jnp.float32)
    u_var = self.variable("spectral", "u", lambda: _normalize(
        jax.random.normal(self.make_rng("params"), (self.features,)), self.eps))
    v_var = self.variable("spectral", "v", lambda: _normalize(
        jax.random.normal(self.make_rng("params"), (fan_in,)), self.eps))
    matrix = torch_weight_matrix(kernel)
    u, v = u_var.value, v_var.value
    if train and not self.is_initializing():
      # The power iteration is not differentiated through, as in PyTorch.
      w = jax.lax.stop_gradient(matrix)
      v = _normalize(w.T @ u, self.eps)
      u = _normalize(w @ v, self.eps)
      u_var.value, v_var.value = u, v
    sigma = jnp.dot(u, matrix @ v)
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), (kernel / sigma).astype(self.dtype),
        window_strides=(self.stride, self.stride), padding=((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias.astype(self.dtype)


CONDITIONINGS = ("concat", "classifier")


class PatchDiscriminator(nn.Module):
  """conv(3->64, s2) -> LReLU -> concat one-hot(group) -> 4 SN convs -> conv(->1).

  Output for a 112x112 input: [N, 5, 5, 1] patch scores (LSGAN targets 1/0).

  With ``conditioning="classifier"`` (a departure from the reference, for
  short runs) there is no one-hot input: every patch gets G + 1 logits, one
  per age group and one for "synthesized" ([N, 5, 5, G + 1]); the
  discriminator learns the groups from real faces and recognises fakes as a
  class of their own, so a generator must look like a real face of the target
  group to it (``mtlface_jax.losses.classifier_discriminator_loss``).

  Attributes:
    num_groups: age groups G.
    features: widths of the first conv and the four SN convs (reference
      64, 128, 256, 512, 512; smaller for reduced models).
    conditioning: "concat" (the reference) or "classifier".
    dtype: computation dtype; the scores are returned in float32.
  """
  num_groups: int = 7
  features: Sequence[int] = (64, 128, 256, 512, 512)
  conditioning: str = "concat"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image: jax.Array, target_group: jax.Array, train: bool = False) -> jax.Array:
    if image.shape[1] < 48 or image.shape[2] < 48:
      raise ValueError(f"PatchDiscriminator needs images of at least 48x48, got {image.shape[1:3]}")
    if self.conditioning not in CONDITIONINGS:
      raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {self.conditioning!r}")
    lrelu = lambda h: nn.leaky_relu(h, 0.2)
    h = layers.torch_default_conv(self.features[0], 4, 3, stride=2, padding=1, dtype=self.dtype,
                                  name="conv1")(image.astype(self.dtype))
    h = lrelu(h)
    outputs = 1
    if self.conditioning == "concat":
      condition = jax.nn.one_hot(target_group, self.num_groups, dtype=h.dtype)
      condition = jnp.broadcast_to(condition[:, None, None, :], h.shape[:3] + (self.num_groups,))
      h = jnp.concatenate([h, condition], axis=-1)
    else:
      outputs = self.num_groups + 1
    for i, (features, stride) in enumerate(zip(self.features[1:], (2, 2, 2, 1))):
      h = lrelu(SpectralNormConv(features, stride, dtype=self.dtype, name=f"sn_conv{i + 1}")(h, train))
    h = layers.torch_default_conv(outputs, 4, self.features[-1], padding=1, dtype=self.dtype,
                                  name="conv_out")(h)
    return h.astype(jnp.float32)
