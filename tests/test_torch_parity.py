"""PyTorch reference vs converted JAX models: same inputs, same outputs.

Random weights (``randomize_``, BatchNorm statistics calibrated on the inputs so
activations stay in a trained network's range) are saved with ``torch.save``,
read back and converted by ``mtlface_jax.convert`` and loaded into the Flax
modules; every output is compared in inference mode with a maximum relative
error of 1e-4 (float32, CPU), where the relative error is
max |jax - torch| / max |torch|.
"""

import functools
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
# One intra-op thread: with pytest-xdist workers or other processes on the few
# cores, torch's spinning OpenMP threads oversubscribe them and run ~5x slower.
torch.set_num_threads(1)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from mtlface_jax import convert  # noqa: E402
from mtlface_jax import predict  # noqa: E402
from mtlface_jax.models import spec as spec_lib  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from torch_reference import mtlface_torch as ref  # noqa: E402

TOLERANCE = 1e-4
AGE_GROUPS = 7
NUM_CLASSES = 37


def nhwc(value):
  """A torch tensor (NCHW if 4-D) as a NumPy array in our NHWC layout."""
  value = value.detach().numpy()
  return value.transpose(0, 2, 3, 1) if value.ndim == 4 else value


def assert_parity(jax_value, torch_value, name):
  expected = nhwc(torch_value)
  got = np.asarray(jax_value, np.float32)
  assert got.shape == expected.shape, name
  scale = np.abs(expected).max()
  assert scale > 0, f"{name}: reference output is all zeros"
  error = np.abs(got - expected).max() / scale
  assert error < TOLERANCE, f"{name}: max relative error {error:.2e}"


def save(module, path, ddp=False):
  """torch.save of a state_dict, optionally with DDP's ``module.`` prefix."""
  state = module.state_dict()
  if ddp:
    state = {f"module.{key}": value for key, value in state.items()}
  torch.save(state, path)
  return path


def _random_images(count, seed):
  generator = torch.Generator().manual_seed(seed)
  return torch.rand(count, 3, 112, 112, generator=generator) * 2 - 1


def _cvpr_torch_models(image, target):
  """Random CVPR modules with BatchNorm statistics calibrated on the test batch.

  Calibrating on the very inputs that are compared keeps every activation in a
  trained network's range (see ``calibrate_batchnorm_``) and needs no extra
  forward pass of the (slow on CPU) IR-50.

  Returns:
    (modules by name, the encoder's inference outputs on ``image``).
  """
  torch.manual_seed(0)
  encoder = ref.calibrate_batchnorm_(ref.randomize_(ref.IRBackbone(50), seed=1), image)
  with torch.no_grad():
    features = encoder(image)
  age = ref.calibrate_batchnorm_(ref.randomize_(ref.AgeEstimator(AGE_GROUPS), seed=2),
                                 features.x_age)
  generator = ref.calibrate_batchnorm_(
      ref.randomize_(ref.AgingModule(AGE_GROUPS), seed=4), image, features.x2,
      features.x3, features.x4, features.x_id, target)
  models = {"encoder": encoder, "age": age, "generator": generator,
            "head": ref.randomize_(ref.CosFace(NUM_CLASSES), seed=3).eval(),
            "discriminator": ref.randomize_(ref.PatchDiscriminator(AGE_GROUPS), seed=5).eval()}
  return models, features


@pytest.fixture(scope="module")
def cvpr(tmp_path_factory):
  """Torch outputs and converted variables of the CVPR modules."""
  directory = tmp_path_factory.mktemp("cvpr")
  image, target, labels = _random_images(2, seed=7), torch.tensor([1, 5]), torch.tensor([3, 30])
  models, features = _cvpr_torch_models(image, target)
  # File names as the reference training code's logger writes them.
  files = {"encoder": "backbone-100", "age": "estimation_network-100", "head": "head-100",
           "generator": "generator-100", "discriminator": "discriminator-100"}
  paths = [save(models[name], directory / file, ddp=(name == "encoder"))
           for name, file in files.items()]
  state_dicts, sources = convert.read_cvpr_inputs([str(p) for p in paths], "auto")
  conversion = convert.convert_cvpr(state_dicts, sources=sources)
  with torch.no_grad():
    torch_out = {
        "features": features,
        "age": models["age"](features.x_age),
        "cosine": models["head"](features.embedding),
        "margin_logits": models["head"](features.embedding, labels),
        "aged": models["generator"](image, features.x2, features.x3, features.x4,
                                    features.x_id, target),
    }
    torch_out["scores"] = models["discriminator"](torch_out["aged"], target)
  return dict(conversion=conversion, torch=torch_out, image=image, target=target,
              labels=labels)


def _apply(conversion, name, spec, *inputs):
  return jax.jit(spec.module.apply)(conversion.variables[name], *inputs)


def test_cvpr_conversion_meta(cvpr):
  meta = cvpr["conversion"].meta
  encoder = meta["model"]["encoder"]
  assert encoder["num_layers"] == 50 and encoder["attention_version"] == 1
  assert meta["num_classes"] == NUM_CLASSES and meta["age_group"] == AGE_GROUPS
  assert sorted(cvpr["conversion"].variables) == [
      "age", "discriminator", "encoder", "generator", "head"]
  assert not cvpr["conversion"].report.unexpected


