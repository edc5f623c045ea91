"""The released TPAMI ageing branch: PyTorch reference vs converted Flax model.

The reference (``torch_reference/tpami_torch.py``) is written from docs/architecture.md (part T) with
the original's per-sample grouped convolutions and the native upfirdn2d; the
Flax model uses the XLA forms (input scaling, output demodulation, dilated
transposed convs, separable blur). Both run the real structure (12 style
blocks, three ICM v2, three upsample blocks, a 128 px StyleGAN2 with 11 noise
inputs, the 128 -> 112 align_corners resize) at reduced widths; the weights
go through the converter. Outputs agree to 1e-4 of their largest magnitude.
Full-size parameter counts and the full released key set are checked with
shapes only (``jax.eval_shape``, a PyTorch model on the meta device).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)  # Shared cores: torch's spinning threads oversubscribe them.

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from mtlface_jax import convert  # noqa: E402
from mtlface_jax.models import iresnet  # noqa: E402
from mtlface_jax.models import layers  # noqa: E402
from mtlface_jax.models import stylegan2  # noqa: E402
from mtlface_jax.models import tpami_generator as tg  # noqa: E402
from tests.torch_reference import tpami_torch as tref  # noqa: E402

TOLERANCE = 1e-4
GROUPS = 7
WIDTHS = (8, 16, 32, 64)          # c1 (x2), c2 (x3), c3 (x4), x_id
STYLE_DIM = 32
CHANNELS = (32, 32, 32, 24, 16, 16)  # 4, 8, ..., 128 px
# Sample 3 repeats sample 0's features with another target group.
TARGETS = (0, 3, 6, 4)


def nhwc(value):
  value = value.detach().numpy()
  return value.transpose(0, 2, 3, 1) if value.ndim == 4 else value


def relative_error(got, expected):
  expected = nhwc(expected) if isinstance(expected, torch.Tensor) else np.asarray(expected)
  got = np.asarray(got, np.float32)
  assert got.shape == expected.shape
  scale = np.abs(expected).max()
  assert scale > 0
  return float(np.abs(got - expected).max() / scale)


def state_dict_numpy(module):
  return {key: value.detach().numpy() for key, value in module.state_dict().items()}


def _capture_decoder(module, method_name):
  """Keep the decoder's outputs: before the clamp (112 px) and of the synthesis (128 px)."""
  return method_name == "__call__" and module.name in ("decoder", "synthesis")


@pytest.fixture(scope="module")
def reduced():
  """A random reduced-width ageing branch: torch outputs, converted variables, JAX outputs.

  The JAX side is one compiled call of the generator contract; the decoder's
  intermediate outputs come from ``capture_intermediates``.
  """
  torch.manual_seed(0)
  model = tref.randomize_(tref.TPAMIAgeing(WIDTHS, STYLE_DIM, GROUPS, CHANNELS), seed=3).eval()
  gen = torch.Generator().manual_seed(5)
  features = [torch.randn(len(TARGETS) - 1, c, s, s, generator=gen)
              for c, s in zip(WIDTHS, (56, 28, 14, 7))]
  features = [torch.cat([f, f[:1]]) for f in features]
  target = torch.tensor(TARGETS)
  with torch.no_grad():
    latents, decoded, aged = model(*features, target)
    synthesized = model.decoder(latents, resize=False)
  spec = convert.tpami_generator_spec(GROUPS, STYLE_DIM, CHANNELS, WIDTHS)
  report = convert.ConversionReport()
  state_dict = state_dict_numpy(model)
  variables = convert.convert_module(state_dict, spec, report)
  inputs = [jnp.asarray(nhwc(f)) for f in features]
  images = jnp.zeros((len(TARGETS), 112, 112, 3), jnp.float32)

  @jax.jit
  def run(variables, images, *args):
    return spec.module.apply(variables, images, *args, return_latents=True,
                             capture_intermediates=_capture_decoder)

  (jax_aged, jax_latents), state = run(variables, images, *inputs, jnp.asarray(TARGETS))
  captured = state["intermediates"]["decoder"]
  return dict(spec=spec, report=report, state_dict=state_dict, variables=variables,
              inputs=inputs, images=images, target=jnp.asarray(TARGETS),
              torch=dict(latents=latents, decoded=decoded, aged=aged, synthesized=synthesized),
              jax=dict(latents=jax_latents, aged=jax_aged, decoded=captured["__call__"][0],
                       synthesized=captured["synthesis"]["__call__"][0]))


