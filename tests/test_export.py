"""Inference bundles: export a tiny checkpoint, load it in a fresh process, compare.

XLA compiles slowly on the CPU test machine, so one tiny MTL checkpoint (with
a generator) is exported once per module, the in-process reference runs as
one jitted program, and the fresh process compiles each exported program once.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import tiny
from mtlface_jax import convert
from mtlface_jax import export
from mtlface_jax import checkpoint_io
from mtlface_jax import inference
from mtlface_jax import predict
from mtlface_jax.models import heads
from mtlface_jax.models import spec as spec_lib
from mtlface_jax.training import checkpoint
from mtlface_jax.training import optim
from mtlface_jax.training import state as state_lib

REPO = Path(__file__).resolve().parents[1]
GROUPS = np.array([0, 3, 6], np.int32)


def _random_variables(abstract: dict, seed: int = 0) -> dict:
  """Random values in trained-network ranges for every variable.

  Kernels get N(0, 1/fan_in); BatchNorm statistics, scales and PReLU slopes
  random values near their usual ones. Initial statistics (mean 0, variance
  1) would hide a loader that dropped ``batch_stats``; random ones do not.
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name, shape = getattr(path[-1], "key", ""), leaf.shape
    if name == "var":
      value = rng.uniform(0.5, 2.0, shape)
    elif name in ("scale", "slope"):
      value = rng.uniform(0.5, 1.5, shape) if name == "scale" else rng.uniform(0, 0.5, shape)
    elif len(shape) >= 2:
      value = rng.normal(0.0, 1.0 / np.sqrt(np.prod(shape[:-1])), shape)
    else:
      value = rng.normal(0.0, 0.2, shape)
    return value.astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny MTL checkpoint in the layout ``train.py`` writes.

  The training state (optimizer states included) is built abstractly with
  ``jax.eval_shape`` and filled with random values: compiling its
  initialisation, let alone a training step, takes minutes on this CPU.
  """
  config = tiny.get_config()
  config.train_fas = True
  models = spec_lib.build_from_config(config)
  txs = optim.optimizers_from_config(config)
  abstract = jax.eval_shape(lambda rng: state_lib.init_state(
      state_lib.init_variables(models, config, rng), config, *txs), jax.random.PRNGKey(0))
  zeros = lambda tree: jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), tree)
  variables = _random_variables(abstract.variables)
  state = zeros(abstract).replace(variables=variables)
  workdir = tmp_path_factory.mktemp("run")
  saver = checkpoint.Checkpointer(workdir / "checkpoints", async_save=False)
  try:
    # What ``loop.train`` saves after step 3.
    saver.save(3, state, {"step": 3, "data_position": 3, "task": "mtl",
                          "config": config.to_json()})
    saver.wait()
  finally:
    saver.close()
  assert sorted(abstract.opt_states) == ["d", "fr", "g"]
  return dict(config=config, models=models, variables=variables, workdir=workdir)


@pytest.fixture(scope="module")
def bundle(trained, tmp_path_factory):
  output = tmp_path_factory.mktemp("bundles") / "tiny"
  assert export.main(["--checkpoint", str(trained["workdir"]), "--output", str(output),
                      "--platforms", "cpu,cuda"]) == 0
  return output


@pytest.fixture(scope="module")
def reference(trained):
  """In-process outputs of the training modules on 3 faces (one compilation)."""
  models, variables = trained["models"], trained["variables"]
  size = trained["config"].image_size
  images = np.random.default_rng(1).uniform(-1, 1, (3, size, size, 3)).astype(np.float32)

  @jax.jit
  def run(variables, images, groups):
    encoding = predict.encode(models, variables, images)
    embed = lambda x: models.encoder.apply(variables["encoder"], x, train=False).embedding
    # Written out independently of encode: the mirror image is the width flip.
    by_hand = heads.l2_normalize(embed(images) + embed(images[:, :, ::-1, :]))
    aged = predict.synthesize(models, variables, images, groups)
    return encoding, by_hand, aged

  encoding, by_hand, aged = jax.device_get(run(variables, images, GROUPS))
  return dict(images=images, encoding=encoding, by_hand=by_hand, aged=aged)


def assert_close(got, expected, name, tolerance=1e-5):
  got, expected = np.asarray(got, np.float32), np.asarray(expected, np.float32)
  assert got.shape == expected.shape, f"{name}: {got.shape} != {expected.shape}"
  scale = max(float(np.abs(expected).max()), 1e-6)
  error = float(np.abs(got - expected).max()) / scale
  assert error < tolerance, f"{name}: max relative error {error:.2e}"


# The fresh process may import only the inference module (and what it needs).
FRESH_PROCESS = textwrap.dedent("""
    import sys
    import numpy as np
    from mtlface_jax import inference

    bundle, inputs, output = sys.argv[1:4]
    data = np.load(inputs)
    model = inference.load(bundle)
    encoding = model.encode(data["images"])
    np.savez(output, embedding=encoding.embedding, age=encoding.age,
             group_logits=encoding.group_logits, embed=model.embed(data["images"]),
             ages=model.age(data["images"]),
             aged=model.synthesize(data["images"][:2], data["groups"][:2]),
             image_size=model.image_size, num_groups=model.num_groups,
             embedding_size=model.embedding_size,
             imported=np.array(sorted(sys.modules), dtype=str))
