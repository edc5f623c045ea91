"""Real faces for ``configs/real_lfw_utkface.py``: LFW identities, UTKFace ages.

The splits (issue #8):
  * identities: every LFW person who appears in folds 1-5 of ``pairs.txt`` or
    in no pair at all. LFW's folds have disjoint people, so the people of
    folds 6-10 stay unseen and their pairs are the held-out verification set;
  * ages: UTKFace, split 80/20 by a fixed seed; identities unknown (-1);
  * LFW ages and genders are unknown (-1), so each loss sees only the labels
    that exist (``losses.py`` masks -1).

``prepare`` decodes the photographs once, brings them to 112x112 faces (the
fixed LFW crop for deep-funneled LFW, a plain resize for UTKFace's aligned
crops), and writes them as JPEG in insightface RecordIO shards whose headers
carry ``[id, age, gender]``, plus ``manifest.json`` (every face's name,
labels, split and place, and the LFW pairs). Each shard lies in its own
folder ``pNN/`` of at most ``max_piece_mb``, so the set travels to a remote
accelerator machine in pieces (the device tool carries 64 MiB a call). The
manifest is written last, so an interrupted ``prepare`` leaves nothing that
looks complete.

    python -m mtlface_jax.real_data --lfw=../shared/data/lfw \
        --utkface=../shared/data/utkface --out=real_shards
"""

import concurrent.futures
import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from mtlface_jax.formats import images as images_lib
from mtlface_jax.formats import lists
from mtlface_jax.formats import recordio
from mtlface_jax.formats import parse_report

MANIFEST = "manifest.json"
# 0-based labels of LFW's folds 6-10: never trained on, evaluated.
HELDOUT_FOLDS = (5, 6, 7, 8, 9)
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Face:
  """One face of the recipe.

  Attributes:
    name: stable name, ``lfw/<person>/<file>`` or ``utkface/<file>``.
    path: the source photograph.
    dataset: "lfw" or "utkface".
    split: "train" or "heldout".
    id: training identity (LFW training people), -1 unknown or held out.
    age: years, -1 unknown (LFW).
    gender: 1 male, 0 female, -1 unknown (LFW).
  """
  name: str
  path: str
  dataset: str
  split: str
  id: int = -1
  age: float = -1.0
  gender: int = -1


def _images_dir(root: str | os.PathLike) -> Path:
  """``root/images`` when it exists (the layout of ../shared/data), else root."""
  root = Path(root)
  return root / "images" if (root / "images").is_dir() else root


def _person(path: str) -> str:
  return Path(path).parent.name


def _lfw_name(path: str) -> str:
  return f"lfw/{_person(path)}/{Path(path).name}"


def heldout_people(pairs: Sequence[lists.FacePair]) -> set[str]:
  """People of the held-out folds; fails if one also appears in folds 1-5.

  Args:
    pairs: LFW pairs with their fold labels.

  Returns:
    The names of the people to keep out of training.

  Raises:
    ValueError: naming the people who appear in both, since training on them
      would leak into the held-out evaluation.
  """
  people = {True: set(), False: set()}
  for pair in pairs:
    people[pair.fold in HELDOUT_FOLDS].update((_person(pair.path1), _person(pair.path2)))
  both = sorted(people[True] & people[False])
  if both:
    raise ValueError(f"pairs.txt: {len(both)} people appear in folds 1-5 and 6-10 "
                     f"(e.g. {both[:5]}); LFW's folds should have disjoint people")
  return people[True]


def lfw_faces(lfw_dir: str | os.PathLike) -> tuple[list[Face], list[str], list[lists.FacePair]]:
  """Every LFW image with its split and training identity.

  Args:
    lfw_dir: folder with ``pairs.txt`` and the person folders (directly or
      under ``images/``).

  Returns:
    ``(faces, class_names, pairs)``: class ``k`` is ``class_names[k]``;
    ``pairs`` are all 10 folds of ``pairs.txt`` (paths into ``lfw_dir``).

  Raises:
    FileNotFoundError / ValueError: naming the file or pairs line at fault.
  """
  images = _images_dir(lfw_dir)
  pairs, _ = lists.parse_lfw_pairs(Path(lfw_dir) / "pairs.txt", images, check_files=True)
  held_out = heldout_people(pairs)
  people = sorted(p.name for p in images.iterdir() if p.is_dir())
  classes = [p for p in people if p not in held_out]
  class_of = {name: k for k, name in enumerate(classes)}
  faces = []
  for person in people:
    for path in lists.list_image_files(images / person):
      split = "heldout" if person in held_out else "train"
      faces.append(Face(_lfw_name(str(path)), str(path), "lfw", split, class_of.get(person, -1)))
  return faces, classes, pairs


