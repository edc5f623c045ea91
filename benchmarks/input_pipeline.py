"""Decoded + augmented images/s of the input pipeline over an image folder.

Reads every ``*.jpg``/``*.png`` under ``--data_dir`` (LFW by default:
``../shared/data/lfw/images`` beside the repository; identities from the
folder names), runs the training pipeline (decode, resize to 112, random
flip, scale to [-1, 1], labels) and prints one JSON line::

  {"images_per_s": ..., "num_images": ..., "batch_size": ..., "cores": ...}

``--source synthetic`` measures the in-memory path over rendered faces
instead; ``--fake_jpegs N`` writes N 250x250 JPEGs of rendered faces to a
temporary folder first (for machines without LFW).

  python benchmarks/input_pipeline.py --num_batches 50
"""

import argparse
import json
import os
from pathlib import Path
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mtlface_jax import input_pipeline  # pylint: disable=g-import-not-at-top
from mtlface_jax import synthetic  # pylint: disable=g-import-not-at-top

_DEFAULT_DATA = (Path(__file__).resolve().parents[2] / "shared" / "data" / "lfw"
                 / "images")


def folder_records(data_dir: Path) -> list[tuple[str, int, float, int]]:
  """(path, id, -1, -1) for every image, identities from folder names."""
  paths = sorted(p for p in data_dir.rglob("*")
                 if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
  if not paths:
    raise FileNotFoundError(f"{data_dir}: no .jpg/.png images")
  people = sorted({p.parent.name for p in paths})
  names = {name: i for i, name in enumerate(people)}
  return [(str(p), names[p.parent.name], -1.0, -1) for p in paths]


def write_fake_jpegs(folder: Path, count: int, seed: int = 0) -> Path:
  """Writes ``count`` 250x250 JPEGs of rendered faces (LFW-sized)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  identities = synthetic.sample_identities(max(count // 10, 1), rng)
  ids = rng.integers(0, len(identities), count)
  faces = synthetic.render_faces(identities.take(ids),
                                 rng.integers(0, 81, count), rng)
  for i, (face, identity) in enumerate(zip(faces, ids)):
    person = folder / f"person_{identity:05d}"
    person.mkdir(parents=True, exist_ok=True)
    Image.fromarray(face).resize((250, 250), Image.BILINEAR).save(
        person / f"{i:06d}.jpg", quality=90)
  return folder


def measure(pipeline, num_batches: int, warmup: int) -> tuple[float, int]:
  """Seconds for ``num_batches`` batches after ``warmup`` batches."""
  iterator = iter(pipeline)
  for _ in range(warmup):
    next(iterator)
  start = time.perf_counter()
  count = 0
  for _ in range(num_batches):
    count += len(next(iterator)["image"])
  return time.perf_counter() - start, count


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data_dir", type=Path, default=_DEFAULT_DATA)
  parser.add_argument("--source", choices=("folder", "synthetic"),
                      default="folder")
  parser.add_argument("--fake_jpegs", type=int, default=0)
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--num_batches", type=int, default=40)
  parser.add_argument("--warmup", type=int, default=5)
  parser.add_argument("--fas_targets", action="store_true",
                      help="also load FAS targets (needs ages: synthetic)")
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    if args.source == "synthetic":
      data = synthetic.make_dataset(200, 20, seed=0, pairs_per_fold=50)
      source = input_pipeline.source_from_synthetic(data.train)
      data_dir = "synthetic (in memory)"
    else:
      data_dir = args.data_dir
      if args.fake_jpegs:
        data_dir = write_fake_jpegs(Path(tmp), args.fake_jpegs)
      source = input_pipeline.source_from_records(folder_records(data_dir))
    config = input_pipeline.PipelineConfig(
        global_batch_size=args.batch_size, fas_targets=args.fas_targets)
    pipeline = input_pipeline.InputPipeline(source, config, process_index=0,
                                            process_count=1)
    seconds, count = measure(pipeline, args.num_batches, args.warmup)
  result = {
      "images_per_s": round(count / seconds, 1), "num_images": count,
      "batch_size": args.batch_size, "cores": len(os.sched_getaffinity(0)),
      "seconds": round(seconds, 3), "warmup_batches": args.warmup,
      "source": args.source, "data_dir": str(data_dir),
      "dataset_size": len(source), "fas_targets": args.fas_targets,
      "note": "decode + resize to 112 + random flip + scale + labels",
  }
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
