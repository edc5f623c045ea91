"""Held-out verification during training (``config.eval_every``, training/eval_hook.py)."""

import io
import json

import jax
import numpy as np
import pytest
from PIL import Image

from configs import tiny
from mtlface_jax import batch as batch_lib
from mtlface_jax import checkpoint_io
from mtlface_jax import data_sources
from mtlface_jax import predict
from mtlface_jax.evaluation import datasets
from mtlface_jax.evaluation import verification
from mtlface_jax.formats import binset
from mtlface_jax.formats import images as images_lib
from mtlface_jax.models import spec as spec_lib
from mtlface_jax.training import eval_hook
from mtlface_jax.training import loop
from mtlface_jax.training import sharding
from mtlface_jax.training import state as state_lib


def _with_test_pairs(config):
  """14 synthetic identities: 10 to train (tiny's classes), 4 held out in 2 folds."""
  data = config.data.synthetic_faces
  data.num_identities, data.test_fraction = 14, 0.3
  data.num_folds, data.pairs_per_fold = 2, 6
  return config


def test_eval_every_logs_heldout_accuracy_at_steps_2_and_4(tmp_path):
  config = _with_test_pairs(tiny.get_config())
  config.num_iter, config.checkpoint_every, config.eval_every = 4, 4, 2
  config.eval.synthetic, config.eval.batch_size = True, 8
  summary = loop.train(config, tmp_path, batches_fn=batch_lib.fake_batches)
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  evals = {r["step"]: r for r in records if "eval/synthetic/accuracy" in r}
  assert sorted(evals) == [2, 4]
  for record in evals.values():
    assert 0 <= record["eval/synthetic/accuracy"] <= 1
    assert record["eval/synthetic/accuracy_std"] >= 0
    assert 0 <= record["eval/synthetic/auc"] <= 1
  assert summary["last_eval"]["eval/synthetic/accuracy"] == evals[4]["eval/synthetic/accuracy"]
  assert (tmp_path / "tensorboard").is_dir()
  # The step-4 number is the 10-fold protocol on the step-4 checkpoint's encoder,
  # embedded here without the hook's batching, sharding or device copies.
  variables, _, _ = checkpoint_io.restore_variables(tmp_path, modules=("encoder", "age"))
  data = data_sources.synthetic_for(config)
  used = np.unique(data.pairs[:, :2])
  faces = np.stack([datasets.to_model_input(images_lib.resize_image(image, config.image_size))
                    for image in data.test.images[used]])
  models = spec_lib.build_from_config(config)
  embeddings = np.asarray(jax.jit(lambda v, x: predict.encode(models, v, x).embedding)(
      variables, faces))
  row = np.searchsorted(used, data.pairs[:, :2])
  expected = verification.evaluate_verification(
      data.pairs[:, 2].astype(bool), embeddings[row[:, 0]], embeddings[row[:, 1]],
      folds=data.pairs[:, 3])
  assert evals[4]["eval/synthetic/accuracy"] == pytest.approx(expected.accuracy_mean, abs=1e-6)
  assert evals[4]["eval/synthetic/auc"] == pytest.approx(expected.auc, abs=1e-4)


def _face_png(rng, size=24) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
  return buffer.getvalue()


def test_hook_scores_bin_sets_and_pair_lists(tmp_path):
  rng = np.random.default_rng(0)
  issame = [True, False] * 4  # 8 pairs: each of 2 contiguous folds has both kinds
  binset.write_bin(tmp_path / "agedb_30.bin", [_face_png(rng) for _ in range(16)], issame)
  lines = []
  for k, same in enumerate(issame):
    for side in (0, 1):
      (tmp_path / f"{k}_{side}.png").write_bytes(_face_png(rng))
    lines.append(f"{k}_0.png {k}_1.png {int(same)} {k // 4}")
  (tmp_path / "cacd.txt").write_text("\n".join(lines) + "\n")
  config = tiny.get_config()
  config.eval_every = 5
  config.eval.bins = (str(tmp_path / "agedb_30.bin"),)
  config.eval.pair_lists = (f"generic:{tmp_path / 'cacd.txt'}",)
  config.eval.images_root, config.eval.num_folds, config.eval.batch_size = str(tmp_path), 2, 4
  mesh = sharding.make_mesh(jax.devices()[:2])
  models = spec_lib.build_from_config(config)
  hook = eval_hook.from_config(config, models, mesh)
  assert [s.name for s in hook.sets] == ["agedb_30", "cacd"]
  # Multiples of eval_every, and the run's last step (tiny: num_iter 6).
  assert [hook.due(s) for s in (4, 5, 6, 7, 10)] == [False, True, True, False, True]
  variables = jax.jit(lambda rng: state_lib.init_variables(models, config, rng),
                      out_shardings=sharding.replicated(mesh))(jax.random.PRNGKey(0))
  scalars = hook(variables, 5)
  for name in ("agedb_30", "cacd"):
    assert 0 <= scalars[f"eval/{name}/accuracy"] <= 1 and 0 <= scalars[f"eval/{name}/auc"] <= 1
  assert scalars["eval/seconds"] > 0


def test_eval_config_errors_come_before_training(tmp_path):
  config = tiny.get_config()
  config.eval_every = 2
  with pytest.raises(ValueError, match="names no set"):
    loop.train(config, tmp_path / "none", batches_fn=batch_lib.fake_batches)
  config.eval.synthetic = True  # tiny renders no test split
  with pytest.raises(ValueError, match="no test pairs"):
    loop.train(config, tmp_path / "no_test", batches_fn=batch_lib.fake_batches)
  config.eval.synthetic, config.eval.bins = False, (str(tmp_path / "missing.bin"),)
  with pytest.raises(FileNotFoundError, match="missing.bin"):
    loop.train(config, tmp_path / "missing", batches_fn=batch_lib.fake_batches)
  assert not (tmp_path / "none" / "checkpoints").exists()
  # A FAS-only run keeps the encoder frozen: nothing to watch.
  config.train_fr, config.train_fas = False, True
  assert eval_hook.from_config(config, spec_lib.build_from_config(config), sharding.make_mesh()) is None
