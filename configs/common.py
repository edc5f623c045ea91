"""The reference MTLFace hyper-parameters; every other config starts from these.

Key names follow the reference's command-line flags (``fr_age_loss_weight``,
``fas_gan_loss_weight``, ``milestone``, ``warmup``, ...) so parity is easy to
check. ``batch_size`` is GLOBAL here (the reference's 64 per GPU x 8 GPUs).

Every key any config or the code uses is declared here, and the returned
config is locked, so a misspelt key in a config file or a ``--config.x=y``
override fails instead of being silently ignored.
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
  # "cvpr" (ICM + decoder generator) or "tpami" (style path + StyleGAN2 decoder,
  # configs/fas_tpami.py); models/spec.py builds the family's generator.
  c.model.family = "cvpr"
  c.model.tpami_generator = ml_collections.ConfigDict()  # TPAMIGenerator fields (tpami only)
  c.model.tpami_generator.image_size = 112
  c.model.tpami_generator.style_dim = 512
  c.model.tpami_generator.channels = ()  # () = StyleGAN2's schedule for channel_multiplier
  c.model.tpami_generator.channel_multiplier = 2
  c.model.tpami_generator.mapping_layers = 8
  c.model.tpami_generator.lr_mlp = 0.01

  c.head_s = 64.0
  c.head_m = 0.35
  c.fr_age_loss_weight = 0.001
  c.fr_da_loss_weight = 0.002
  c.grl_coefficient = 1.0
  c.fas_gan_loss_weight = 75.0
  c.fas_id_loss_weight = 0.002
  c.fas_age_loss_weight = 10.0
  # TPAMI family only, OURS (docs/architecture.md T1.7; training/tpami_steps.py):
  # reconstruction where the target group is the face's own ("l2" or "l1"), and
  # mean(latents ** 2), the codes' squared distance from latent_avg.
  c.fas_tpami_rec_loss_weight = 1.0
  c.fas_tpami_rec_norm = "l2"
  c.fas_tpami_latent_reg_weight = 0.01
  # Not in the reference (0 / "" keep it exact): L1(G(x, own group), x) on the
  # samples drawn with their own group as target, and the discriminator's
  # input augmentation ("translation", "cutout", comma-separated).
  c.fas_rec_loss_weight = 0.0
  c.fas_d_augment = ""
  # Not in the reference (0 keeps it exact): the generator also keeps an
  # exponential moving average of its weights, decay per step; evaluation,
  # export and previews use the average (models/spec.py inference_variables).
  c.fas_ema_decay = 0.0

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
  c.fas_optim.decay = "constant"  # reference; "linear": to 0 over the FAS run

  # Training data: ``data.name`` picks the source (mtlface_jax/data_sources.py);
  # each source reads only its own section, named like it.
  c.data = ml_collections.ConfigDict()
  c.data.name = "mtlface_list"
  # Before the first step, mtlface_list files are checked: "header" (exists,
  # image header readable), "full" (decoded) or "off".
  c.data.verify_images = "header"
  c.data.crop_scale = 1.0  # < 1: random scale/shift crops (input_pipeline.PipelineConfig)
  c.data.skip_bad_examples = False  # count and drop unreadable examples instead of failing
  c.data.mtlface_list = ml_collections.ConfigDict()
  c.data.mtlface_list.file = ""        # ``id filename age gender`` lines (formats/lists.py)
  c.data.mtlface_list.image_root = ""  # the list's file names are relative to this folder
  c.data.synthetic_faces = ml_collections.ConfigDict()  # procedural faces (synthetic.py)
  c.data.synthetic_faces.num_identities = 1_000
  c.data.synthetic_faces.images_per_identity = 20
  c.data.synthetic_faces.seed = 0
  c.data.synthetic_faces.test_fraction = 0.1  # identities held out for the test pairs
  c.data.synthetic_faces.num_folds = 10
  c.data.synthetic_faces.pairs_per_fold = 300
  c.data.face_shards = ml_collections.ConfigDict()  # LFW + UTKFace shards (real_data.py)
  c.data.face_shards.dir = ""
  # The recipe (recipes/lfw_utkface.py) builds missing shards from these:
  c.data.face_shards.lfw_dir = ""
  c.data.face_shards.utkface_dir = ""
  c.data.face_shards.split_seed = 0
  c.data.face_shards.utkface_train_fraction = 0.8
  c.data.tfds = ml_collections.ConfigDict()  # a TFDS dataset with image/id/age/gender
  c.data.tfds.name = ""
  c.data.tfds.split = "train"
  c.data.tfds.data_dir = ""

  c.init_from = ""  # checkpoint to start from (FAS from AIFR, or fine-tuning)
  # Variable paths init_from leaves freshly initialised, e.g. ("head",) for a
  # new model.num_classes, or "encoder/output_layer" (training/transfer.py).
  c.init_from_exclude = ()
  # A resume whose config changes the computation: "refuse" (default) or
  # "allow" (logs the changed keys); see training/run_config.py.
  c.resume_config_change = "refuse"
  # FAS steps of the two-stage recipes (recipes/stages.py: AIFR for num_iter,
  # then FAS); train.py runs num_iter steps of the configured task.
  c.fas_num_iter = 36_000
  c.log_every = 50
  c.checkpoint_every = 1_000
  c.keep_checkpoints = 3
  c.image_every = 1_000
  c.max_consecutive_nonfinite = 20

  # Held-out verification while training AIFR (training/eval_hook.py): every
  # eval_every steps the current encoder embeds these sets (flip-averaged) and
  # the 10-fold protocol's accuracy/std/AUC go to TensorBoard and metrics.jsonl.
  c.eval_every = 0  # 0: off
  c.eval = ml_collections.ConfigDict()
  c.eval.bins = ()        # insightface .bin sets, e.g. ("data/agedb_30.bin", "data/calfw.bin")
  c.eval.pair_lists = ()  # "format:path", format lfw (pairs.txt), generic or numbered
  c.eval.images_root = ""  # pair-list names are relative to it (lfw: <pairs dir>/images)
  c.eval.lfw_crop = False  # fixed LFW crop for raw 250x250 deep-funneled LFW images
  c.eval.synthetic = False  # the held-out pairs of data.synthetic_faces
  c.eval.num_folds = 10    # folds of .bin sets and of pair lists without fold labels
  c.eval.max_pairs_per_fold = 0  # > 0: only the first N matched and mismatched pairs
  c.eval.batch_size = 64   # images per device call (rounded up to the device count)
  # Selective fine-tuning (recipes/selective.py, configs/selective_ft.py); OURS,
  # the TPAMI paper publishes none of these (docs/architecture.md T2).
  c.selective = ml_collections.ConfigDict()
  # Ours: the identity threshold is the frozen encoder's threshold at this FAR on
  # the recipe's held-out verification pairs (synthetic test pairs; LFW folds
  # 6-10 on real faces); a number in `tau` overrides it.
  c.selective.far = 1e-3
  c.selective.tau = ml_collections.FieldReference(None, field_type=float)
  # Ours: a short, constant, low learning rate (AIFR trains at 0.1).
  c.selective.ft_lr = 0.01
  c.selective.ft_num_iter = 50
  c.selective.ft_warmup = 5
  # One fine-tuning run per seed per arm; ablation.json has their mean and std.
  c.selective.ft_seeds = (0,)
  # Which arms run: no fine-tuning, plain (all synthesized faces), selective.
  c.selective.arms = ("no_finetune", "plain_finetune", "selective_finetune")
  c.selective.batch_size = 64  # Inference batch for synthesis, judging and evaluation.
  c.selective.chunk = 256      # Source faces synthesized per pass (host memory bound).
  # Locked: a config file or --config.x=y that names an undeclared key fails.
  return c.lock()


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
