"""Tests of the tf.data input pipeline (batch contract, order, bad input)."""

import io
from pathlib import Path

import numpy as np
from PIL import Image
import pytest

from mtlface_jax import ages as ages_lib
from mtlface_jax import input_pipeline as ip
from mtlface_jax import synthetic


@pytest.fixture(scope="module")
def faces():
  return synthetic.make_dataset(num_identities=24, images_per_identity=8,
                                seed=5, test_fraction=0.2, num_folds=2,
                                pairs_per_fold=5)


@pytest.fixture(scope="module")
def source(faces):
  return ip.source_from_synthetic(faces.train)


def _pipeline(source, start_step=0, num_steps=None, index=0, count=1, **kw):
  config = ip.PipelineConfig(**{"global_batch_size": 16, "seed": 3, **kw})
  return ip.InputPipeline(source, config, start_step=start_step,
                          num_steps=num_steps, process_index=index,
                          process_count=count)


def _take(pipeline, steps):
  iterator = iter(pipeline)
  return [next(iterator) for _ in range(steps)]


def _scale(images_uint8):
  return (images_uint8.astype(np.float32) / 255.0 - 0.5) / 0.5


def test_batch_contract(source, faces):
  batch = _take(_pipeline(source, fas_targets=True), 1)[0]
  expected = {"image": (np.float32, (16, 112, 112, 3)), "id": (np.int32, (16,)),
              "age": (np.float32, (16,)), "group": (np.int32, (16,)),
              "gender": (np.int32, (16,)), "index": (np.int32, (16,)),
              "target_group": (np.int32, (16,)),
              "target_image": (np.float32, (16, 112, 112, 3))}
  assert set(batch) == set(expected)
  for key, (dtype, shape) in expected.items():
    assert batch[key].dtype == dtype and batch[key].shape == shape, key
  assert batch["image"].min() >= -1 and batch["image"].max() <= 1
  index = batch["index"]
  np.testing.assert_array_equal(batch["id"], faces.train.ids[index])
  np.testing.assert_array_equal(batch["age"], faces.train.ages[index])
  np.testing.assert_array_equal(batch["group"],
                                ages_lib.age_to_group(faces.train.ages[index]))
  # Each image is its source image, maybe flipped, scaled to [-1, 1].
  for image, i in zip(batch["image"], index):
    source_image = _scale(faces.train.images[i])
    assert (np.array_equal(image, source_image)
            or np.array_equal(image, source_image[:, ::-1]))


def test_resize_to_config_image_size(source):
  batch = _take(_pipeline(source, image_size=32), 1)[0]
  assert batch["image"].shape == (16, 32, 32, 3)


def test_random_crops_are_in_bounds_resumable_and_change_images(source, faces):
  plain = _take(_pipeline(source), 2)
  cropped = _take(_pipeline(source, crop_scale=0.7), 2)
  resumed = _take(_pipeline(source, crop_scale=0.7, start_step=1), 1)[0]
  np.testing.assert_array_equal(cropped[1]["image"], resumed["image"])
  np.testing.assert_array_equal(cropped[0]["index"], plain[0]["index"])
  assert not np.array_equal(cropped[0]["image"], plain[0]["image"])
  boxes = _pipeline(source, crop_scale=0.7).plan_numpy(0)["crop_box"]
  sides = boxes[:, 2] - boxes[:, 0]
  np.testing.assert_allclose(sides, boxes[:, 3] - boxes[:, 1], atol=1e-6)
  assert (sides >= 0.7 - 1e-6).all() and (sides <= 1).all()
  assert (boxes >= 0).all() and (boxes <= 1 + 1e-6).all()
  # A whole-image box reproduces the image (up to bilinear rounding).
  whole = ip._crop_and_resize(faces.train.images[:2], np.array([[0, 0, 1, 1]] * 2, np.float32))
  np.testing.assert_allclose(np.asarray(whole, np.float32), faces.train.images[:2], atol=1)


