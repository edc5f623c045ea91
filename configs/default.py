"""The embedded demo: AIFR then FAS on the procedural ``synthetic_faces``.

On an accelerator this is the full IR-50 at 112x112 on 1,000 identities x 20
images. On a CPU (``make demo`` on a laptop or CI box) it switches to a reduced
model at 64x64 on fewer identities so the whole demo finishes in minutes;
``--config.model...`` overrides either.
"""

import jax

from configs import common


def get_config():
  c = common.get_config()
  c.data.name = "synthetic_faces"
  c.data.num_identities = 1_000
  c.data.images_per_identity = 20
  c.data.test_fraction = 0.1
  c.model.num_classes = 900  # the training identities of the split above
  c.batch_size = 256
  c.num_iter = 3_000
  c.optim.warmup = 300
  c.optim.milestone = (2_000, 2_600)
  c.fas_num_iter = 2_000
  c.log_every = 50
  c.checkpoint_every = 500
  c.image_every = 500
  if jax.default_backend() == "cpu":
    _reduce_for_cpu(c)
  return c


def _reduce_for_cpu(c):
  """A model and run that fit a 2-core CPU in minutes."""
  common.reduce_model_for_cpu(c)
  c.data.num_identities = 150
  c.data.images_per_identity = 16
  c.data.test_fraction = 0.2
  c.data.num_folds = 5
  c.data.pairs_per_fold = 60
  c.model.num_classes = 120
  c.batch_size = 32
  c.num_iter = 250
  c.optim.warmup = 25
  c.optim.milestone = (180, 230)
  c.fas_num_iter = 100
  c.log_every = 10
  c.checkpoint_every = 125
  c.image_every = 50
