"""The prepared GPU procedure of the real-face recipe, dry-run on a CPU (issue 19).

``scripts/real_recipe_gpu.sh --dry-run`` cuts a subset from ``../shared/data``
(``scripts/mini_real_data.py``), builds its shards, trains the ``:cpu`` variant
for a few steps, evaluates, runs one extra ``eval.py`` command on the trained
checkpoint and leaves what the device call brings back in ``$OUT``.
"""

import json
import os
from pathlib import Path
import re
import subprocess
import sys
import tarfile

import pytest

from tests import conftest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
# What the device tool brings back: at most 8 files, names of letters, digits, '.', '_', '-'.
MAX_FILES = 8
NAME = re.compile(r"^[A-Za-z0-9._-]+$")
# configs/tiny.py's model: the test is about the script's plumbing, so the
# :cpu variant's model (minutes of compiling on CI) is not needed.
TINY_MODEL = ("--config.image_size=48 --config.model.units=(1,1,1,1) "
              "--config.model.depths=(8,8,16,16) --config.model.icm_unit_count=8 "
              "--config.model.decoder_features=(16,8,8,8) "
              "--config.model.discriminator_features=(8,8,16,16,16)")


def test_mini_real_data_keeps_fold_structure(tmp_path):
  if not (DATA / "lfw" / "pairs.txt").is_file():
    pytest.skip("../shared/data is not present")
  sys.path.insert(0, str(REPO / "scripts"))
  import mini_real_data  # pylint: disable=g-import-not-at-top
  counts = mini_real_data.main(["--lfw", str(DATA / "lfw"), "--utkface", str(DATA / "utkface"),
                                "--out", str(tmp_path), "--pairs_per_fold", "2",
                                "--utkface_count", "5"])
  lines = (tmp_path / "lfw" / "pairs.txt").read_text().splitlines()
  assert lines[0] == "10\t2" and len(lines) == 1 + 10 * 4
  linked = list((tmp_path / "lfw" / "images").rglob("*.jpg"))
  assert len(linked) == counts["lfw_images"] and all(p.resolve().is_file() for p in linked)
  assert counts["utkface_images"] == 5 == len(list((tmp_path / "utkface").iterdir()))


# The recipe's library path is tested in the default suite
# (test_real_data.py::test_recipe_end_to_end_on_a_tiny_model); this adds the
# script's shell plumbing for ~55 s of CI's 10 minutes.
@conftest.slow("the GPU script's CPU dry run (about a minute)")
def test_real_recipe_gpu_dry_run_brings_back_the_report(tmp_path):
  if not (DATA / "lfw" / "pairs.txt").is_file() or not (DATA / "utkface").is_dir():
    pytest.skip("../shared/data is not present")
  out, work = tmp_path / "out", tmp_path / "work"
  extra = ("--checkpoint={ckpt} --protocol=verification "
           f"--pairs={work}/mini/lfw/pairs.txt --lfw_crop --eval_folds=6,7,8,9,10 "
           "--output_dir={out} --progress=false")
  env = dict(os.environ, OUT=str(out), WORK=str(work), PYTHON=sys.executable,
             LFW_DIR=str(DATA / "lfw"), UTKFACE_DIR=str(DATA / "utkface"), EXTRA_EVAL=extra,
             RECIPE_ARGS=TINY_MODEL)
  proc = subprocess.run(["bash", str(REPO / "scripts" / "real_recipe_gpu.sh"), "--dry-run"],
                        env=env, capture_output=True, text=True, timeout=3000, check=False)
  log = (out / "recipe.log").read_text() if (out / "recipe.log").is_file() else proc.stdout
  assert proc.returncode == 0, log[-4000:]
  files = sorted(p.name for p in out.iterdir())
  assert all(p.is_file() for p in out.iterdir()) and len(files) <= MAX_FILES, files
  assert all(NAME.match(name) for name in files), files
  assert {"report.json", "report.txt", "roc.png", "metrics_aifr.jsonl", "metrics_fas.jsonl",
          "recipe.log", "extra_eval.tar.gz"} <= set(files)
  assert any(name.endswith(".png") and "grid" in name for name in files), files
  summary = json.loads((out / "report.json").read_text())["summary"]
  assert 0 <= summary["lfw_heldout_accuracy"] <= 1 and summary["utkface_heldout_mae"] >= 0
  lines = (out / "metrics_aifr.jsonl").read_text().splitlines()
  steps = [json.loads(line)["step"] for line in lines if line.startswith("{") and '"step"' in line]
  assert steps and max(steps) <= 3
  with tarfile.open(out / "extra_eval.tar.gz") as tar:
    names = tar.getnames()
  assert "extra_eval/1/command.txt" in names and "extra_eval/1/report.json" in names, names
