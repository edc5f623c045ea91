"""The Flax <-> PyTorch mapping covers every tensor of torch_layouts.json exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtlface_jax import torch_mapping as tm
from mtlface_jax.models import AgeEstimator, CosFace, Encoder, Generator, PatchDiscriminator
from mtlface_jax.models import TPAMIGenerator

KEY = jax.random.PRNGKey(0)
IMAGES = jax.ShapeDtypeStruct((2, 112, 112, 3), jnp.float32)
GROUPS = jax.ShapeDtypeStruct((2,), jnp.int32)
FEATURE = lambda *s: jax.ShapeDtypeStruct((2, *s), jnp.float32)
IGNORED_SUFFIXES = ("num_batches_tracked", "_unit_mapping")


def _flat(tree, prefix=()):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flat(value, prefix + (key,))
    else:
      yield prefix + (key,), value


def _check(module_vars, entries, layout):
  torch_shapes = {k: tuple(s) for k, s, _ in layout["state_dict"] if not k.endswith(IGNORED_SUFFIXES)}
  flax_leaves = {(c, path): leaf.shape for c, tree in module_vars.items() for path, leaf in _flat(tree)}
  assert len({e.torch_key for e in entries}) == len(entries)
  assert {e.torch_key for e in entries} == set(torch_shapes)
  assert {(e.collection, e.flax_path) for e in entries} == set(flax_leaves)
  for e in entries:
    fake = np.zeros(torch_shapes[e.torch_key], np.float32)
    assert tm.torch_to_flax(fake, e.transform).shape == flax_leaves[(e.collection, e.flax_path)], e


def _init(module, *args, **kwargs):
  return jax.eval_shape(lambda *a: module.init({"params": KEY, "dropout": KEY}, *a, **kwargs), *args)


def test_encoder_mapping(torch_layouts):
  _check(_init(Encoder(50), IMAGES), tm.encoder_entries(50), torch_layouts["cvpr2021"]["backbone_ir50"])


def test_heads_generator_discriminator_mapping(torch_layouts):
  cvpr = torch_layouts["cvpr2021"]
  _check(_init(AgeEstimator(), FEATURE(7, 7, 512), train=False), tm.age_estimator_entries(), cvpr["age_estimator"])
  _check(_init(CosFace(10575), FEATURE(512)), tm.cosface_entries(), cvpr["cosface_10575"])
  gen_args = (IMAGES, FEATURE(56, 56, 64), FEATURE(28, 28, 128), FEATURE(14, 14, 256),
              FEATURE(7, 7, 512), GROUPS)
  _check(_init(Generator(), *gen_args), tm.generator_entries(), cvpr["aging_module_icm_decoder"])
  _check(_init(PatchDiscriminator(), IMAGES, GROUPS), tm.discriminator_entries(),
         cvpr["patch_discriminator_sn"])


def test_tpami_encoder_mapping(torch_layouts):
  layout = torch_layouts["tpami2022_released"]["encoder"]
  recognition_prefixes = ("input_layer", "block", "output_layer", "fsm")
  subset = {"state_dict": [row for row in layout["state_dict"] if row[0].startswith(recognition_prefixes)]}
  tpami = Encoder(50, attention_version=2, dropout_rate=0.4, normalize_embedding=True)
  _check(_init(tpami, IMAGES), tm.encoder_entries(50), subset)


def test_tpami_style_path_mapping(torch_layouts):
  """The released encoder's style path (231 tensors, 27 of them router constants)."""
  layout = torch_layouts["tpami2022_released"]["encoder"]
  style_prefixes = ("styles.", "aging", "upsample", "latlayer")
  rows = [row for row in layout["state_dict"] if row[0].startswith(style_prefixes)]
  assert len(rows) == 231
  subset = {"state_dict": rows}
  generator = _init(TPAMIGenerator(), IMAGES, FEATURE(56, 56, 64), FEATURE(28, 28, 128),
                    FEATURE(14, 14, 256), FEATURE(7, 7, 512), GROUPS)
  style_vars = {"params": generator["params"]["style_encoder"]}
  entries = [tm.Entry(e.collection, e.flax_path[1:], e.torch_key[len("encoder."):], e.transform)
             for e in tm.style_path_entries()]
  _check(style_vars, entries, subset)


def test_dense_nchw_round_trip_and_semantics():
  rng = np.random.RandomState(0)
  torch_w = rng.randn(4, 7 * 7 * 512).astype(np.float32)
  kernel = tm.torch_to_flax(torch_w, "dense_nchw")
  np.testing.assert_array_equal(tm.flax_to_torch(kernel, "dense_nchw"), torch_w)
  feature_nhwc = rng.randn(7, 7, 512).astype(np.float32)
  torch_out = torch_w @ feature_nhwc.transpose(2, 0, 1).reshape(-1)
  np.testing.assert_allclose(feature_nhwc.reshape(-1) @ kernel, torch_out, rtol=1e-4)


@pytest.mark.parametrize("transform,shape", [("conv", (8, 3, 3, 3)), ("dense", (5, 4)),
                                             ("dense_from_1x1", (6, 9, 1, 1)), ("copy", (3,)),
                                             ("modconv", (1, 8, 5, 3, 3)), ("nhwc", (1, 7, 4, 4))])
def test_transforms_round_trip(transform, shape):
  value = np.random.RandomState(1).randn(*shape).astype(np.float32)
  np.testing.assert_array_equal(tm.flax_to_torch(tm.torch_to_flax(value, transform), transform), value)


def test_missing_keys_are_named():
  with pytest.raises(KeyError, match="weight"):
    tm.state_dict_to_variables({}, tm.cosface_entries())
