"""The reference MTLFace hyper-parameters; every other config starts from these.

Key names follow the reference's command-line flags (``fr_age_loss_weight``,
``fas_gan_loss_weight``, ``milestone``, ``warmup``, ...) so parity is easy to
check. ``batch_size`` is GLOBAL here (the reference's 64 per GPU x 8 GPUs).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the shared defaults (AIFR on SCAF, IR-50, 112x112)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.train_fr = True    # AIFR task (reference --train_fr)
  c.train_fas = False  # FAS task (reference --train_fas); both -> joint MTL
  c.num_iter = 36_000
  c.batch_size = 512
  c.image_size = 112
  c.age_group = 7
  c.dtype = "bfloat16"  # computation dtype; params, optimizer states, losses float32

  c.model = ml_collections.ConfigDict()
  c.model.backbone_name = "ir50"
  c.model.units = ()          # per-stage IR units; () = from backbone_name
  c.model.depths = (64, 128, 256, 512)
  c.model.num_classes = 10_575
  c.model.icm_unit_count = 128
  c.model.decoder_features = (256, 128, 64, 32)
  c.model.discriminator_features = (64, 128, 256, 512, 512)
  # "concat" (reference: one-hot target group after conv1, LSGAN real/fake) or
  # "classifier" (G age groups + "synthesized" per patch; see discriminator.py).
  c.model.discriminator_conditioning = "concat"
  c.model.dropout_rate = 0.5

  c.head_s = 64.0
  c.head_m = 0.35
  c.fr_age_loss_weight = 0.001
  c.fr_da_loss_weight = 0.002
  c.grl_coefficient = 1.0
  c.fas_gan_loss_weight = 75.0
  c.fas_id_loss_weight = 0.002
  c.fas_age_loss_weight = 10.0
  # Not in the reference (0 / "" keep it exact): L1(G(x, own group), x) on the
  # samples drawn with their own group as target, and the discriminator's
  # input augmentation ("translation", "cutout", comma-separated).
  c.fas_rec_loss_weight = 0.0
  c.fas_d_augment = ""

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 0.1             # reference --learning_rate
  c.optim.momentum = 0.9
  c.optim.weight_decay = 5e-4
  c.optim.warmup = 1_000
  c.optim.milestone = (20_000, 23_000)
  c.optim.gamma = 0.1
  c.optim.min_lr = 1e-4

  c.fas_optim = ml_collections.ConfigDict()
  c.fas_optim.d_lr = 1e-4
  c.fas_optim.g_lr = 1e-4
  c.fas_optim.b1 = 0.5   # reference code; the supplementary text says 0.9
  c.fas_optim.b2 = 0.99

  c.data = ml_collections.ConfigDict()
  c.data.name = "mtlface_list"   # see mtlface_jax/data_sources.py
  c.data.list_file = ""
  c.data.image_root = ""
  c.data.skip_bad_examples = False
  c.data.crop_scale = 1.0  # < 1: random scale/shift crops (input_pipeline.PipelineConfig)
  c.data.shards_dir = ""   # face_shards only (mtlface_jax/real_data.py)
  c.data.tfds_name = ""
  c.data.tfds_split = "train"
  c.data.tfds_data_dir = ""
  # synthetic_faces only:
  c.data.num_identities = 1_000
  c.data.images_per_identity = 20
  c.data.seed = 0
  c.data.test_fraction = 0.1
  c.data.num_folds = 10
  c.data.pairs_per_fold = 300

  c.init_from = ""  # AIFR checkpoint directory to start FAS from
  c.log_every = 50
  c.checkpoint_every = 1_000
  c.keep_checkpoints = 3
  c.image_every = 1_000
  c.max_consecutive_nonfinite = 20
  c.eval_every = 0
  return c


def reduce_model_for_cpu(c: ml_collections.ConfigDict,
                         depths: tuple[int, ...] = (16, 32, 64, 128)) -> None:
  """Switches ``c`` to a small float32 model at 64x64 that a 2-core CPU trains.

  Shared by the demo's and the real-data recipe's CPU variants.

  Args:
    c: the config to change in place.
    depths: channels of the four encoder stages (one IR unit each).
  """
  c.dtype = "float32"
  c.image_size = 64
  c.model.units = (1, 1, 1, 1)
  c.model.depths = depths
  c.model.icm_unit_count = 32
  c.model.decoder_features = (64, 32, 16, 16)
  c.model.discriminator_features = (16, 32, 64, 128, 128)
  # A softer CosFace converges in the few hundred steps a CPU affords.
  c.head_s = 32.0
  c.head_m = 0.2
