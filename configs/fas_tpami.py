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
"""

from configs import common
from configs import tiny


def get_config(variant: str = ""):
  """The TPAMI FAS config; ``variant`` "tiny" gives the reduced CPU model."""
  c = common.get_config()
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
  elif variant:
    raise ValueError(f"configs/fas_tpami.py: unknown variant {variant!r} (use '' or 'tiny')")
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
  c.model.tpami_generator.style_dim = 32
  c.model.tpami_generator.channels = (32, 32, 32, 24, 16, 16)
  c.model.tpami_generator.mapping_layers = 2
  tiny.small_run(c)
