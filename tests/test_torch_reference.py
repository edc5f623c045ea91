"""The PyTorch reference model matches torch_layouts.json exactly.

The parity tests of the JAX port trust ``tests/torch_reference`` to be the
published network; these tests pin that down: every state_dict key, shape and
param/buffer kind (in order), the trainable parameter counts, and output shapes.
"""

import math
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
# One intra-op thread: with pytest-xdist workers or other processes on the few
# cores, torch's spinning OpenMP threads oversubscribe them and run ~5x slower.
torch.set_num_threads(1)

# The reference package lives beside this file; make it importable whether or
# not tests/ is a package.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from torch_reference import mtlface_torch as ref  # noqa: E402
from torch_reference import tpami_torch as tpami_ref  # noqa: E402

# Keys of the released encoder's style path (in tpami_torch, not TPAMIRecognitionModel).
TPAMI_AGING_PREFIXES = ("styles.", "upsample", "latlayer", "aging")
AGE_GROUPS = 7


@pytest.fixture(scope="module")
def layouts(torch_layouts):
  """``tests/fixtures/torch_layouts.json`` (vendored; read by conftest)."""
  return torch_layouts


def state_layout(module):
  """[[key, shape, 'param'|'buffer'], ...] in state_dict order."""
  params = {name for name, _ in module.named_parameters()}
  return [[key, list(value.shape), "param" if key in params else "buffer"]
          for key, value in module.state_dict().items()]


def trainable_count(module):
  return sum(p.numel() for p in module.parameters() if p.requires_grad)


def param_count(layout):
  return sum(math.prod(shape) for _, shape, kind in layout if kind == "param")


CVPR_BUILDERS = {
    "backbone_ir50": lambda: ref.IRBackbone(50),
    "age_estimator": lambda: ref.AgeEstimator(AGE_GROUPS),
    "cosface_10575": lambda: ref.CosFace(10575),
    "aging_module_icm_decoder": lambda: ref.AgingModule(AGE_GROUPS),
    "patch_discriminator_sn": lambda: ref.PatchDiscriminator(AGE_GROUPS),
}


@pytest.mark.parametrize("name", sorted(CVPR_BUILDERS))
def test_cvpr_state_dict_equals_reference_layout(layouts, name):
  # The meta device gives shapes without allocating or initialising weights.
  with torch.device("meta"):
    module = CVPR_BUILDERS[name]()
  expected = layouts["cvpr2021"][name]
  assert state_layout(module) == expected["state_dict"]
  assert trainable_count(module) == expected["trainable_params"]


@pytest.mark.parametrize("depth", [34, 50, 64, 101])
def test_ir_depth_parameter_counts(layouts, depth):
  with torch.device("meta"):
    module = ref.IRBackbone(depth)
  expected = layouts["cvpr2021"][f"backbone_ir{depth}"]["trainable_params"]
  assert trainable_count(module) == expected


def test_tpami_state_dict_equals_reference_recognition_keys(layouts):
  with torch.device("meta"):
    model = ref.TPAMIRecognitionModel(AGE_GROUPS)
  released = layouts["tpami2022_released"]
  encoder_expected = [entry for entry in released["encoder"]["state_dict"]
                      if not entry[0].startswith(TPAMI_AGING_PREFIXES)]
  assert len(encoder_expected) < len(released["encoder"]["state_dict"])
  assert state_layout(model.encoder) == encoder_expected
  assert state_layout(model.age_estimator) == (
      released["age_estimator"]["state_dict"])
  assert trainable_count(model.age_estimator) == (
      released["age_estimator"]["trainable_params"])
  # The json counts every parameter; the BatchNorm1d scale is frozen at 1.
  all_params = sum(p.numel() for p in model.encoder.parameters())
  assert all_params == param_count(encoder_expected)
  assert trainable_count(model.encoder) == all_params - 512
  assert set(model.state_dict()) == (
      {f"encoder.{e[0]}" for e in encoder_expected}
      | {f"age_estimator.{e[0]}" for e in released["age_estimator"]["state_dict"]})


def test_tpami_full_model_equals_released_layout(layouts):
  """The whole released model (``tpami_torch.TPAMIModel``): every key of the file."""
  with torch.device("meta"):
    model = tpami_ref.TPAMIModel(AGE_GROUPS)
  released = layouts["tpami2022_released"]
  assert state_layout(model.encoder) == released["encoder"]["state_dict"]
  assert state_layout(model.age_estimator) == released["age_estimator"]["state_dict"]
  assert trainable_count(model.encoder) == 229_378_076  # The BatchNorm1d scale is frozen.
  # The decoder is not in the json; docs/architecture.md section T1.1 gives its keys and counts.
  decoder = state_layout(model.decoder)
  assert len(decoder) == 118 and decoder[0] == ["latent_avg", [1, 1, 512], "buffer"]
  assert trainable_count(model.decoder) == 29_328_669
  assert trainable_count(model.decoder.decoder.style) == 2_101_248
  buffers = sorted(key for key, _, kind in decoder if kind == "buffer")
  assert buffers == sorted(["latent_avg"] + [f"decoder.noises.noise_{i}" for i in range(11)]
                           + [f"decoder.convs.{2 * j}.conv.blur.kernel" for j in range(5)]
                           + [f"decoder.to_rgbs.{j}.upsample.kernel" for j in range(5)])
  sizes = [shape[-1] for key, shape, _ in decoder if "noises" in key]
  assert sizes == [4, 8, 8, 16, 16, 32, 32, 64, 64, 128, 128]