def test_reduced_conversion_uses_every_tensor(reduced):
  report, state_dict = reduced["report"], reduced["state_dict"]
  assert not report.errors(), report.errors()
  assert len(state_dict) == 231 + 118  # The released key count at any width.
  used = {e.torch_key for e in reduced["spec"].entries} | set(reduced["spec"].constants)
  assert used == set(state_dict)
  # 27 router masks and 10 FIR kernels are constants, checked rather than converted.
  assert report.converted == {"generator": 231 + 118 - 27 - 10}
  assert report.constants == 37


def test_latents_parity(reduced):
  latents = reduced["jax"]["latents"]
  assert latents.shape == (4, 12, STYLE_DIM) and latents.dtype == jnp.float32
  assert relative_error(latents, reduced["torch"]["latents"]) < TOLERANCE


def test_target_group_conditions_only_middle_and_fine_latents(reduced):
  latents = np.asarray(reduced["jax"]["latents"])  # Samples 0 and 3: same face, groups 0 and 4.
  np.testing.assert_allclose(latents[3, :3], latents[0, :3], rtol=1e-5, atol=1e-6)
  assert np.abs(latents[3, 3:] - latents[0, 3:]).max() > 1e-2 * np.abs(latents).max()


def test_decoder_parity(reduced):
  got, expected = reduced["jax"], reduced["torch"]
  assert got["synthesized"].shape == (4, 128, 128, 3)
  assert relative_error(got["synthesized"], expected["synthesized"]) < TOLERANCE
  assert relative_error(got["decoded"], expected["decoded"]) < TOLERANCE


def test_ageing_end_to_end_parity(reduced):
  aged = reduced["jax"]["aged"]
  assert aged.shape == reduced["images"].shape and aged.dtype == reduced["images"].dtype
  assert relative_error(aged, reduced["torch"]["aged"]) < TOLERANCE
  # Most pixels are inside the clamp, so the comparison is not of constants.
  assert float(np.mean(np.abs(np.asarray(aged)) < 1.0)) > 0.5


def test_bfloat16_generator_contract(reduced):
  """Traced only (numerics in bfloat16 are checked on a small synthesis network below)."""
  module = reduced["spec"].module.clone(dtype=jnp.bfloat16)
  images = reduced["images"].astype(jnp.bfloat16)
  aged = jax.eval_shape(module.apply, reduced["variables"], images, *reduced["inputs"],
                        reduced["target"])
  assert aged.shape == images.shape and aged.dtype == jnp.bfloat16