def test_encoder_parity(cvpr):
  spec = convert.encoder_spec(50, released=False)
  out = _apply(cvpr["conversion"], "encoder", spec, jnp.asarray(nhwc(cvpr["image"])))
  expected = cvpr["torch"]["features"]
  for name in ("embedding", "x_id", "x_age", "x1", "x2", "x3", "x4", "x5"):
    assert_parity(getattr(out, name), getattr(expected, name), name)


def test_age_estimator_parity(cvpr):
  spec = convert.age_spec("age", AGE_GROUPS)
  inputs = jnp.asarray(nhwc(cvpr["torch"]["features"].x_age))
  out = jax.jit(spec.module.apply, static_argnums=2)(
      cvpr["conversion"].variables["age"], inputs, False)
  expected = cvpr["torch"]["age"]
  assert float(expected.age_logits.softmax(dim=1).max()) < 0.9  # Not saturated.
  assert_parity(out.age_logits, expected.age_logits, "age_logits")
  assert_parity(out.group_logits, expected.group_logits, "group_logits")
  assert_parity(out.expected_age, expected.expected_age, "expected_age")


def test_cosface_parity(cvpr):
  spec = convert.head_spec(NUM_CLASSES)
  embedding = jnp.asarray(nhwc(cvpr["torch"]["features"].embedding))
  variables = cvpr["conversion"].variables["head"]
  assert_parity(spec.module.apply(variables, embedding), cvpr["torch"]["cosine"], "cosine")
  logits = spec.module.apply(variables, embedding, jnp.asarray(cvpr["labels"].numpy()))
  assert_parity(logits, cvpr["torch"]["margin_logits"], "margin_logits")


def test_generator_parity(cvpr):
  spec = convert.generator_spec(AGE_GROUPS)
  features = cvpr["torch"]["features"]
  image = jnp.asarray(nhwc(cvpr["image"]))
  out = _apply(cvpr["conversion"], "generator", spec, image,
               *(jnp.asarray(nhwc(f)) for f in (features.x2, features.x3, features.x4,
                                                 features.x_id)),
               jnp.asarray(cvpr["target"].numpy()))
  assert_parity(out, cvpr["torch"]["aged"], "generated image")
  # The residual alone, so a decoder bug cannot hide behind the added input.
  assert_parity(out - image, cvpr["torch"]["aged"] - cvpr["image"], "residual image")


def test_discriminator_parity(cvpr):
  spec = convert.discriminator_spec(AGE_GROUPS)
  out = _apply(cvpr["conversion"], "discriminator", spec,
               jnp.asarray(nhwc(cvpr["torch"]["aged"])), jnp.asarray(cvpr["target"].numpy()))
  assert out.shape == (2, 5, 5, 1)
  assert_parity(out, cvpr["torch"]["scores"], "discriminator scores")


@pytest.fixture(scope="module")
def tpami(tmp_path_factory):
  """The released recognition + age path. (The ageing branch, converted into
  ``generator``, is checked against its own reference in ``test_tpami.py``.)"""
  torch.manual_seed(0)
  image = _random_images(2, seed=3)
  model = ref.randomize_(ref.TPAMIRecognitionModel(AGE_GROUPS), seed=11)
  ref.calibrate_batchnorm_(model, image)
  state = dict(model.state_dict())
  path = tmp_path_factory.mktemp("tpami") / "mtlface_tpami.pth"
  torch.save(state, path)
  conversion = convert.convert_tpami(convert.read_state_dict(path), str(path))
  with torch.no_grad():
    features, age = model(image)
    encoded = model.encode(image)
  return dict(conversion=conversion, image=image, features=features, age=age,
              encoded=encoded)


def test_tpami_file_without_ageing_branch_converts_recognition_only(tpami):
  report = tpami["conversion"].report
  assert convert.TPAMI_NO_AGEING_NOTE in report.summary() and "; 0 skipped" in report.summary()
  assert sorted(tpami["conversion"].variables) == ["age", "encoder"]
  model = tpami["conversion"].meta["model"]
  assert model["encoder"]["attention_version"] == 2 and model["family"] == "tpami"
  assert model["generator"] is None


def test_tpami_encoder_and_age_parity(tpami):
  variables = tpami["conversion"].variables
  models = spec_lib.build(spec_lib.from_meta(tpami["conversion"].meta))
  image = jnp.asarray(nhwc(tpami["image"]))
  # The released flip-averaged encode, which also returns the outputs of both
  # views (the images and their mirror images in one batch: one compilation).
  # The weights are arguments, not closure constants, which XLA would fold.
  encoded, out, age = jax.jit(functools.partial(predict.encode_views, models))(
      variables, image)
  plain = jax.tree_util.tree_map(lambda x: x[:2], out)
  for name in ("embedding", "x_id", "x_age", "x5"):
    assert_parity(getattr(plain, name), getattr(tpami["features"], name), name)
  assert_parity(age.age_logits[:2], tpami["age"].age_logits, "age_logits")
  assert_parity(age.group_logits[:2], tpami["age"].group_logits, "group_logits")
  assert_parity(age.expected_age[:2], tpami["age"].expected_age, "expected_age")
  torch_embedding, torch_age, torch_groups = tpami["encoded"]
  assert_parity(encoded.embedding, torch_embedding, "flip-averaged embedding")
  assert_parity(encoded.age, torch_age, "flip-averaged age")
  assert_parity(encoded.group_logits, torch_groups, "flip-averaged group logits")