def utkface_faces(utkface_dir: str | os.PathLike, seed: int = 0,
                  train_fraction: float = 0.8) -> tuple[list[Face], parse_report.ParseReport]:
  """Every UTKFace image with its age, gender and a seeded 80/20 split.

  Args:
    utkface_dir: folder of UTKFace crops (directly or under ``images/``).
    seed: the split's seed.
    train_fraction: share of the faces in the training split.

  Returns:
    ``(faces, report)``; malformed names are counted in the report, not used.
  """
  records, report = lists.parse_utkface_folder(_images_dir(utkface_dir), skip_bad_examples=True)
  order = np.random.default_rng(seed).permutation(len(records))
  is_train = np.zeros(len(records), bool)
  is_train[order[:int(round(train_fraction * len(records)))]] = True
  faces = [Face(f"utkface/{Path(r.path).name}", r.path, "utkface",
                "train" if is_train[i] else "heldout", -1, r.age, r.gender)
           for i, r in enumerate(records)]
  return faces, report


def _encode_face(face: Face, quality: int) -> bytes:
  """The 112x112 aligned face of ``face`` as JPEG (errors name the file)."""
  image = images_lib.load_image(face.path)
  return images_lib.encode_jpeg(images_lib.to_face(image, face.dataset == "lfw"), quality)


def _encoded_faces(faces: Sequence[Face], quality: int, workers: int):
  """Yields each face's JPEG in order, decoding on ``workers`` threads."""
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    yield from pool.map(lambda face: _encode_face(face, quality), faces, chunksize=64)


class _ShardWriter:
  """Appends records to ``pNN/shard-NN.rec`` files of at most ``max_bytes`` each."""

  def __init__(self, out_dir: Path, max_bytes: int):
    self.out_dir, self.max_bytes = out_dir, max_bytes
    self.shards: list[dict] = []
    self._writer, self._size = None, 0

  def add(self, record: bytes) -> tuple[int, int]:
    """Writes one record; returns ``(shard number, record index in it)``."""
    # RecordIO adds an 8-byte header and pads to 4 bytes; the .idx line is small.
    size = len(record) + 12
    if self._writer is None or (self._size + size > self.max_bytes and self.shards[-1]["records"]):
      self._open_next()
    index = self.shards[-1]["records"]
    self._writer.write(index, record)
    self.shards[-1]["records"] += 1
    self._size += size
    return len(self.shards) - 1, index

  def _open_next(self) -> None:
    self.close()
    number = len(self.shards)
    rec = Path(f"p{number:02d}") / f"shard-{number:02d}.rec"
    (self.out_dir / rec.parent).mkdir(parents=True, exist_ok=True)
    self._writer, self._size = recordio.RecordIOWriter(self.out_dir / rec), 0
    self.shards.append({"file": str(rec), "records": 0})

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None


def write_shards(faces: Sequence[Face], out_dir: str | os.PathLike, *,
                 max_piece_mb: float = 40.0, quality: int = 90, workers: int = 8,
                 progress: bool = True) -> tuple[list[dict], np.ndarray]:
  """Writes every face as a JPEG record with header labels ``[id, age, gender]``.

  Args:
    faces: the faces, in the order they are stored.
    out_dir: destination folder (shards go into ``pNN/`` subfolders).
    max_piece_mb: size limit of one shard (and so of one folder).
    quality: JPEG quality.
    workers: decoding threads.
    progress: show a progress bar.

  Returns:
    ``(shards, places)``: the shard files with their record counts, and
    int32 ``[N, 2]`` (shard, record index) of each face.
  """
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  writer = _ShardWriter(Path(out_dir), int(max_piece_mb * 2**20))
  places = np.zeros((len(faces), 2), np.int32)
  try:
    encoded = _encoded_faces(faces, quality, workers)
    for i, (face, jpeg) in enumerate(tqdm(zip(faces, encoded), total=len(faces),
                                          desc="writing shards", disable=not progress)):
      places[i] = writer.add(recordio.pack([face.id, face.age, face.gender], jpeg, i))
  finally:
    writer.close()
  return writer.shards, places


