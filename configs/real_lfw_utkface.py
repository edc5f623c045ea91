"""AIFR then FAS from scratch on real faces: LFW identities, UTKFace ages.

The recipe of issue #8 (``python -m mtlface_jax.recipes.lfw_utkface``, README "Real
faces"): identities are the LFW people outside folds 6-10 of ``pairs.txt``
(3,554 people, 6,922 images), ages come from 80% of UTKFace (7,822 images),
each loss sees only the labels that exist. Held out: LFW folds 6-10 (people
never seen), 20% of UTKFace.

``get_config()`` is the accelerator recipe: the full IR-50 at 112x112, sized
to finish within 20 minutes on one H100. ``get_config("cpu")``
(``--config=configs/real_lfw_utkface.py:cpu``) is a reduced model at 64x64
that shows the same recipe learning on a 2-core CPU in under an hour.
"""

from configs import common

# LFW people outside folds 6-10 of pairs.txt (checked against the shards).
NUM_LFW_TRAIN_PEOPLE = 3_554


def get_config(variant: str = ""):
  """The recipe config; ``variant`` "cpu" gives the reduced CPU run."""
  c = common.get_config()
  c.data.name = "face_shards"
  c.data.face_shards.dir = "real_shards"
  c.data.face_shards.lfw_dir = "../shared/data/lfw"
  c.data.face_shards.utkface_dir = "../shared/data/utkface"
  c.data.face_shards.split_seed = 0
  c.data.face_shards.utkface_train_fraction = 0.8
  # 6,922 LFW images of 3,554 people is tiny for face recognition: random
  # scale/shift crops on top of the flips fight overfitting.
  c.data.crop_scale = 0.8
  c.model.num_classes = NUM_LFW_TRAIN_PEOPLE
  c.batch_size = 256
  c.num_iter = 5_000
  c.optim.warmup = 500
  c.optim.milestone = (3_000, 4_200)
  c.fas_num_iter = 1_500
  c.log_every = 50
  c.checkpoint_every = 1_000
  c.image_every = 500
  if variant == "cpu":
    _reduce_for_cpu(c)
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; use '' or 'cpu'")
  return c


def _reduce_for_cpu(c):
  """A smaller model at 64x64 that a 2-core CPU trains in tens of minutes."""
  common.reduce_model_for_cpu(c, depths=(32, 64, 128, 256))
  c.batch_size = 64
  # 0.1 (with 0.01 age loss weight) blew up the age estimator's loss and the
  # gradient norm (x40) within 175 steps at this batch size.
  c.optim.lr = 0.05
  c.num_iter = 1_000
  c.optim.warmup = 100
  c.optim.milestone = (650, 850)
  c.fas_num_iter = 100
  c.log_every = 25
  c.checkpoint_every = 250
  c.image_every = 0
  # Selective fine-tuning (--selective; docs/selective_finetuning.md), OURS like
  # every `selective` value: AIFR ends here at lr 0.05 * 0.1**2, so the
  # fine-tuning rate is the one after the first milestone (the default 0.01 is
  # 20x the final rate); 150 steps of 64 are ~0.65 of an epoch of the 14,744
  # real faces; three seeds because arms differ by less than one seed's spread
  # on the procedural faces.
  c.selective.ft_lr = 0.005
  c.selective.ft_num_iter = 150
  c.selective.ft_warmup = 15
  c.selective.ft_seeds = (0, 1, 2)