def test_epoch_is_a_permutation_with_remainder_dropped(source):
  pipeline = _pipeline(source)
  steps = pipeline.steps_per_epoch
  assert steps == len(source) // 16
  epoch = np.concatenate([b["index"] for b in _take(pipeline, steps)])
  assert len(np.unique(epoch)) == steps * 16
  second = np.concatenate([b["index"] for b in _take(
      _pipeline(source, start_step=steps), steps)])
  assert not np.array_equal(epoch, second)  # A new permutation per epoch.


def test_resume_at_step_n_matches_uninterrupted_run(source):
  uninterrupted = _take(_pipeline(source, fas_targets=True), 9)
  resumed = _take(_pipeline(source, start_step=5, fas_targets=True), 4)
  for expected, got in zip(uninterrupted[5:], resumed):
    for key in expected:
      np.testing.assert_array_equal(expected[key], got[key], err_msg=key)
  # The iterator tracks the step to store in a checkpoint.
  pipeline = _pipeline(source, start_step=5)
  _take(pipeline, 3)
  assert pipeline.step == 8


def test_hosts_read_disjoint_slices_of_the_same_global_batch(source):
  whole = _take(_pipeline(source, fas_targets=True), 3)
  hosts = [_take(_pipeline(source, index=p, count=2, fas_targets=True), 3)
           for p in (0, 1)]
  for step in range(3):
    assert hosts[0][step]["image"].shape[0] == 8
    for key in whole[step]:
      np.testing.assert_array_equal(
          np.concatenate([hosts[0][step][key], hosts[1][step][key]]),
          whole[step][key], err_msg=key)
  with pytest.raises(ValueError, match="multiple"):
    _pipeline(source, count=3)


def test_fas_targets_belong_to_their_group(source):
  pipeline = _pipeline(source, fas_targets=True)
  seen_groups = []
  for step, batch in enumerate(_take(pipeline, 6)):
    target_index = pipeline.plan_numpy(step)["target_index"]
    np.testing.assert_array_equal(pipeline.groups[target_index],
                                  batch["target_group"])
    for image, i in zip(batch["target_image"], target_index):
      expected = _scale(source.images[i])
      assert (np.array_equal(image, expected)
              or np.array_equal(image, expected[:, ::-1]))
    seen_groups.extend(batch["target_group"])
  assert set(seen_groups) == set(range(7))  # Uniform over the 7 groups.


def _in_order(source, batch_size):
  """Every example once, in order, without flips; the last batch padded."""
  config = ip.PipelineConfig(global_batch_size=batch_size, train=False)
  return iter(ip.InputPipeline(source, config, process_index=0, process_count=1))