def prepare(lfw_dir: str | os.PathLike, utkface_dir: str | os.PathLike,
            out_dir: str | os.PathLike, *, seed: int = 0, train_fraction: float = 0.8,
            max_piece_mb: float = 40.0, quality: int = 90, workers: int = 8,
            progress: bool = True) -> dict:
  """Builds the recipe's shards and manifest from the LFW and UTKFace folders.

  Args:
    lfw_dir: LFW folder (``pairs.txt`` + person folders, maybe under ``images/``).
    utkface_dir: UTKFace folder.
    out_dir: destination; replaced atomically (built beside it, then renamed).
    seed: UTKFace split seed.
    train_fraction: UTKFace training share.
    max_piece_mb: size limit of each shard folder.
    quality: JPEG quality of the stored faces.
    workers: decoding threads.
    progress: show a progress bar.

  Returns:
    The manifest (also written to ``out_dir/manifest.json``).
  """
  lfw, classes, pairs = lfw_faces(lfw_dir)
  utk, utk_report = utkface_faces(utkface_dir, seed, train_fraction)
  faces = lfw + utk
  out_dir = Path(out_dir)
  partial = out_dir.with_name(out_dir.name + ".partial")
  shutil.rmtree(partial, ignore_errors=True)
  partial.mkdir(parents=True)
  shards, places = write_shards(faces, partial, max_piece_mb=max_piece_mb, quality=quality,
                                workers=workers, progress=progress)
  manifest = _manifest(faces, places, shards, classes, pairs,
                       {"lfw_dir": str(lfw_dir), "utkface_dir": str(utkface_dir), "seed": seed,
                        "train_fraction": train_fraction, "quality": quality,
                        "max_piece_mb": max_piece_mb},
                       utk_report)
  (partial / MANIFEST).write_text(json.dumps(manifest))
  shutil.rmtree(out_dir, ignore_errors=True)
  partial.rename(out_dir)
  return manifest


def _manifest(faces, places, shards, classes, pairs, options, utk_report) -> dict:
  """The JSON description of a shard set (columns of per-face values)."""
  name_of = {face.path: face.name for face in faces}
  columns = {key: [getattr(face, key) for face in faces]
             for key in ("name", "dataset", "split", "id", "age", "gender")}
  counts = {f"{d}_{s}": sum(f.dataset == d and f.split == s for f in faces)
            for d in ("lfw", "utkface") for s in ("train", "heldout")}
  return {
      "format_version": FORMAT_VERSION, "image_size": images_lib.FACE_SIZE, "options": options,
      "shards": shards, "classes": classes, "counts": counts,
      "faces": {**columns, "shard": places[:, 0].tolist(), "record": places[:, 1].tolist()},
      "lfw_pairs": {"name1": [name_of[p.path1] for p in pairs],
                    "name2": [name_of[p.path2] for p in pairs],
                    "issame": [bool(p.issame) for p in pairs], "fold": [p.fold for p in pairs]},
      "utkface_skipped": [{"entry": e, "reason": r} for e, r in utk_report.skipped],
  }


