"""The embedded demo: AIFR then FAS on the procedural ``synthetic_faces``.

``get_config()`` (``--config=configs/default.py``) is the accelerator run: the
full IR-50 at 112x112 on 1,000 identities x 20 images.
``get_config("cpu")`` (``--config=configs/default.py:cpu``, what ``make demo``
runs) is a reduced model at 64x64 on fewer identities, so the whole demo
finishes in minutes on a 2-core CPU. ``--config.model...`` overrides either.

Both watch held-out verification on the synthetic test pairs while AIFR
trains (``eval_every``; TensorBoard ``eval/synthetic/*`` and metrics.jsonl).
"""

from configs import common


def get_config(variant: str = ""):
  """The demo config; ``variant`` "cpu" gives the reduced CPU run."""
  c = common.get_config()
  c.data.name = "synthetic_faces"
  c.data.synthetic_faces.num_identities = 1_000
  c.data.synthetic_faces.images_per_identity = 20
  c.data.synthetic_faces.test_fraction = 0.1
  c.model.num_classes = 900  # the training identities of the split above
  c.batch_size = 256
  c.num_iter = 3_000
  c.optim.warmup = 300
  c.optim.milestone = (2_000, 2_600)
  c.fas_num_iter = 2_000
  c.log_every = 50
  c.checkpoint_every = 500
  c.image_every = 500
  c.eval_every = 500
  c.eval.synthetic = True
  c.eval.batch_size = 256
  if variant == "cpu":
    _reduce_for_cpu(c)
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; use '' or 'cpu'")
  return c


def _reduce_for_cpu(c):
  """A model and run that fit a 2-core CPU in minutes."""
  common.reduce_model_for_cpu(c)
  data = c.data.synthetic_faces
  data.num_identities = 150
  data.images_per_identity = 16
  data.test_fraction = 0.2
  data.num_folds = 5
  data.pairs_per_fold = 60
  c.model.num_classes = 120
  c.batch_size = 32
  c.num_iter = 250
  c.optim.warmup = 25
  c.optim.milestone = (180, 230)
  c.fas_num_iter = 100
  c.log_every = 10
  c.checkpoint_every = 125
  c.image_every = 50
  c.eval_every = 50
  c.eval.batch_size = 64