def test_synthesis_noise_and_bfloat16():
  """Noise buffers by default, random noise only from an explicit rng; bfloat16 compute."""
  synthesis = stylegan2.SynthesisNetwork(16, channels=(8, 8, 4))
  codes = jax.random.normal(jax.random.PRNGKey(0), (2, stylegan2.num_latents(16), 6))
  variables = jax.jit(synthesis.init)(jax.random.PRNGKey(1), codes)
  # Non-zero noise weights, so that noise changes the image.
  variables = jax.tree_util.tree_map_with_path(
      lambda path, x: x + 0.5 if "noise" in jax.tree_util.keystr(path) and x.shape == (1,) else x,
      variables)

  @jax.jit
  def run(variables, codes, key):
    buffers = synthesis.apply(variables, codes)
    noise = jax.tree_util.tree_leaves(variables["buffers"])  # Sorted: noise_0, 1, 2, 3, 4.
    explicit = synthesis.apply(variables, codes, noise=noise)
    random = synthesis.apply(variables, codes, randomize_noise=True, rngs={"noise": key})
    half = synthesis.clone(dtype=jnp.bfloat16).apply(variables, codes)
    # Differentiable end to end (issue 15 trains it): every parameter gets a gradient.
    loss = lambda p: jnp.sum(jnp.square(synthesis.apply({**variables, "params": p}, codes)))
    grads = jax.grad(loss)(variables["params"])
    return buffers, explicit, random, half, grads

  buffers, explicit, random_a, half, grads = run(variables, codes, jax.random.PRNGKey(2))
  _, _, random_again, _, _ = run(variables, codes, jax.random.PRNGKey(2))
  _, _, random_b, _, _ = run(variables, codes, jax.random.PRNGKey(3))
  norms = [float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(grads)]
  # input, conv1, to_rgb1, then two levels of (StyledConv x 2, ToRGB).
  assert len(norms) == 1 + 5 + 4 + 2 * (5 + 5 + 4) and min(norms) > 0
  assert half.dtype == jnp.float32  # bfloat16 convolutions, float32 RGB skip path.
  assert relative_error(half, buffers) < 0.05
  np.testing.assert_array_equal(explicit, buffers)
  np.testing.assert_array_equal(random_again, random_a)
  assert np.abs(np.asarray(random_a - random_b)).max() > 1e-3
  assert np.abs(np.asarray(random_a - buffers)).max() > 1e-3
  with pytest.raises(Exception, match="noise"):
    jax.eval_shape(lambda v, c: synthesis.apply(v, c, randomize_noise=True), variables, codes)


def test_upfirdn2d_and_resize_match_torch():
  x = torch.randn(2, 3, 9, 7, generator=torch.Generator().manual_seed(0))
  for up, pad, gain in ((2, (2, 1), 4.0), (1, (1, 1), 4.0), (1, (2, 0), 1.0)):
    expected = tref.upfirdn2d(x, tref.fir_kernel(gain=gain), up=up, pad=pad)
    got = stylegan2.upfirdn2d(jnp.asarray(nhwc(x)), up=up, pad=pad, gain=gain)
    assert relative_error(got, expected) < 1e-6
  images = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
  expected = torch.nn.functional.interpolate(images, size=112, mode="bilinear",
                                             align_corners=True)
  got = tg.resize_align_corners(jnp.asarray(nhwc(images)), 112)
  assert relative_error(got, expected) < 1e-6


def _released_state_dict():
  """Every key of the released file at full size, without allocating the weights.

  The model is built on the meta device and moved to uninitialised CPU memory
  (never written, so never resident); the buffers the converter checks are
  then computed on the CPU.
  """
  with torch.device("meta"):
    model = tref.TPAMIModel(GROUPS)
  model = model.to_empty(device="cpu")
  tref.fill_buffers_(model)
  return state_dict_numpy(model)


@pytest.fixture(scope="module")
def released():
  """The full-size released layout converted, and the generator's abstract variables."""
  state_dict = _released_state_dict()
  conversion = convert.convert_tpami(state_dict, "mtlface_checkpoints.tar")
  spec = convert.tpami_generator_spec()
  key = jax.random.PRNGKey(0)
  abstract = jax.eval_shape(lambda *a: spec.module.init(key, *a), *spec.init_inputs)
  return dict(state_dict=state_dict, conversion=conversion, abstract=abstract)


def test_full_released_layout_converts_every_tensor(released):
  state_dict, conversion = released["state_dict"], released["conversion"]
  report = conversion.report
  generator_keys = [k for k in state_dict if k.startswith(convert.TPAMI_GENERATOR_PREFIXES)]
  assert len(generator_keys) == 231 + 118
  assert not report.unexpected and not report.errors()
  assert (sum(report.converted.values()) + report.constants + len(report.ignored)
          == len(state_dict))
  assert report.summary().endswith("; 0 skipped")
  assert sorted(conversion.variables) == ["age", "encoder", "generator"]
  meta = conversion.meta
  model = meta["model"]  # The spec every reader rebuilds from (models/spec.py).
  assert meta["layout"] == "tpami" and model["family"] == "tpami" and meta["skipped"] == 0
  assert model["generator"]["style_dim"] == 512 and model["generator"]["channels"] is None
  rebuilt = tg.TPAMIGenerator(meta["age_group"], **model["generator"])
  assert rebuilt == convert.tpami_generator_spec().module
  shapes = lambda tree: jax.tree_util.tree_map(lambda x: tuple(x.shape), tree)
  assert shapes(conversion.variables["generator"]) == shapes(released["abstract"])


