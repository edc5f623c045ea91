"""Selective fine-tuning (TPAMI) ablation: ``python -m mtlface_jax.recipes.selective``.

EVERY value under ``selective`` is OURS: the TPAMI paper publishes none of them
(docs/architecture.md T2, T4). The model, data and optimizer of the fine-tuning
runs are those of the ``--from`` workdir's AIFR run (read from its checkpoint
meta); only the keys below change them. The rest of this config is the demo's
(configs/default.py, its CPU variant on a CPU) and is not read by the recipe.
"""

import ml_collections

from configs import default


def get_config():
  c = default.get_config()
  s = ml_collections.ConfigDict()
  # Ours: the identity threshold is the frozen encoder's threshold at this FAR on
  # the held-out synthetic test pairs; a number in `tau` overrides it.
  s.far = 1e-3
  s.tau = ml_collections.FieldReference(None, field_type=float)
  # Ours: a short, constant, low learning rate (AIFR trains at 0.1).
  s.ft_lr = 0.01
  s.ft_num_iter = 50
  s.ft_warmup = 5
  # One fine-tuning run per seed per arm; ablation.json has their mean and std.
  s.ft_seeds = (0,)
  # Which arms run: no fine-tuning, plain (all synthesized faces), selective.
  s.arms = ("no_finetune", "plain_finetune", "selective_finetune")
  s.batch_size = 64  # Inference batch for synthesis, judging and evaluation.
  s.chunk = 256      # Source faces synthesized per pass (host memory bound).
  with c.unlocked():  # The recipe's own section, read by recipes/selective.py only.
    c.selective = s
  return c
