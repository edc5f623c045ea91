"""A small LFW + UTKFace folder pair cut from the real ones, for dry runs.

``scripts/real_recipe_gpu.sh --dry-run`` runs the whole real-face procedure on
a CPU in minutes: this makes its data. The LFW part keeps the first
``pairs_per_fold`` matched and mismatched pairs of every fold of ``pairs.txt``
(so folds 1-5 still train and 6-10 are still held out, with disjoint people)
and links only the images those pairs name; the UTKFace part links the first
``utkface`` well-formed crops. Files are symbolic links into the originals::

  python scripts/mini_real_data.py --lfw ../shared/data/lfw \
      --utkface ../shared/data/utkface --out /tmp/mini --pairs_per_fold 3
"""

import argparse
from pathlib import Path
import re
from typing import Optional, Sequence

UTKFACE_NAME = re.compile(r"^\d+_\d_\d_\d+\.jpg\.chip\.jpg$")


def _images_dir(root: Path) -> Path:
  return root / "images" if (root / "images").is_dir() else root


def _link(source: Path, target: Path) -> None:
  target.parent.mkdir(parents=True, exist_ok=True)
  if not target.exists():
    target.symlink_to(source.resolve())


def mini_lfw(lfw: Path, out: Path, pairs_per_fold: int) -> int:
  """Writes ``out/pairs.txt`` and ``out/images/``; returns the number of images linked.

  Args:
    lfw: the LFW folder (``pairs.txt`` and person folders, maybe under ``images/``).
    out: destination folder.
    pairs_per_fold: matched (and as many mismatched) pairs kept per fold.
  """
  lines = (lfw / "pairs.txt").read_text().split("\n")
  folds, per_fold = (int(v) for v in lines[0].split())
  if pairs_per_fold > per_fold:
    raise ValueError(f"pairs.txt has {per_fold} pairs of each kind per fold, "
                     f"asked for {pairs_per_fold}")
  kept, images = [], set()
  for fold in range(folds):
    start = 1 + fold * 2 * per_fold
    matched = lines[start:start + pairs_per_fold]
    mismatched = lines[start + per_fold:start + per_fold + pairs_per_fold]
    kept += matched + mismatched
    for line in matched:
      name, a, b = line.split()
      images.update({(name, int(a)), (name, int(b))})
    for line in mismatched:
      name1, a, name2, b = line.split()
      images.update({(name1, int(a)), (name2, int(b))})
  (out / "images").mkdir(parents=True, exist_ok=True)
  (out / "pairs.txt").write_text("\n".join([f"{folds}\t{pairs_per_fold}", *kept]) + "\n")
  source = _images_dir(lfw)
  for name, number in sorted(images):
    file = f"{name}_{number:04d}.jpg"
    _link(source / name / file, out / "images" / name / file)
  return len(images)


def mini_utkface(utkface: Path, out: Path, count: int) -> int:
  """Links the first ``count`` well-formed UTKFace crops (sorted by name) into ``out``."""
  names = sorted(p.name for p in _images_dir(utkface).iterdir() if UTKFACE_NAME.match(p.name))
  for name in names[:count]:
    _link(_images_dir(utkface) / name, out / name)
  return min(count, len(names))


def main(argv: Optional[Sequence[str]] = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--lfw", default="../shared/data/lfw")
  parser.add_argument("--utkface", default="../shared/data/utkface")
  parser.add_argument("--out", required=True, help="gets lfw/ and utkface/")
  parser.add_argument("--pairs_per_fold", type=int, default=3)
  parser.add_argument("--utkface_count", type=int, default=60)
  args = parser.parse_args(argv)
  out = Path(args.out)
  counts = {"lfw_images": mini_lfw(Path(args.lfw), out / "lfw", args.pairs_per_fold),
            "utkface_images": mini_utkface(Path(args.utkface), out / "utkface",
                                           args.utkface_count)}
  print(counts)
  return counts


if __name__ == "__main__":
  main()