def test_eval_batches_cover_every_example_once(source):
  batches = list(_in_order(source, 40))
  assert len(batches) == -(-len(source) // 40)
  index = np.concatenate([b["index"][b["mask"]] for b in batches])
  np.testing.assert_array_equal(index, np.arange(len(source)))
  assert not batches[-1]["mask"].all()


def _write(path: Path, image: np.ndarray, fmt: str) -> str:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(image).save(path, format=fmt)
  return str(path)


@pytest.fixture()
def record_files(tmp_path, faces):
  """Six image files: JPEG/PNG, 112 and 250 pixels, RGB and grayscale."""
  images = faces.test.images
  files = [
      _write(tmp_path / "a" / "0.jpg", images[0], "JPEG"),
      _write(tmp_path / "a" / "1.png", images[1], "PNG"),
      _write(tmp_path / "b" / "2.jpg",
             np.asarray(Image.fromarray(images[2]).resize((250, 250))), "JPEG"),
      _write(tmp_path / "b" / "3.png", images[3][..., 0], "PNG"),  # Gray.
      _write(tmp_path / "c" / "4.jpg", images[4][..., 1], "JPEG"),  # Gray.
      _write(tmp_path / "c" / "5.png", images[5], "PNG"),
  ]
  return [(f, i % 3, 20.0 + i, i % 2) for i, f in enumerate(files)]


def _record_pipeline(records, **kw):
  source = ip.source_from_records(records)
  config = ip.PipelineConfig(global_batch_size=4, **kw)
  return ip.InputPipeline(source, config, process_index=0, process_count=1)


def test_record_files_decode_to_rgb_112(record_files, faces):
  batch = _take(_record_pipeline(record_files, flip=False), 1)[0]
  assert batch["image"].shape == (4, 112, 112, 3)
  for image, i in zip(batch["image"], batch["index"]):
    path = record_files[i][0]
    assert batch["age"][list(batch["index"]).index(i)] == 20.0 + i
    if path.endswith("1.png") or path.endswith("5.png"):  # Lossless 112 px.
      np.testing.assert_array_equal(image, _scale(faces.test.images[i]))
    if path.endswith("3.png"):  # Grayscale -> three equal channels.
      np.testing.assert_array_equal(image[..., 0], image[..., 2])


def test_skip_bad_examples_counts_a_corrupt_jpeg(tmp_path, record_files):
  corrupt = tmp_path / "corrupt.jpg"
  good = Path(record_files[0][0]).read_bytes()
  corrupt.write_bytes(good[:len(good) // 3])  # Truncated JPEG.
  records = record_files + [(str(corrupt), 9, 30.0, 1)]
  pipeline = _record_pipeline(records, skip_bad_examples=True)
  assert pipeline.report.num_skipped == 1 and pipeline.report.num_ok == 6
  location, reason = pipeline.report.skipped[0]
  assert location == str(corrupt) and "decode" in reason
  assert "corrupt.jpg" in pipeline.report.summary()
  indices = np.concatenate([b["index"] for b in _take(pipeline, 3)])
  assert indices.max() < 6 and len(pipeline.source) == 6


def test_bad_files_raise_errors_naming_them(tmp_path, record_files):
  missing = str(tmp_path / "nowhere" / "missing.jpg")
  with pytest.raises(ip.BadExampleError, match="missing.jpg: missing file"):
    _take(_record_pipeline(record_files[:3] + [(missing, 1, 5.0, 0)]), 1)
  garbage = tmp_path / "garbage.jpg"
  garbage.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
  with pytest.raises(ip.BadExampleError, match="garbage.jpg: cannot decode"):
    _take(_record_pipeline(record_files[:3] + [(str(garbage), 1, 5.0, 0)]), 1)


def test_invalid_labels_raise_or_are_counted(record_files):
  bad = record_files[:4] + [(record_files[4][0], 1, 140.0, 0)]
  with pytest.raises(ip.BadExampleError, match=r"4\.jpg: age must be"):
    ip.source_from_records(bad)
  source = ip.source_from_records(bad + [("x.jpg", 1, 3.0, 7)],
                                  skip_bad_examples=True)
  assert len(source) == 4 and source.report.num_skipped == 2


def test_unknown_labels_flow_through(record_files):
  records = [(path, -1, -1.0, -1) for path, *_ in record_files]
  batch = _take(_record_pipeline(records), 1)[0]
  assert (batch["id"] == -1).all() and (batch["age"] == -1).all()
  assert (batch["group"] == -1).all() and (batch["gender"] == -1).all()


def test_global_batch_on_a_device_mesh(source):
  import jax  # pylint: disable=g-import-not-at-top
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  sharding = jax.sharding.NamedSharding(mesh,
                                        jax.sharding.PartitionSpec("data"))
  from mtlface_jax.training import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  for batch in _take(_pipeline(source), 2):
    batch = sharding_lib.put_batch(batch, sharding)
    assert batch["image"].shape == (16, 112, 112, 3)
    assert batch["image"].sharding == sharding


def test_tfds_builder_and_source(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from data import synthetic_faces  # pylint: disable=g-import-not-at-top
  builder = tfds.builder("synthetic_faces/tiny", data_dir=str(tmp_path))
  builder.download_and_prepare()
  expected = synthetic.make_dataset(
      **builder.builder_config.make_kwargs())
  source = ip.source_from_tfds("synthetic_faces/tiny", "test",
                               data_dir=str(tmp_path), prepare=False)
  np.testing.assert_array_equal(source.ids, expected.test.ids)
  np.testing.assert_array_equal(source.ages, expected.test.ages)
  reloaded = tfds.builder("synthetic_faces/tiny", data_dir=str(tmp_path))
  np.testing.assert_array_equal(synthetic_faces.load_pairs(reloaded),
                                expected.pairs)
  batch = next(_in_order(source, 8))
  np.testing.assert_array_equal(  # PNG is lossless.
      batch["image"], _scale(expected.test.images[:8]))
