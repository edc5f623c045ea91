"""ECAF's pair protocol in eval.py: 'img1 img2 1|-1' lists over an alignment folder."""

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image
import pytest

from mtlface_jax import synthetic
from mtlface_jax.evaluation import cli
from mtlface_jax.evaluation import datasets
from tests import test_eval_cli


def write_ecaf(root: Path, data: synthetic.SyntheticFaces, num_pairs: int = 20) -> list[str]:
  """A tiny ECAF layout: both alignment folders and one pair list of 1/-1 lines."""
  test = data.test
  names = []
  for k, image in enumerate(test.images):
    name = f"child{test.ids[k]}/{k}.jpg"
    for alignment in cli.ECAF_ALIGNMENTS:
      path = root / "image_data" / f"img_{alignment}" / name
      path.parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(image).save(path)
    names.append(name)
  lines = []
  for i in range(num_pairs):  # Alternating same/different: each 2-pair fold has both.
    a = i % len(names)
    same = [b for b in range(len(names)) if b != a and test.ids[b] == test.ids[a]]
    diff = [b for b in range(len(names)) if test.ids[b] != test.ids[a]]
    b = same[0] if i % 2 == 0 else diff[i % len(diff)]
    lines.append(f"{names[a]} {names[b]} {1 if i % 2 == 0 else -1}")
  (root / "image_pairs").mkdir(parents=True)
  (root / "image_pairs" / "pairs.txt").write_text("\n".join(lines) + "\n")
  return lines


@pytest.fixture(scope="module")
def data() -> synthetic.SyntheticFaces:
  return synthetic.make_dataset(8, 4, seed=0, test_fraction=0.5, num_folds=2,
                                pairs_per_fold=4)


def test_ecaf_lines_parse_as_generic_with_minus_one_different(data, tmp_path):
  lines = write_ecaf(tmp_path, data)
  path = tmp_path / "image_pairs" / "pairs.txt"
  assert datasets.guess_pair_format(path) == "generic"
  pairs, _ = datasets.load_pairs(path, "auto", str(tmp_path / "img"))
  assert [p.issame for p in pairs] == [line.endswith(" 1") for line in lines]
  assert pairs[0].path1 == str(tmp_path / "img" / lines[0].split()[0])
  folds = datasets.with_contiguous_folds(pairs, 10)
  assert [p.fold for p in folds] == list(np.repeat(np.arange(10), 2))


def test_missing_ecaf_layout_is_named(tmp_path):
  (tmp_path / "image_pairs").mkdir()
  with pytest.raises(FileNotFoundError, match="no image_pairs"):
    cli.ecaf_sources(tmp_path)
  (tmp_path / "image_pairs" / "p.txt").write_text("a b 1\n")
  with pytest.raises(FileNotFoundError, match="img_ffhq is not a folder"):
    cli.ecaf_sources(tmp_path, "ffhq")


def test_ecaf_ten_fold_verification_end_to_end(data, tmp_path):
  workdir = test_eval_cli.write_untrained_checkpoint(test_eval_cli.tiny_config(),
                                                     tmp_path / "run")
  root = tmp_path / "ECAF"
  write_ecaf(root, data)
  out = tmp_path / "out"
  status = cli.execute(test_eval_cli.options(workdir, out, "verification", ecaf=str(root),
                                             ecaf_alignment="ffhq"),
                       io.StringIO(), io.StringIO())
  assert status == 0
  written = json.loads((out / "report.json").read_text())
  result = written["verification"]["ecaf_pairs"]
  assert result["num_pairs"] == 20 and result["num_positive"] == 10
  assert len(result["fold_accuracies"]) == 10 and 0.0 <= result["accuracy_mean"] <= 1.0
  entry = written["datasets"]["ecaf_pairs"]
  assert entry["pair_format"] == "generic"
  assert entry["images_root"] == str(root / "image_data" / "img_ffhq")
