"""The PyTorch -> Flax converter: round trips, reported problems, safe reading, CLI.

Parity of converted weights against the PyTorch reference is in
``test_torch_parity.py``; these tests cover the converter's own behaviour and
mostly run without torch (the tests that need torch to write files skip).
"""

import os

import numpy as np
import pytest

from mtlface_jax import convert
from mtlface_jax import torch_mapping as tm
from mtlface_jax.models import icm
from mtlface_jax import checkpoint_io

GROUPS = 7


def _flat(tree, prefix=()):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flat(value, prefix + (key,))
    else:
      yield prefix + (key,), np.asarray(value)


def assert_trees_equal(got, expected):
  got, expected = dict(_flat(got)), dict(_flat(expected))
  assert sorted(got) == sorted(expected)
  for path, value in expected.items():
    np.testing.assert_array_equal(got[path], value, err_msg=str(path))


def _random_variables(spec, seed):
  """Random arrays in the exact variable structure and shapes of ``spec.module``."""
  rng = np.random.default_rng(seed)
  variables = {}
  for (collection, path), shape in spec.flax_shapes().items():
    tree = variables.setdefault(collection, {})
    for key in path[:-1]:
      tree = tree.setdefault(key, {})
    tree[path[-1]] = rng.standard_normal(shape).astype(np.float32)
  return variables


@pytest.fixture(scope="module")
def small_modules():
  """Random Flax variables of the small CVPR modules and their PyTorch state_dicts."""
  specs = {"age": convert.age_spec("age", GROUPS), "da_age": convert.age_spec("da_age", GROUPS),
           "head": convert.head_spec(11), "discriminator": convert.discriminator_spec(GROUPS)}
  variables = {name: _random_variables(spec, seed)
               for seed, (name, spec) in enumerate(specs.items())}
  state_dicts = {name: tm.variables_to_state_dict(variables[name], list(spec.entries))
                 for name, spec in specs.items()}
  # BatchNorm's counter exists in real files and has no Flax counterpart.
  state_dicts["age"]["age_output_layer.0.num_batches_tracked"] = np.array(7)
  return variables, state_dicts


def test_cvpr_round_trip_with_ddp_prefix(small_modules):
  variables, state_dicts = small_modules
  prefixed = {name: {f"module.{k}": v for k, v in sd.items()} for name, sd in state_dicts.items()}
  conversion = convert.convert_cvpr(prefixed)
  for name in variables:
    assert_trees_equal(conversion.variables[name], variables[name])
  assert conversion.meta["num_classes"] == 11 and conversion.meta["age_group"] == GROUPS
  assert conversion.report.converted["head"] == 1 and not conversion.report.unexpected


