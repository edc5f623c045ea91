"""TPAMI face age synthesis: train the style path + StyleGAN2 decoder (issue 15, item 1).

The released TPAMI model ships no training code and no objective
(docs/architecture.md T1.7), so everything below that is not an architecture
field is OURS: the objective is the CVPR FAS objective of section 9 (LSGAN
against the age-conditioned spectral-norm patch discriminator at 112 px,
identity MSE on the frozen encoder's x_id, age cross-entropy from the frozen
estimator; the reference's key names and 75 / 0.002 / 10 reused) plus two
pSp-style terms of ours: reconstruction when the target group is the face's
own group, and a regulariser pulling the latents toward ``latent_avg``. The
encoder trunk and the age estimator are frozen; only the generator's
``params`` are trained (its ``buffers``, noise maps and ``latent_avg``, stay).

  python train.py --config=configs/fas_tpami.py --workdir=runs/fas_tpami \\
      --config.init_from=<converted release dir, e.g. ckpt/tpami>
  python train.py --config=configs/fas_tpami.py:tiny --workdir=/tmp/tpami_tiny

``:tiny`` is a reduced-width model at 112 px (the TPAMI generator is defined on
112 px faces) on the procedural faces, for tests and CPU smoke runs.

``:demo_aifr`` then ``:demo`` are the CPU demo of the TPAMI family on the
procedural faces (README "The TPAMI decoder trained here"):
AIFR of a TPAMI encoder (attention v2; CVPR-family encoders do not transfer,
their channel attention is half as wide), then this FAS from it, scored with
``tools/fas_truth_eval.py``::

  python train.py --config=configs/fas_tpami.py:demo_aifr --workdir=runs/tpami_demo/aifr
  python train.py --config=configs/fas_tpami.py:demo --workdir=runs/tpami_demo/fas \
      --config.init_from=runs/tpami_demo/aifr
  PYTHONPATH=. python tools/fas_truth_eval.py --workdir=runs/tpami_demo/fas
"""

from configs import common
from configs import default
from configs import tiny

# Sized on the 2-core CPU: AIFR 4 min, FAS 16 min (half of it the step's compile), the
# truth evaluation 1.5 min at load ~8 (README "The TPAMI decoder trained here").
DEMO_AIFR_STEPS = 250
DEMO_FAS_STEPS = 200


def get_config(variant: str = ""):
  """The TPAMI FAS config; ``variant`` "tiny" gives the reduced CPU model."""
  # The demo starts from configs/default.py:cpu (its data, AIFR schedule and FAS departures).
  c = default.get_config("cpu") if variant.startswith("demo") else common.get_config()
  c.train_fr = False
  c.train_fas = True
  c.model.family = "tpami"
  c.model.dropout_rate = 0.4  # the released TPAMI encoder's (frozen, so inert here)
  # TPAMIGenerator fields: configs/common.py's defaults are the released model's.
  # Ours (T1.7), declared in configs/common.py: fas_tpami_rec_loss_weight (1.0,
  # reconstruction where the target group is the face's own, fas_tpami_rec_norm
  # "l2"/"l1") and fas_tpami_latent_reg_weight (0.01, mean(latents ** 2), the
  # codes' squared distance from latent_avg).
  if variant == "tiny":
    _tiny(c)
  elif variant in ("demo", "demo_aifr"):
    _demo(c, aifr=variant == "demo_aifr")
  elif variant:
    raise ValueError(f"configs/fas_tpami.py: unknown variant {variant!r} "
                     "(use '', 'tiny', 'demo' or 'demo_aifr')")
  return c


def _tiny(c):
  """Reduced widths at 112 px: seconds per step on a CPU core (tests, smoke runs)."""
  c.dtype = "float32"
  c.num_iter = 4
  c.batch_size = 4
  c.model.units = (1, 1, 1, 1)
  c.model.depths = (8, 16, 32, 64)
  c.model.num_classes = 10
  c.model.discriminator_features = (8, 8, 16, 16, 16)
  _small_generator(c)
  tiny.small_run(c)


def _small_generator(c):
  """The reduced style path + StyleGAN2 decoder of ``:tiny`` and ``:demo``."""
  c.model.tpami_generator.style_dim = 32
  c.model.tpami_generator.channels = (32, 32, 32, 24, 16, 16)
  c.model.tpami_generator.mapping_layers = 2


def _demo(c, aifr: bool):
  """The CPU demo's data and FAS departures at 112 px with reduced TPAMI widths.

  ``c`` is ``configs/default.py:cpu`` with the TPAMI family set: its data,
  AIFR schedule, held-out verification and FAS departures (classifier
  discriminator, loss weights, Adam 1e-3 decaying linearly) stay;
  ours here: 112 px (the TPAMI generator's size), the TPAMI encoder preset,
  ``:tiny``-like generator widths, and the step counts sized so AIFR + FAS +
  the truth evaluation fit ~30 minutes of a 2-core CPU.

  Args:
    c: the config to change in place.
    aifr: the AIFR stage (trains the encoder, age estimator and CosFace head
      that ``init_from`` gives the FAS stage) instead of the FAS stage.
  """
  c.image_size = 112
  c.model.depths = (8, 16, 32, 64)  # :tiny's; 112 px costs ~3x the demo's 64 px per face
  c.model.discriminator_features = (8, 16, 32, 64, 64)
  _small_generator(c)
  # default.py's L1 reconstruction (fas_rec_loss_weight 10) stays beside the TPAMI
  # step's own L2 one (fas_tpami_rec_loss_weight 1): a decoder that redraws the
  # whole image needs the pull toward the input most.
  c.batch_size = 16
  c.num_iter = DEMO_AIFR_STEPS
  c.fas_num_iter = DEMO_FAS_STEPS
  c.checkpoint_every = 50
  c.image_every = 0
  c.train_fr, c.train_fas = aifr, not aifr
  if not aifr:
    c.num_iter = c.fas_num_iter
    c.eval_every = 0  # held-out verification belongs to AIFR; the encoder is frozen here
