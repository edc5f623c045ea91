"""Building blocks shared by the MTLFace modules.

PyTorch semantics matter here because the published weights are PyTorch ones:
BatchNorm keeps an unbiased running variance, PReLU has one slope per channel,
convolutions pad symmetrically, and adaptive pooling uses PyTorch's bin rule.
"""

import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

# Reference initialisers (docs/architecture.md sections 1, 4, 7, 8).
xavier_uniform = nn.initializers.xavier_uniform()
generator_normal = nn.initializers.normal(stddev=0.01)
zeros = nn.initializers.zeros


def torch_default_kernel_init() -> Initializer:
  """PyTorch's default conv/linear weight init: U(-1/sqrt(fan_in), +1/sqrt(fan_in)).

  ``kaiming_uniform_(a=sqrt(5))`` reduces to a uniform with variance 1/(3 fan_in).
  """
  return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias_init(fan_in: int) -> Initializer:
  """PyTorch's default bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def torch_momentum(momentum: float) -> float:
  """Converts PyTorch's BatchNorm ``momentum`` to a running-stat decay.

  PyTorch updates ``running = (1 - m) * running + m * batch``, so the decay of the
  old value is ``1 - m``: momentum 0.1 -> 0.9, momentum 0.01 -> 0.99.
  """
  return 1.0 - momentum


class BatchNorm(nn.Module):
  """BatchNorm over all axes but the last, matching ``torch.nn.BatchNorm{1,2}d``.

  Normalises with the biased batch variance and tracks the UNBIASED one in
  ``var`` as PyTorch does. Statistics are computed in float32 whatever the
  computation dtype. Under ``jit`` with a batch sharded over a mesh the mean is
  over the global batch (synchronised BatchNorm).

  Attributes:
    decay: running-stat decay (see :func:`torch_momentum`).
    epsilon: added to the variance.
    dtype: output dtype (None keeps the input's).
  """
  decay: float = 0.9
  epsilon: float = 1e-5
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", zeros, (features,), jnp.float32)
    mean_var = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    var_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    dtype = self.dtype or x.dtype
    reduce_axes = tuple(range(x.ndim - 1))
    if train:
      # One pass over x: E[x - k] and E[(x - k)^2] are sibling reductions that
      # XLA fuses into a single kernel, where the two-pass (x - mean)^2 reads x
      # again (13% of the AIFR step time on an H100). Shifting by the running
      # mean k (a constant here) avoids the cancellation of E[x^2] - E[x]^2
      # when |mean| >> std; the result is the same function of x.
      shift = jax.lax.stop_gradient(mean_var.value)
      centred = x.astype(jnp.float32) - shift
      shifted_mean = jnp.mean(centred, axis=reduce_axes)
      var = jnp.maximum(jnp.mean(jnp.square(centred), axis=reduce_axes)
                        - jnp.square(shifted_mean), 0.0)
      mean = shift + shifted_mean
      if not self.is_initializing():
        count = math.prod(x.shape[a] for a in reduce_axes)
        unbiased = var * (count / max(count - 1, 1))
        mean_var.value = self.decay * mean_var.value + (1 - self.decay) * mean
        var_var.value = self.decay * var_var.value + (1 - self.decay) * unbiased
    else:
      mean, var = mean_var.value, var_var.value
    # Fold normalisation into one multiply-add so XLA fuses it with neighbours.
    mul = scale * jax.lax.rsqrt(var + self.epsilon)
    add = bias - mean * mul
    return (x * mul.astype(dtype) + add.astype(dtype)).astype(dtype)


class PReLU(nn.Module):
  """PReLU with one learnable slope per channel (PyTorch ``nn.PReLU(C)``)."""
  init_value: float = 0.25

  @nn.compact
  def __call__(self, x: Array) -> Array:
    slope = self.param("slope", nn.initializers.constant(self.init_value),
                       (x.shape[-1],), jnp.float32)
    return jnp.where(x >= 0, x, x * slope.astype(x.dtype))


def conv(features: int, kernel: int, *, stride: int = 1, padding: int = 0,
         use_bias: bool = False, kernel_init: Initializer = xavier_uniform,
         bias_init: Initializer = zeros, dtype: Dtype = jnp.float32,
         name: Optional[str] = None) -> nn.Conv:
  """A square conv with PyTorch's symmetric integer padding (never 'SAME')."""
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((padding, padding), (padding, padding)),
                 use_bias=use_bias, kernel_init=kernel_init, bias_init=bias_init,
                 dtype=dtype, param_dtype=jnp.float32, name=name)


def torch_default_conv(features: int, kernel: int, in_features: int, *,
                       stride: int = 1, padding: int = 0, use_bias: bool = True,
                       dtype: Dtype = jnp.float32,
                       name: Optional[str] = None) -> nn.Conv:
  """A conv initialised like an un-customised ``torch.nn.Conv2d``."""
  return conv(features, kernel, stride=stride, padding=padding, use_bias=use_bias,
              kernel_init=torch_default_kernel_init(),
              bias_init=torch_default_bias_init(in_features * kernel * kernel),
              dtype=dtype, name=name)


