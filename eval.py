"""Evaluates an MTLFace checkpoint (training or converted PyTorch).

Protocols: face verification (LFW pairs.txt, insightface .bin sets, generic or
CACD-VS pair lists, synthetic test pairs), identification (gallery/probe,
leave-one-out on FG-NET-style folders), age estimation (UTKFace/FG-NET names,
SCAF lists) and face age synthesis (age accuracy, identity preservation,
progression grids). For example::

  python eval.py --checkpoint=runs/aifr --protocol=verification \\
      --pairs=../shared/data/lfw/pairs.txt --lfw_crop --output_dir=eval/lfw

Several protocols (``--protocol=verification,identification,age``) and sets
(repeat ``--pair_list``/``--bin``, ``name=path``) run in one call and share
embeddings. Writes report.json, report.txt (also printed), roc.png and FAS grid
PNGs into --output_dir; docs/evaluation.md has every flag and report field. ``python eval.py --help`` lists every flag; the library is
``mtlface_jax.evaluation`` (see ``mtlface_jax/evaluation/cli.py``).
"""

from absl import app
from absl import flags

from mtlface_jax.evaluation import cli

cli.define_flags()
flags.adopt_module_key_flags(cli)  # --helpshort lists the evaluation flags.

if __name__ == "__main__":
  app.run(cli.main)
