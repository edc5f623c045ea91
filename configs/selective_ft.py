"""Selective fine-tuning (TPAMI) ablation: ``python -m mtlface_jax.recipes.selective``.

EVERY value under ``selective`` is OURS: the TPAMI paper publishes none of them
(docs/architecture.md T2, T4). The model, data and optimizer of the fine-tuning
runs are those of the ``--from`` workdir's AIFR run (read from its checkpoint
meta); only the keys below change them. The rest of this config is the demo's
(configs/default.py) and is not read by the recipe.
"""

from configs import default


def get_config():
  c = default.get_config()
  # Every value of the `selective` section (declared in configs/common.py) is OURS.
  return c