def torch_default_dense(features: int, in_features: int, *, use_bias: bool = True,
                        dtype: Dtype = jnp.float32,
                        name: Optional[str] = None) -> nn.Dense:
  """A dense layer initialised like an un-customised ``torch.nn.Linear``."""
  return nn.Dense(features, use_bias=use_bias,
                  kernel_init=torch_default_kernel_init(),
                  bias_init=torch_default_bias_init(in_features),
                  dtype=dtype, param_dtype=jnp.float32, name=name)


def adaptive_bins(in_size: int, out_size: int) -> list[tuple[int, int]]:
  """PyTorch's adaptive pooling bins: cell i spans [floor(i n/o), ceil((i+1) n/o))."""
  return [((i * in_size) // out_size, -((-(i + 1) * in_size) // out_size))
          for i in range(out_size)]


def adaptive_pool(x: Array, out_size: int, reduce: Callable[..., Array]) -> Array:
  """Adaptive 2-D pooling of NHWC ``x`` to ``out_size`` x ``out_size``.

  Bins may overlap (n=7, o=2 gives [0,4) and [3,7)), so this slices each bin
  statically rather than reshaping; the sizes are tiny (7x7 maps).

  Args:
    x: [N, H, W, C] array.
    out_size: output height and width.
    reduce: ``jnp.mean`` or ``jnp.max``.

  Returns:
    [N, out_size, out_size, C] pooled array.
  """
  rows = []
  for h0, h1 in adaptive_bins(x.shape[1], out_size):
    cols = [reduce(x[:, h0:h1, w0:w1, :], axis=(1, 2))
            for w0, w1 in adaptive_bins(x.shape[2], out_size)]
    rows.append(jnp.stack(cols, axis=1))
  return jnp.stack(rows, axis=1)


def spatial_pyramid(x: Array, levels: Sequence[int], reduce: Callable[..., Array]) -> Array:
  """Flattened spatial pyramid pooling in PyTorch's order.

  Each level is flattened channel-major (as ``tensor.view(N, -1)`` on NCHW) and
  the levels are concatenated, so the 1x1 conv that follows loads PyTorch
  weights without a permutation.

  Args:
    x: [N, H, W, C] array.
    levels: output sizes, e.g. (1, 2, 3).
    reduce: ``jnp.mean`` or ``jnp.max``.

  Returns:
    [N, C * sum(o*o)] array.
  """
  parts = []
  for level in levels:
    pooled = adaptive_pool(x, level, reduce)  # N, o, o, C
    parts.append(jnp.transpose(pooled, (0, 3, 1, 2)).reshape(x.shape[0], -1))
  return jnp.concatenate(parts, axis=-1)


@jax.custom_vjp
def _grad_reverse(x: Array, coefficient: Array) -> Array:
  del coefficient
  return x


def _grad_reverse_fwd(x, coefficient):
  return x, coefficient


def _grad_reverse_bwd(coefficient, grad):
  return (-coefficient * grad).astype(grad.dtype), jnp.zeros_like(coefficient)


_grad_reverse.defvjp(_grad_reverse_fwd, _grad_reverse_bwd)


def gradient_reversal(x: Array, coefficient: float | Array = 1.0) -> Array:
  """Identity forward; multiplies the gradient by ``-coefficient`` backward.

  Args:
    x: any array.
    coefficient: scale of the reversed gradient (1 in the reference).

  Returns:
    ``x`` unchanged.
  """
  return _grad_reverse(x, jnp.asarray(coefficient, jnp.float32))


def upsample_bilinear_2x(x: Array) -> Array:
  """2x bilinear upsampling of NHWC ``x`` with ``align_corners=False``.

  With half-pixel centres output 2i reads 0.75 x[i] + 0.25 x[i-1] and 2i+1
  reads 0.75 x[i] + 0.25 x[i+1], edges clamped: exactly PyTorch's
  ``F.interpolate(scale_factor=2, mode='bilinear')``, written as shifts so XLA
  fuses it instead of building resize matrices.
  """
  def along(axis: int, y: Array) -> Array:
    n = y.shape[axis]
    prev = jnp.concatenate([jax.lax.slice_in_dim(y, 0, 1, axis=axis),
                            jax.lax.slice_in_dim(y, 0, n - 1, axis=axis)], axis=axis)
    nxt = jnp.concatenate([jax.lax.slice_in_dim(y, 1, n, axis=axis),
                           jax.lax.slice_in_dim(y, n - 1, n, axis=axis)], axis=axis)
    even = 0.75 * y + 0.25 * prev
    odd = 0.75 * y + 0.25 * nxt
    stacked = jnp.stack([even, odd], axis=axis + 1)
    new_shape = list(y.shape)
    new_shape[axis] = 2 * n
    return stacked.reshape(new_shape)

  return along(2, along(1, x))


def count_params(params: Any) -> int:
  """Number of scalars in a parameter pytree (works on ShapeDtypeStructs)."""
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params)))