def test_router_mask_rows():
  mask = ref.router_mask(AGE_GROUPS, unit_count=128, sigma=0.1)
  assert mask.shape == (AGE_GROUPS, 819)
  starts = [int(row.nonzero()[0]) for row in mask]
  assert starts == [0, 115, 230, 345, 460, 575, 690]
  assert mask.sum(dim=1).tolist() == [128.0] * AGE_GROUPS
  # Neighbouring groups share 13 channels: the weight sharing that smooths ages.
  assert float((mask[0] * mask[1]).sum()) == 13.0


@pytest.fixture(scope="module")
def cvpr_outputs():
  """Runs the CVPR models once on random weights (inference mode)."""
  torch.manual_seed(0)
  backbone = ref.randomize_(ref.IRBackbone(50), seed=1).eval()
  estimator = ref.randomize_(ref.AgeEstimator(AGE_GROUPS), seed=2).eval()
  generator = ref.randomize_(ref.AgingModule(AGE_GROUPS), seed=3).eval()
  discriminator = ref.randomize_(ref.PatchDiscriminator(AGE_GROUPS), 4).eval()
  image = torch.rand(2, 3, 112, 112) * 2 - 1
  target = torch.tensor([0, 6])
  with torch.no_grad():
    features = backbone(image)
    ages = estimator(features.x_age)
    aged = generator(image, features.x2, features.x3, features.x4,
                     features.x_id, target)
    scores = discriminator(aged, target)
  return dict(features=features, ages=ages, aged=aged, scores=scores,
              image=image, discriminator=discriminator)


def test_backbone_output_shapes(cvpr_outputs):
  features = cvpr_outputs["features"]
  assert features.embedding.shape == (2, 512)
  assert features.x_id.shape == features.x_age.shape == (2, 512, 7, 7)
  assert features.x1.shape == (2, 64, 112, 112)
  assert features.x2.shape == (2, 64, 56, 56)
  assert features.x3.shape == (2, 128, 28, 28)
  assert features.x4.shape == (2, 256, 14, 14)
  assert features.x5.shape == (2, 512, 7, 7)
  # Decomposition: identity and age parts add up to the stage-4 features.
  torch.testing.assert_close(features.x_id + features.x_age, features.x5)
  assert torch.isfinite(features.embedding).all()


def test_age_estimator_outputs(cvpr_outputs):
  ages = cvpr_outputs["ages"]
  assert ages.age_logits.shape == (2, 101)
  assert ages.group_logits.shape == (2, AGE_GROUPS)
  probabilities = torch.softmax(ages.age_logits, dim=1)
  torch.testing.assert_close(
      ages.expected_age, probabilities @ torch.arange(101.0))
  assert ((ages.expected_age >= 0) & (ages.expected_age <= 100)).all()


def test_generator_and_discriminator_outputs(cvpr_outputs):
  aged, image = cvpr_outputs["aged"], cvpr_outputs["image"]
  assert aged.shape == (2, 3, 112, 112)
  # With random weights the residual image is far from zero: the decoder counts.
  assert float((aged - image).abs().mean()) > 1e-2
  assert cvpr_outputs["scores"].shape == (2, 1, 5, 5)


def test_spectral_norm_estimate_normalises_weights(cvpr_outputs):
  discriminator = cvpr_outputs["discriminator"]
  for index in (0, 2, 4, 6):
    weight = discriminator.main[index].weight  # weight_orig / sigma (eval).
    matrix = weight.reshape(weight.shape[0], -1).double()
    # Top singular value via the small Gram matrix (a wide SVD is slow on CPU).
    top = torch.linalg.eigvalsh(matrix @ matrix.t())[-1].sqrt()
    assert abs(float(top) - 1.0) < 1e-4


def test_cosface_margin_logits():
  torch.manual_seed(0)
  head = ref.CosFace(5)
  embedding = torch.randn(3, 512)
  labels = torch.tensor([0, 4, 2])
  cosine = head(embedding)
  expected = torch.nn.functional.normalize(embedding) @ (
      torch.nn.functional.normalize(head.weight).t())
  torch.testing.assert_close(cosine, expected)
  logits = head(embedding, labels)
  margin = torch.zeros(3, 5)
  margin[torch.arange(3), labels] = 0.35
  torch.testing.assert_close(logits, 64.0 * (expected - margin))


def test_tpami_encode_is_flip_averaged():
  torch.manual_seed(0)
  model = ref.randomize_(ref.TPAMIRecognitionModel(AGE_GROUPS), seed=5).eval()
  image = torch.rand(1, 3, 112, 112) * 2 - 1
  # Sample 1 is the mirror image of sample 0.
  batch = torch.cat([image, torch.flip(image, (3,))])
  with torch.no_grad():
    embedding, age, groups = model.encode(batch)
    plain, plain_age = model(batch)
  assert embedding.shape == (2, 512) and age.shape == (2,)
  assert groups.shape == (2, AGE_GROUPS)
  torch.testing.assert_close(plain.embedding.norm(dim=1), torch.ones(2))
  expected = torch.nn.functional.normalize(
      plain.embedding[0] + plain.embedding[1], dim=0)
  torch.testing.assert_close(embedding[0], expected, atol=1e-5, rtol=0)
  # Averaging over the flip makes the result invariant to flipping the input.
  torch.testing.assert_close(embedding[0], embedding[1], atol=1e-5, rtol=0)
  torch.testing.assert_close(age[0], plain_age.expected_age.mean(),
                             atol=1e-4, rtol=0)
  torch.testing.assert_close(age[0], age[1], atol=1e-4, rtol=0)
  # The frozen BatchNorm1d scale keeps its value 1 through randomize_.
  assert model.encoder.output_layer[4].weight.eq(1).all()
