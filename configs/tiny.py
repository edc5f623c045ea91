"""A tiny model and dataset for tests: seconds per step on one CPU core."""

from configs import common


def get_config():
  c = common.get_config()
  c.dtype = "float32"
  c.num_iter = 6
  c.batch_size = 8
  c.image_size = 48  # the patch discriminator needs >= 48 pixels (1x1 scores)
  c.model.units = (1, 1, 1, 1)
  c.model.depths = (8, 8, 16, 16)
  c.model.num_classes = 10
  c.model.icm_unit_count = 8
  c.model.decoder_features = (16, 8, 8, 8)
  c.model.discriminator_features = (8, 8, 16, 16, 16)
  c.optim.warmup = 2
  c.optim.milestone = (4, 5)
  small_run(c)
  return c


def small_run(c):
  """The tests' data and bookkeeping (also ``configs/fas_tpami.py:tiny``).

  10 procedural identities x 8 faces, no test split; logs every step,
  checkpoints every 2.
  """
  c.data.name = "synthetic_faces"
  c.data.synthetic_faces.num_identities = 10
  c.data.synthetic_faces.images_per_identity = 8
  c.data.synthetic_faces.test_fraction = 0.0
  c.log_every = 1
  c.checkpoint_every = 2
  c.image_every = 0
  c.eval_every = 0  # held-out verification off: tests turn it on where they need it