class ShardSet:
  """A prepared shard set: labels from the manifest, faces from the shards."""

  def __init__(self, root: str | os.PathLike):
    """Reads ``root/manifest.json`` (the shards are opened when first read).

    Raises:
      FileNotFoundError: if the set was never prepared (or not completely).
      ValueError: for a manifest of another format version.
    """
    self.root = Path(root)
    path = self.root / MANIFEST
    if not path.is_file():
      raise FileNotFoundError(
          f"{path} not found: build the shards with `python -m mtlface_jax.real_data "
          f"--out={self.root}` (or copy every pNN/ folder and manifest.json)")
    self.manifest = json.loads(path.read_text())
    if self.manifest.get("format_version") != FORMAT_VERSION:
      raise ValueError(f"{path}: format version {self.manifest.get('format_version')}, "
                       f"this code reads {FORMAT_VERSION}")
    faces = self.manifest["faces"]
    self.names = np.asarray(faces["name"], object)
    self.datasets, self.splits = np.asarray(faces["dataset"]), np.asarray(faces["split"])
    self.ids = np.asarray(faces["id"], np.int32)
    self.ages = np.asarray(faces["age"], np.float32)
    self.genders = np.asarray(faces["gender"], np.int32)
    self._places = np.stack([faces["shard"], faces["record"]], axis=1).astype(np.int64)
    self._readers: dict[int, recordio.RecordIOReader] = {}

  @property
  def num_classes(self) -> int:
    """Number of training identities (LFW people outside folds 6-10)."""
    return len(self.manifest["classes"])

  def __len__(self) -> int:
    return len(self.names)

  def select(self, dataset: Optional[str] = None, split: Optional[str] = None) -> np.ndarray:
    """Indices of the faces of ``dataset`` ("lfw"/"utkface") and ``split``."""
    keep = np.ones(len(self), bool)
    if dataset is not None:
      keep &= self.datasets == dataset
    if split is not None:
      keep &= self.splits == split
    return np.flatnonzero(keep)

  def _reader(self, shard: int) -> recordio.RecordIOReader:
    if shard not in self._readers:
      rec = self.root / self.manifest["shards"][shard]["file"]
      if not rec.is_file():
        raise FileNotFoundError(f"{rec} missing: the set needs every pNN/ folder of its manifest")
      self._readers[shard] = recordio.RecordIOReader(rec)
    return self._readers[shard]

  def encoded(self, indices: Sequence[int]) -> np.ndarray:
    """The JPEG bytes of the faces at ``indices`` (object array).

    Raises:
      ValueError: if a record's header labels disagree with the manifest
        (pieces of two different preparations mixed up).
    """
    out = np.empty(len(indices), object)
    for k, i in enumerate(indices):
      shard, record = self._places[i]
      header, payload = self._reader(int(shard)).read(int(record))
      expected = [self.ids[i], self.ages[i], self.genders[i]]
      if not np.allclose(header.labels, expected):
        raise ValueError(f"{self.names[i]} (shard {shard}, record {record}): labels "
                         f"{header.labels.tolist()} disagree with the manifest {expected}")
      out[k] = payload
    return out

  def images(self, indices: Sequence[int]) -> np.ndarray:
    """The decoded uint8 [N, 112, 112, 3] faces at ``indices``."""
    return np.stack([images_lib.decode_image_bytes(data, self.names[i])
                     for i, data in zip(indices, self.encoded(indices))])

  def heldout_pairs(self) -> dict[str, np.ndarray]:
    """LFW's pairs of folds 6-10 as face indices: index1, index2, issame, fold."""
    pairs = self.manifest["lfw_pairs"]
    row = {name: i for i, name in enumerate(self.names)}
    keep = np.isin(pairs["fold"], HELDOUT_FOLDS)
    pick = lambda key: np.asarray(pairs[key])[keep]
    return {"index1": np.array([row[n] for n in pick("name1")], np.int64),
            "index2": np.array([row[n] for n in pick("name2")], np.int64),
            "issame": pick("issame").astype(bool), "fold": pick("fold").astype(np.int64)}


def main(argv: Optional[Sequence[str]] = None) -> int:
  """``python -m mtlface_jax.real_data``: prepares the shards."""
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--lfw", default="../shared/data/lfw", help="LFW folder")
  parser.add_argument("--utkface", default="../shared/data/utkface", help="UTKFace folder")
  parser.add_argument("--out", default="real_shards", help="output folder")
  parser.add_argument("--seed", type=int, default=0, help="UTKFace split seed")
  parser.add_argument("--max_piece_mb", type=float, default=40.0, help="size of one pNN/ folder")
  parser.add_argument("--quality", type=int, default=90, help="JPEG quality")
  parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
  args = parser.parse_args(argv)
  manifest = prepare(args.lfw, args.utkface, args.out, seed=args.seed,
                     max_piece_mb=args.max_piece_mb, quality=args.quality, workers=args.workers)
  sizes = [os.path.getsize(Path(args.out) / s["file"]) for s in manifest["shards"]]
  print(json.dumps({"out": args.out, "counts": manifest["counts"],
                    "classes": len(manifest["classes"]), "shards": len(sizes),
                    "megabytes": round(sum(sizes) / 2**20, 1),
                    "utkface_skipped": manifest["utkface_skipped"]}, indent=2))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