""")


def test_fresh_process_round_trip(bundle, reference, tmp_path):
  images, encoding = reference["images"], reference["encoding"]
  extra = np.random.default_rng(2).uniform(-1, 1, (2,) + images.shape[1:]).astype(np.float32)
  # Batch sizes 5 and 2: neither is the reference's 3, and export saw none.
  np.savez(tmp_path / "inputs.npz", images=np.concatenate([images, extra]), groups=GROUPS)
  env = dict(os.environ, PYTHONPATH=str(REPO))
  result = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(bundle),
                           str(tmp_path / "inputs.npz"), str(tmp_path / "out.npz")],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  out = np.load(tmp_path / "out.npz")
  assert out["embedding"].shape == (5, 512) and out["aged"].shape == (2, 48, 48, 3)
  assert_close(out["embedding"][:3], encoding.embedding, "embedding")
  assert_close(out["age"][:3], encoding.age, "age")
  assert_close(out["group_logits"][:3], encoding.group_logits, "group_logits")
  assert_close(out["aged"], reference["aged"][:2], "synthesised image")
  # The residual alone, so that the generator cannot hide behind the input.
  assert_close(out["aged"] - images[:2], reference["aged"][:2] - images[:2], "residual")
  np.testing.assert_array_equal(out["embed"], out["embedding"])
  np.testing.assert_array_equal(out["ages"], out["age"])
  np.testing.assert_allclose(np.linalg.norm(out["embedding"], axis=1), 1.0, rtol=1e-5)
  assert (int(out["image_size"]), int(out["num_groups"]), int(out["embedding_size"])) == (
      48, 7, 512)
  imported = set(out["imported"].tolist())
  assert not {m for m in imported if m.split(".")[0] == "flax" or m.startswith(
      ("mtlface_jax.models", "mtlface_jax.training"))}, "the loader imported model code"


def test_encode_is_flip_averaged(reference):
  encoding = reference["encoding"]
  assert_close(encoding.embedding, reference["by_hand"], "flip-averaged embedding")
  np.testing.assert_allclose(np.linalg.norm(encoding.embedding, axis=1), 1.0, rtol=1e-5)
  assert encoding.age.shape == (3,) and np.all((encoding.age >= 0) & (encoding.age <= 100))
  assert encoding.group_logits.shape == (3, 7)


def test_bundle_holds_inference_variables_only(bundle, trained):
  manifest = json.loads((bundle / inference.MANIFEST_FILE).read_text())
  assert manifest["format"] == inference.BUNDLE_FORMAT and manifest["dtype"] == "float32"
  assert manifest["platforms"] == ["cpu", "cuda"] and sorted(manifest["functions"]) == [
      "encode", "synthesize"]
  assert manifest["source"]["kind"] == "training" and manifest["source"]["step"] == 3
  assert json.loads((bundle / inference.CONFIG_FILE).read_text()) == json.loads(
      trained["config"].to_json())
  state, _, _ = checkpoint_io.restore_state(bundle / inference.VARIABLES_DIR)
  assert sorted(state) == ["variables"]  # No optimizer states.
  assert sorted(state["variables"]) == ["age", "encoder", "generator"]
  for path, value in jax.tree_util.tree_leaves_with_path(state["variables"]):
    expected = trained["variables"]
    for key in path:
      expected = expected[key.key]
    np.testing.assert_array_equal(np.asarray(value), expected, err_msg=str(path))
  program = jax.export.deserialize(bytearray((bundle / inference.ENCODE_FILE).read_bytes()))
  assert str(program.in_avals[-1].shape[0]) == "b"  # The images' symbolic batch.
  assert program.platforms == ("cpu", "cuda")


def test_reexport_from_bundle_in_bfloat16(bundle, tmp_path):
  manifest = export.export_bundle(bundle / inference.VARIABLES_DIR, tmp_path / "bf16",
                                  dtype="bfloat16", platforms=("cpu",))
  original = json.loads((bundle / inference.MANIFEST_FILE).read_text())
  assert manifest["dtype"] == "bfloat16" and manifest["source"]["kind"] == "bundle"
  assert manifest["model"] == original["model"]
  program = jax.export.deserialize(
      bytearray((tmp_path / "bf16" / inference.ENCODE_FILE).read_bytes()))
  assert "bf16" in program.mlir_module()


def test_load_errors(bundle, tmp_path):
  with pytest.raises(FileNotFoundError, match="no inference bundle at .*nowhere"):
    inference.load(tmp_path / "nowhere")
  copy = tmp_path / "copy"
  shutil.copytree(bundle, copy)
  (copy / inference.ENCODE_FILE).write_bytes(b"\x00garbage")
  with pytest.raises(inference.BundleError, match="encode.jaxexport"):
    inference.load(copy)
  (copy / inference.ENCODE_FILE).unlink()
  with pytest.raises(inference.BundleError, match="missing exported program"):
    inference.load(copy)
  (copy / inference.MANIFEST_FILE).write_text(json.dumps({"format": "other", "version": 1}))
  with pytest.raises(inference.BundleError, match="not a version-1"):
    inference.load(copy)
  (copy / inference.MANIFEST_FILE).write_text("{truncated")
  with pytest.raises(inference.BundleError, match="bundle.json"):
    inference.load(copy)


def test_bad_inputs_are_refused_before_running(bundle, tmp_path):
  model = inference.load(bundle)
  faces = np.zeros((2, 48, 48, 3), np.float32)
  with pytest.raises(ValueError, match=r"\[B, 48, 48, 3\].*got shape \(2, 32, 32, 3\)"):
    model.embed(np.zeros((2, 32, 32, 3)))
  with pytest.raises(ValueError, match=r"images\[None\]"):
    model.age(faces[0])
  with pytest.raises(ValueError, match="empty batch"):
    model.encode(faces[:0])
  with pytest.raises(ValueError, match=r"in \[0, 7\)"):
    model.synthesize(faces, [0, 7])
  with pytest.raises(ValueError, match="integers"):
    model.synthesize(faces, [0.5, 1.0])
  with pytest.raises(ValueError, match=r"shape \[2\]"):
    model.synthesize(faces, [1, 2, 3])
  # A bundle without a generator says so.
  copy = tmp_path / "no_generator"
  shutil.copytree(bundle, copy)
  manifest = json.loads((copy / inference.MANIFEST_FILE).read_text())
  del manifest["functions"]["synthesize"]
  (copy / inference.MANIFEST_FILE).write_text(json.dumps(manifest))
  model = inference.load(copy)
  assert not model.has_generator
  with pytest.raises(ValueError, match="has no generator"):
    model.synthesize(faces, 0)


def test_export_errors(trained, bundle, tmp_path, capsys):
  with pytest.raises(FileExistsError):
    export.export_bundle(trained["workdir"], bundle)
  with pytest.raises(FileNotFoundError, match="missing_run"):
    export.export_bundle(tmp_path / "missing_run", tmp_path / "out")
  with pytest.raises(ValueError, match="platforms"):
    export.export_bundle(trained["workdir"], tmp_path / "out", platforms=("gpu",))
  assert export.main(["--checkpoint", str(tmp_path / "missing_run"),
                      "--output", str(tmp_path / "out")]) == 1
  assert "missing_run" in capsys.readouterr().err
  assert not (tmp_path / "out").exists()
  # An AIFR-only checkpoint without the age estimator cannot be exported.
  saver = checkpoint.Checkpointer(tmp_path / "encoder_only", async_save=False)
  try:
    saver.save(0, {"variables": {"encoder": trained["variables"]["encoder"]}},
               {"config": trained["config"].to_json()})
  finally:
    saver.close()
  with pytest.raises(export.ExportError, match="no age variables"):
    export.export_bundle(tmp_path / "encoder_only", tmp_path / "out")
  # Variables that do not fit the described model are named, not mis-run.
  variables, spec, _ = export.read_checkpoint(trained["workdir"])
  spec = dataclasses.replace(spec, encoder={**spec.encoder, "depths": [8, 8, 16, 32]})
  with pytest.raises(export.ExportError, match="block4_0/conv1"):
    export.export_programs(spec_lib.build(spec), variables, 48, ("cpu",))


def test_model_spec_of_converted_checkpoints():
  tpami = {"converted_from": "pytorch", "layout": "tpami", "age_group": 7, "num_layers": 50,
           "attention_version": 2, "dropout_rate": 0.4, "normalize_embedding": True}
  spec = export.model_spec(tpami, ["age", "encoder"])
  assert spec.image_size == 112 and spec.generator is None
  models = spec_lib.build(spec)
  released = convert.encoder_spec(50, released=True).module
  for field in ("num_layers", "attention_version", "dropout_rate", "normalize_embedding",
                "units", "depths"):
    assert getattr(models.encoder, field) == getattr(released, field), field
  assert models.generator is None
  cvpr = dict(tpami, layout="cvpr", attention_version=1, dropout_rate=0.5,
              normalize_embedding=False)
  models = spec_lib.build(export.model_spec(cvpr, ["age", "encoder", "generator"]))
  assert models.generator == convert.generator_spec(7).module
  with pytest.raises(export.ExportError, match="cannot tell which model"):
    export.model_spec({"step": 3}, ["encoder"])


def test_eval_cli_recipe_and_bundle_agree_on_ages(trained, bundle, tmp_path):
  """One encoder for every consumer: eval.py's age protocol, the recipes' held-out
  evaluation and an exported bundle give the same ages for one checkpoint."""
  from mtlface_jax import synthetic  # pylint: disable=g-import-not-at-top
  from mtlface_jax.evaluation import cli  # pylint: disable=g-import-not-at-top
  from mtlface_jax.evaluation import datasets  # pylint: disable=g-import-not-at-top
  from mtlface_jax.evaluation import runner  # pylint: disable=g-import-not-at-top
  from mtlface_jax.recipes import heldout  # pylint: disable=g-import-not-at-top
  flags = {"synthetic_identities": 12, "synthetic_images_per_identity": 4,
           "synthetic_test_fraction": 0.5, "synthetic_num_folds": 2,
           "synthetic_pairs_per_fold": 2}
  data = synthetic.make_dataset(12, 4, seed=0, test_fraction=0.5, num_folds=2,
                                pairs_per_fold=2)
  workdir = str(trained["workdir"])
  from_cli = cli.run(cli.EvalOptions(checkpoint=workdir, protocol="age", synthetic=True,
                                     output_dir=str(tmp_path / "cli"), batch_size=8,
                                     progress=False, **flags))
  from_recipe = heldout.evaluate_synthetic(workdir, data=data, output_dir=tmp_path / "recipe",
                                           batch_size=8, num_fas_inputs=0)
  faces = np.stack(list(datasets.array_faces(data.test.images, 48)))
  bundle_ages = inference.load(bundle).age(faces)
  in_process = runner.ModelRunner(predict.load(workdir), batch_size=8, progress=False)
  np.testing.assert_allclose(in_process.estimate_ages(faces)["age"], bundle_ages, atol=1e-5)
  bundle_mae = float(np.mean(np.abs(bundle_ages - data.test.ages)))
  assert from_cli["age"]["synthetic_test"].mae == pytest.approx(bundle_mae, abs=1e-5)
  assert from_recipe["summary"]["age_mae"] == pytest.approx(bundle_mae, abs=1e-5)