def test_problems_are_reported_by_name(small_modules):
  _, state_dicts = small_modules
  age = dict(state_dicts["age"])
  del age["age_output_layer.4.bias"]
  age["group_output_layer.weight"] = np.zeros((5, 101), np.float32)
  age["extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises(convert.ConversionError) as error:
    convert.convert_cvpr({"age": age}, num_groups=GROUPS, sources={"age": "est-9"})
  message = str(error.value)
  assert "missing: est-9: age_output_layer.4.bias" in message
  assert ("wrong shape: est-9: group_output_layer.weight has shape [5, 101], "
          "expected [7, 101]") in message
  assert "unexpected: est-9: extra.weight" in message
  # Unexpected keys can be tolerated; missing and misshaped ones cannot.
  with pytest.raises(convert.ConversionError) as error:
    convert.convert_cvpr({"age": age}, num_groups=GROUPS, allow_unexpected=True)
  assert "extra.weight" not in str(error.value) and "age_output_layer.4.bias" in str(error.value)


def test_unexpected_keys_tolerated_on_request(small_modules):
  _, state_dicts = small_modules
  head = dict(state_dicts["head"], bias=np.zeros(11, np.float32))
  conversion = convert.convert_cvpr({"head": head}, allow_unexpected=True)
  assert conversion.report.unexpected == ["head: bias"]
  assert "unexpected keys (1): head: bias" in conversion.report.summary()
  assert conversion.report.summary().endswith(
      "2 tensors read: 1 converted, 0 constant buffers checked, "
      "0 BatchNorm counters (num_batches_tracked) not needed; 1 skipped")


def _zeros_state_dict(spec):
  """A state_dict of zeros with the PyTorch shapes ``spec`` expects."""
  shapes = spec.flax_shapes()
  return {spec.prefix + e.torch_key: np.zeros(
      convert.expected_torch_shape(shapes[(e.collection, e.flax_path)], e.transform), np.float32)
          for e in spec.entries}


def test_generator_router_masks_are_checked():
  spec = convert.generator_spec(GROUPS)
  state_dict = _zeros_state_dict(spec)
  mask = icm.router_mask(GROUPS)
  for key in spec.constants:
    state_dict[key] = mask
  assert sorted(convert.convert_cvpr({"generator": state_dict}).variables) == ["generator"]
  # A router built with another sigma is a different model: refuse it by name.
  state_dict["transform.2.router1._unit_mapping"] = icm.router_mask(GROUPS, sigma=0.2)[:, :819]
  with pytest.raises(convert.ConversionError, match="transform.2.router1._unit_mapping"):
    convert.convert_cvpr({"generator": state_dict})


def test_tpami_requires_encoder_and_checks_expectation(small_modules):
  _, state_dicts = small_modules
  released = {f"age_estimator.{k}": v for k, v in state_dicts["age"].items()}
  released["age_estimator.expectation"] = np.arange(101, dtype=np.float32) + 1
  released["decoder.latent_avg"] = np.zeros((1, 1, 512), np.float32)
  released["encoder.aging2.router._unit_mapping"] = np.zeros((7, 400), np.float32)
  with pytest.raises(convert.ConversionError) as error:
    convert.convert_tpami(released, "released.pth")
  message = str(error.value)
  assert "missing: released.pth: encoder.input_layer.0.weight" in message
  assert "encoder.fsm.channel.0.weight" in message
  assert "unexpected value: released.pth: age_estimator.expectation" in message
  # Part of the ageing branch means all of it is expected: the rest is named.
  assert "missing: released.pth: decoder.decoder.noises.noise_10" in message
  assert "missing: released.pth: encoder.styles.11.linear.weight" in message
  assert "unexpected value: released.pth: encoder.aging2.router._unit_mapping" in message
  assert "decoder.latent_avg" not in message  # Present and of the right shape.


def test_infer_num_layers_and_groups():
  for depth in (34, 50, 64, 101):
    keys = {e.torch_key: None for e in tm.encoder_entries(depth)}
    assert convert.infer_num_layers(keys) == depth
  with pytest.raises(convert.ConversionError, match=r"units per stage \[3, 4, 5, 3\]"):
    convert.infer_num_layers({f"block{s}.{u}.x": None for s, n in zip((1, 2, 3, 4), (3, 4, 5, 3))
                              for u in range(n)})
  shaped = lambda *shape: np.zeros(shape)
  assert convert.infer_num_groups({"d": {"main.0.weight_orig": shaped(128, 69, 4, 4)}}) == 5
  assert convert.infer_num_groups({"a": {"group_output_layer.weight": shaped(8, 101)}}) == 8


def test_identify_cvpr_module(small_modules, tmp_path):
  _, state_dicts = small_modules
  assert convert.identify_cvpr_module(tmp_path / "da_discriminator-36000", {}) == "da_age"
  assert convert.identify_cvpr_module(tmp_path / "discriminator-36000.pth", {}) == "discriminator"
  assert convert.identify_cvpr_module(tmp_path / "x.pth", state_dicts["head"]) == "head"
  assert convert.identify_cvpr_module(tmp_path / "x.pth", state_dicts["age"]) == "age"
  with pytest.raises(convert.ConversionError, match="mystery.pth"):
    convert.identify_cvpr_module(tmp_path / "mystery.pth", {"foo": np.zeros(1)})


def test_saved_checkpoint_restores(small_modules, tmp_path):
  _, state_dicts = small_modules
  conversion = convert.convert_cvpr(state_dicts)
  output = convert.save_conversion(conversion, tmp_path / "converted")
  state, meta, _ = checkpoint_io.restore_state(output)
  assert_trees_equal(state["variables"], conversion.variables)
  assert checkpoint_io.read_meta(output)[0]["num_classes"] == 11 == meta["num_classes"]
  with pytest.raises(FileExistsError):
    convert.save_conversion(conversion, output)


def test_missing_file_and_bad_reader(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.pth"):
    convert.read_state_dict(tmp_path / "nope.pth")
  path = tmp_path / "garbage.pth"
  path.write_bytes(b"\x00not a pytorch file")
  with pytest.raises(convert.ConversionError, match="garbage.pth"):
    convert.read_state_dict(path, reader="zip")
  with pytest.raises(ValueError, match="reader"):
    convert.read_state_dict(path, reader="pickle")


# --- tests that need torch to write PyTorch files -----------------------------

@pytest.fixture(scope="module")
def torch_module():
  return pytest.importorskip("torch")


def test_readers_agree(torch_module, tmp_path):
  torch = torch_module
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  state = {
      "plain": torch.randn(3, 5),
      "transposed": base.t(),  # A strided view of a shared storage.
      "row": base[2],
      "half": torch.randn(4).half(),
      "bfloat": torch.randn(4).bfloat16(),
      "long": torch.arange(5),
      "scalar": torch.tensor(3),
      "flags": torch.tensor([True, False]),
  }
  state.update({f"bn.{k}": v for k, v in torch.nn.BatchNorm2d(3).state_dict().items()})
  path = tmp_path / "mixed.pth"
  torch.save(state, path)
  from_torch = convert.read_state_dict(path, reader="torch")
  from_zip = convert.read_state_dict(path, reader="zip")
  assert list(from_torch) == list(from_zip) == list(state)
  for key, value in state.items():
    expected = value.float().numpy() if value.is_floating_point() else value.numpy()
    np.testing.assert_array_equal(from_torch[key].astype(expected.dtype), expected, err_msg=key)
    np.testing.assert_array_equal(from_zip[key].astype(expected.dtype), expected, err_msg=key)


class _Payload:
  """Pickles to a call of os.system: what an untrusted checkpoint could do."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("reader", ["torch", "zip"])
def test_untrusted_pickle_is_refused_unexecuted(torch_module, tmp_path, reader):
  marker = tmp_path / "code_ran"
  path = tmp_path / "evil.pth"
  torch_module.save({"weight": torch_module.zeros(2), "payload": _Payload(marker)}, path)
  with pytest.raises(convert.ConversionError, match="evil.pth"):
    convert.read_state_dict(path, reader=reader)
  assert not marker.exists()


def test_cli_converts_and_reports(torch_module, tmp_path, capsys):
  torch = torch_module
  torch.manual_seed(0)
  head = torch.nn.Module()
  head.weight = torch.nn.Parameter(torch.randn(9, 512))
  torch.save(head.state_dict(), tmp_path / "head-100")
  age = {"module.age_output_layer.0.weight": torch.ones(512)}  # Incomplete, DDP-prefixed.
  torch.save(age, tmp_path / "estimation_network-100")
  output = tmp_path / "out"
  status = convert.main(["--layout", "cvpr", "--input", str(tmp_path / "head-100"),
                         "--input", str(tmp_path / "estimation_network-100"),
                         "--output", str(output)])
  assert status == 1
  error = capsys.readouterr().err
  assert "missing: " in error and "age_output_layer.2.weight" in error
  assert not output.exists()
  status = convert.main(["--layout", "cvpr", "--input", f"head={tmp_path / 'head-100'}",
                         "--output", str(output), "--reader", "zip"])
  assert status == 0
  assert "converted head: 1 tensors" in capsys.readouterr().out
  kernel = checkpoint_io.restore_state(output)[0]["variables"]["head"]["params"]["kernel"]
  np.testing.assert_array_equal(np.asarray(kernel), head.weight.detach().numpy().T)
