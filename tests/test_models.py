"""Structure and behaviour of the MTLFace Flax modules (issue 2)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtlface_jax import ages
from mtlface_jax.models import AgeEstimator, CosFace, Encoder, Generator, PatchDiscriminator
from mtlface_jax.models import discriminator as disc_lib
from mtlface_jax.models import icm
from mtlface_jax.models import layers

KEY = jax.random.PRNGKey(0)
IMAGES = jax.ShapeDtypeStruct((2, 112, 112, 3), jnp.float32)
GROUPS = jax.ShapeDtypeStruct((2,), jnp.int32)


def _abstract_init(module, *args, **kwargs):
  rngs = {"params": KEY, "dropout": KEY}
  return jax.eval_shape(lambda *a: module.init(rngs, *a, **kwargs), *args)


def _abstract_encoder(num_layers=50):
  enc = Encoder(num_layers)
  variables = _abstract_init(enc, IMAGES)
  outputs = jax.eval_shape(lambda v, x: enc.apply(v, x), variables, IMAGES)
  return variables, outputs


@pytest.mark.parametrize("num_layers,expected", [
    (50, 47_028_388), (34, 37_576_868), (64, 42_302_628), (101, 68_593_700)])
def test_encoder_parameter_counts(num_layers, expected):
  variables = _abstract_init(Encoder(num_layers), IMAGES)
  assert layers.count_params(variables["params"]) == expected


def test_component_parameter_counts_and_shapes():
  variables, out = _abstract_encoder()
  assert layers.count_params(variables["params"]["fsm"]) == 3_441_764
  assert layers.count_params(variables["params"]["output_layer"]) == 12_847_616
  shapes = {name: tuple(a.shape[1:]) for name, a in out._asdict().items()}
  assert shapes == {"embedding": (512,), "x_id": (7, 7, 512), "x_age": (7, 7, 512),
                    "x1": (112, 112, 64), "x2": (56, 56, 64), "x3": (28, 28, 128),
                    "x4": (14, 14, 256), "x5": (7, 7, 512)}
  age_vars = _abstract_init(AgeEstimator(), out.x_age, train=False)
  assert layers.count_params(age_vars["params"]) == 12_899_119
  cos_vars = _abstract_init(CosFace(10_575), out.embedding)
  assert layers.count_params(cos_vars["params"]) == 5_414_400
  gen = Generator()
  gen_args = (IMAGES, out.x2, out.x3, out.x4, out.x_id, GROUPS)
  gen_vars = _abstract_init(gen, *gen_args)
  assert layers.count_params(gen_vars["params"]) == 54_041_920
  assert layers.count_params(gen_vars["params"]["icm"]) == 49_164_980
  assert layers.count_params(gen_vars["params"]["decoder"]) == 4_876_940
  assert jax.eval_shape(lambda v, *a: gen.apply(v, *a), gen_vars, *gen_args).shape == (2, 112, 112, 3)
  disc = PatchDiscriminator()
  disc_vars = _abstract_init(disc, IMAGES, GROUPS)
  assert layers.count_params(disc_vars["params"]) == 6_973_889
  assert jax.eval_shape(lambda v, *a: disc.apply(v, *a), disc_vars, IMAGES, GROUPS).shape == (2, 5, 5, 1)


def test_router_mask_rows():
  mask = icm.router_mask(7)
  assert mask.shape == (7, 819)
  starts = [int(np.argmax(row)) for row in mask]
  assert starts == [0, 115, 230, 345, 460, 575, 690]
  assert all(row.sum() == 128 for row in mask)
  # Neighbouring groups share 13 channels; groups two apart share none.
  assert (mask[0] * mask[1]).sum() == 13 and (mask[0] * mask[2]).sum() == 0


def _brute_force_adaptive(x, out_size, reduce):
  n, h, w, c = x.shape
  out = np.zeros((n, out_size, out_size, c), x.dtype)
  for i in range(out_size):
    h0, h1 = int(np.floor(i * h / out_size)), int(np.ceil((i + 1) * h / out_size))
    for j in range(out_size):
      w0, w1 = int(np.floor(j * w / out_size)), int(np.ceil((j + 1) * w / out_size))
      out[:, i, j] = reduce(x[:, h0:h1, w0:w1], axis=(1, 2))
  return out


@pytest.mark.parametrize("size", [7, 5, 10])
@pytest.mark.parametrize("out_size", [1, 2, 3, 4])
def test_adaptive_pool_matches_pytorch_bins(size, out_size):
  x = np.random.RandomState(size * 10 + out_size).randn(2, size, size, 3).astype(np.float32)
  for jnp_reduce, np_reduce in ((jnp.mean, np.mean), (jnp.max, np.max)):
    got = layers.adaptive_pool(jnp.asarray(x), out_size, jnp_reduce)
    np.testing.assert_allclose(got, _brute_force_adaptive(x, out_size, np_reduce), rtol=1e-6, atol=1e-6)
  assert layers.adaptive_bins(7, 2) == [(0, 4), (3, 7)]
  assert layers.adaptive_bins(7, 3) == [(0, 3), (2, 5), (4, 7)]


def test_spatial_pyramid_is_channel_major():
  x = np.random.RandomState(0).randn(1, 7, 7, 4).astype(np.float32)
  flat = np.asarray(layers.spatial_pyramid(jnp.asarray(x), (1, 2), jnp.mean))
  level2 = _brute_force_adaptive(x, 2, np.mean)[0]  # 2, 2, C
  # PyTorch order: [c for 1x1] then [c, i, j] for 2x2.
  np.testing.assert_allclose(flat[0, 4:], level2.transpose(2, 0, 1).reshape(-1), rtol=1e-5, atol=1e-6)


def test_gradient_reversal():
  upstream = jnp.array([1.0, -2.0, 3.0])
  x = jnp.array([0.5, 1.5, -1.0])
  for coefficient in (1.0, 0.3):
    value, vjp = jax.vjp(lambda v: layers.gradient_reversal(v, coefficient), x)
    np.testing.assert_array_equal(value, x)
    np.testing.assert_allclose(vjp(upstream)[0], -coefficient * upstream)


def test_cosface_hand_computed():
  head = CosFace(num_classes=2, scale=2.0, margin=0.5)
  kernel = jnp.array([[1.0, 0.0], [0.0, 2.0]])  # class 0 along e0, class 1 along e1
  embedding = jnp.array([[3.0, 4.0]])  # cos = (0.6, 0.8)
  params = {"params": {"kernel": kernel}}
  np.testing.assert_allclose(head.apply(params, embedding), [[0.6, 0.8]], rtol=1e-6)
  np.testing.assert_allclose(head.apply(params, embedding, jnp.array([1])),
                             [[2 * 0.6, 2 * (0.8 - 0.5)]], rtol=1e-6)
  # An unknown label (-1) gets no margin.
  np.testing.assert_allclose(head.apply(params, embedding, jnp.array([-1])), [[1.2, 1.6]], rtol=1e-6)


def test_spectral_norm_normalises_top_singular_value():
  module = disc_lib.SpectralNormConv(features=8, stride=1)
  x = jnp.ones((1, 6, 6, 5))
  variables = module.init(KEY, x, train=True)
  kernel = variables["params"]["kernel"]
  for _ in range(30):
    _, updates = module.apply(variables, x, train=True, mutable=["spectral"])
    variables = {**variables, **updates}
  u, v = variables["spectral"]["u"], variables["spectral"]["v"]
  matrix = disc_lib.torch_weight_matrix(kernel)
  sigma = float(u @ matrix @ v)
  top = np.linalg.svd(np.asarray(matrix) / sigma, compute_uv=False)[0]
  assert abs(top - 1.0) < 1e-3
  # Inference reuses the stored estimate and leaves it unchanged.
  _, same = module.apply(variables, x, train=False, mutable=["spectral"])
  np.testing.assert_array_equal(same["spectral"]["u"], u)


def test_upsample_matches_half_pixel_bilinear():
  x = jax.random.normal(KEY, (2, 5, 7, 3))
  expected = jax.image.resize(x, (2, 10, 14, 3), method="bilinear")
  np.testing.assert_allclose(layers.upsample_bilinear_2x(x), expected, rtol=1e-5, atol=1e-5)


def test_batchnorm_tracks_unbiased_variance_with_torch_momentum():
  bn = layers.BatchNorm(decay=layers.torch_momentum(0.1))
  x = jax.random.normal(KEY, (4, 3, 3, 2)) * 3.0 + 1.0
  variables = bn.init(KEY, x, train=True)
  y, updates = bn.apply(variables, x, train=True, mutable=["batch_stats"])
  flat = np.asarray(x).reshape(-1, 2)
  np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.1 * flat.mean(0), rtol=1e-5)
  np.testing.assert_allclose(updates["batch_stats"]["var"], 0.9 + 0.1 * flat.var(0, ddof=1), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 2),
                             (flat - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-5), rtol=1e-4, atol=1e-5)


def test_age_groups():
  np.testing.assert_array_equal(ages.groups_of([0, 10, 11, 30, 60, 61, 100, -1], 7),
                                [0, 0, 1, 2, 5, 6, 6, -1])
  np.testing.assert_array_equal(ages.groups_of([12, 13, 65, 66], 8), [0, 1, 6, 7])
  for g in range(4, 9):
    assert int(ages.age_to_group(jnp.asarray(200.0), g)) == g - 1
  with pytest.raises(ValueError, match="num_groups"):
    ages.age_to_group(10, 9)


def test_age_estimator_expected_age_and_bf16_close_to_float32():
  """A small-input IR-34 forward in bf16 stays close to float32."""
  images = jax.random.uniform(KEY, (2, 32, 32, 3), minval=-1, maxval=1)
  enc32, enc16 = Encoder(34), Encoder(34, dtype=jnp.bfloat16)
  # Jitted: one compile per program instead of one per primitive (minutes eagerly).
  variables = jax.jit(enc32.init)({"params": KEY}, images)
  out32 = jax.jit(enc32.apply)(variables, images)
  out16 = jax.jit(enc16.apply)(variables, images)
  assert out16.x_id.dtype == jnp.bfloat16 and variables["params"]["trunk"]["input_conv"]["kernel"].dtype == jnp.float32
  for a, b in ((out32.x_id, out16.x_id), (out32.embedding, out16.embedding)):
    rel = jnp.linalg.norm(a - b.astype(jnp.float32)) / jnp.linalg.norm(a)
    assert float(rel) < 0.05
  age = AgeEstimator()
  age_vars = age.init(KEY, out32.x_age, False)
  outputs = age.apply(age_vars, out32.x_age, False)
  probs = jax.nn.softmax(outputs.age_logits)
  np.testing.assert_allclose(outputs.expected_age, probs @ np.arange(101), rtol=1e-5)
  assert outputs.group_logits.shape == (2, 7)