def test_full_size_parameter_counts(released):
  params, count = released["abstract"]["params"], layers.count_params
  style, decoder = params["style_encoder"], params["decoder"]
  assert count(decoder) == 29_328_669
  assert count(decoder["synthesis"]) == 27_227_421
  assert count(decoder["mapping"]) == 2_101_248
  assert sum(count(v) for k, v in style.items() if k.startswith("styles_")) == 104_623_616
  expected = {"aging1": 46_906_912, "aging2": 11_728_656, "aging3": 2_933_128,
              "upsample1": 3_671_296, "upsample2": 918_144, "upsample3": 229_696,
              "latlayer1": 1_180_160, "latlayer2": 295_424}
  assert {k: count(style[k]) for k in expected} == expected
  # The released Encoder = recognition path (converted shapes = its Flax shapes)
  # + style path, less the frozen BatchNorm1d scale PyTorch does not train.
  recognition = released["conversion"].variables["encoder"]["params"]
  assert count(recognition) - 512 + count(style) == 229_378_076
  buffers = released["abstract"]["buffers"]["decoder"]
  assert buffers["latent_avg"].shape == (1, 1, 512)
  assert [buffers["synthesis"][f"noise_{i}"].shape for i in range(11)] == \
      stylegan2.noise_shapes(128)


def test_converted_tpami_checkpoint_loads_ages_and_exports(tmp_path):
  """A TPAMI-family checkpoint goes through the one seam: spec -> predict -> bundle."""
  from mtlface_jax import export  # pylint: disable=g-import-not-at-top
  from mtlface_jax import inference  # pylint: disable=g-import-not-at-top
  from mtlface_jax import predict  # pylint: disable=g-import-not-at-top
  from mtlface_jax.models import spec as spec_lib  # pylint: disable=g-import-not-at-top
  from mtlface_jax.training import checkpoint  # pylint: disable=g-import-not-at-top
  generator = {"image_size": 112, "style_dim": STYLE_DIM, "channels": list(CHANNELS),
               "channel_multiplier": 2, "mapping_layers": 2, "lr_mlp": 0.01}
  spec = spec_lib.ModelSpec(family="tpami", age_group=GROUPS, generator=generator,
                            encoder=spec_lib.encoder_fields(50, "tpami", units=[1, 1, 1, 1],
                                                            depths=list(WIDTHS)))
  models = spec_lib.build(spec)
  variables = spec_lib.init_variables(models, 112, ("encoder", "age", "generator"),
                                      jax.random.PRNGKey(0))
  saver = checkpoint.Checkpointer(tmp_path / "converted", keep=1, async_save=False)
  saver.save(0, {"variables": variables}, {"converted_from": "pytorch", "layout": "tpami",
                                           "model": spec.to_dict()})
  saver.wait()
  saver.close()
  loaded = predict.load(tmp_path / "converted")
  assert loaded.info["family"] == "tpami" and loaded.spec == spec
  face = np.random.default_rng(0).uniform(-1, 1, (1, 112, 112, 3)).astype(np.float32)
  faces, groups = np.concatenate([face, face]), np.array([0, 6], np.int32)
  aged = jax.jit(lambda v, x, g: predict.synthesize(loaded.models, v, x, g))(
      loaded.variables, faces, groups)
  assert aged.shape == (2, 112, 112, 3) and np.abs(np.asarray(aged)).max() <= 1.0
  # The target group conditions the face: one input at two ages differs.
  assert np.abs(np.asarray(aged[0] - aged[1])).max() > 1e-4
  export.export_bundle(tmp_path / "converted", tmp_path / "bundle", platforms=("cpu",))
  np.testing.assert_allclose(inference.load(tmp_path / "bundle").synthesize(faces, groups), aged,
                             atol=1e-4)
