"""Defaults shared by every config file, and the `:arg` parser.

A config file in `configs/` defines `get_config(arg)`; `arg` is the text after the colon in
`--config=configs/NAME.py:ARG`, a comma-separated list of `key=value` pairs or bare flags
(`tiny` means `tiny=True`). Every real config has a `tiny` variant that runs on a CPU in seconds.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections


def parse_arg(arg: str | None, **defaults):
  """'tiny,alpha=1.0' -> ConfigDict(tiny=True, alpha=1.0) over the given defaults (typed)."""
  out = dict(defaults)
  for part in (arg or "").split(","):
    part = part.strip()
    if not part:
      continue
    key, sep, value = part.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"Unknown config argument {key!r}; this config accepts {sorted(defaults)}.")
    if not sep:
      out[key] = True
      continue
    kind = type(defaults[key])
    if kind is bool:
      if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
        raise ValueError(f"Config argument {key}={value!r} is not a boolean.")
      out[key] = value.lower() in ("1", "true", "yes")
    elif defaults[key] is None:
      out[key] = value
    else:
      out[key] = kind(value)
  return ml_collections.ConfigDict(out)


def load_sibling(here: str, name: str):
  """The config file `name` beside the config file `here` (its __file__), loaded as --config
  loads it (configs/ is not a package): for configs that build on another's tables."""
  path = os.path.join(os.path.dirname(os.path.abspath(here)), name)
  spec = importlib.util.spec_from_file_location(f"_config_{os.path.splitext(name)[0]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def base_config() -> ml_collections.ConfigDict:
  """Every setting the distillation job reads, with the paper's common values (spec §8)."""
  c = ml_collections.ConfigDict()
  c.job = "distill"  # distill | train_teacher
  c.method = "sid"
  c.seed = 0

  # The images the generator makes. label_dim 0 = unconditional.
  c.data = ml_collections.ConfigDict()
  c.data.resolution = 32
  c.data.channels = 3
  c.data.label_dim = 0
  # Real data (sid_jax/data/real.py, README "Real data"): '' = none (data-free: uniform labels);
  # 'edm_zip', 'edm2_latent_zip', 'tfds', 'labels_json' or 'digits', read from `path` (a zip or
  # json file, or a tfds name with `split`, `data_dir`, `image_feature`, `label_feature`).
  # `seed` -1 = the run's seed; grain `worker_count` processes per host, `read_threads` and
  # `prefetch` (records; 0 = two batches) bound what is read ahead.
  c.data.source = ""
  c.data.path = ""
  c.data.split = ""
  c.data.data_dir = ""
  c.data.image_feature = "image"
  c.data.label_feature = "label"
  c.data.shuffle = True
  c.data.seed = -1
  c.data.worker_count = 0
  c.data.read_threads = 2
  c.data.prefetch = 0
  # Documentation only: the dataset file a paper config expects (named when path is missing).
  c.data.official_name = ""

  # The teacher: an analytic mixture ('gmm') or a converted network checkpoint ('network').
  c.teacher = ml_collections.ConfigDict()
  c.teacher.type = "gmm"
  c.teacher.checkpoint = ""  # directory written by `python -m sid_jax.convert` (type 'network')
  # The official file a config's teacher checkpoint is converted from (e.g.
  # 'edm-cifar10-32x32-cond-vp.pkl') and where it is published; only used in error messages.
  c.teacher.official_name = ""
  c.teacher.official_url = ""
  # Type 'random' (tests and smoke runs only): config.model's network with random weights drawn
  # from this seed (sid_jax/models.py, `random_network_params`).
  c.teacher.random_seed = 0
  c.teacher.gmm = ml_collections.ConfigDict()
  c.teacher.gmm.num_components = 10
  c.teacher.gmm.std = 0.1
  c.teacher.gmm.seed = 0
  c.teacher.gmm.mean_scale = 0.7

  # Latent-space students (EDM2): how their latents become images for sample grids, in-loop
  # FID, exports and `sid_jax.sample`. `vae`: '' (none: grids show raw latents), a converted
  # SD VAE directory (`python -m sid_jax.convert vae`; EDM2 uses sd-vae-ft-mse) or 'random' (a
  # tiny random VAE, smoke runs); EDM2's normalisation of the raw latents (spec §7.4).
  c.decoder = ml_collections.ConfigDict()
  c.decoder.vae = ""
  c.decoder.raw_mean = [5.81, 3.25, 0.12, -2.15]
  c.decoder.raw_std = [4.17, 4.62, 3.71, 3.28]
  c.decoder.final_mean = 0.0
  c.decoder.final_std = 0.5

  # Architecture of generator and fake score when they are not copies of a network teacher.
  c.model = ml_collections.ConfigDict()
  # A network spec (see sid_jax/models.py): an official precond class and its constructor
  # kwargs; img_resolution, img_channels and label_dim are filled in from config.data.
  c.model.init_from = "scratch"  # scratch | teacher
  c.model.class_name = "EDMPrecond"
  c.model.kwargs = ml_collections.ConfigDict({"model_type": "SongUNet"})
  # Compute dtype of teacher, generator and fake score: float32 (the papers) | bfloat16 (bf16
  # convolutions and matmuls; float32 parameters, preconditioning and normalisation statistics).
  c.model.compute_dtype = "float32"

  c.sid = ml_collections.ConfigDict()
  c.sid.alpha = 1.2
  c.sid.sigma_init = 2.5
  c.sid.tmax = 800.0
  c.sid.sigma_min = 0.002
  c.sid.sigma_max = 80.0
  c.sid.rho = 7.0
  c.sid.p_mean = -1.2
  c.sid.p_std = 1.2
  c.sid.sigma_data = 0.5
  c.sid.gen_loss_scale = 100.0
  c.sid.fake_loss_scale = 1.0
  c.sid.use_logvar = False
  # EDM2 forced weight normalisation (spec §7.2, SiD-EDM2): project every MPConv weight of G to
  # normalize(w) right before each generator step, and of the fake score right before each
  # fake-score step (`sid_jax.nets.edm2.project_mpconv_weights`). EDM2 networks only.
  c.sid.force_normalization = False
  # EDM augmentation of generator samples in the fake-score loss (CIFAR-10 0.12, FFHQ/AFHQ 0.15);
  # the networks must take 9 augment labels (augment_dim = 9).
  c.sid.augment_p = 0.0

  c.optim = ml_collections.ConfigDict()
  c.optim.fake_lr = 1e-5
  c.optim.gen_lr = 1e-5
  c.optim.fake_b1 = 0.0
  c.optim.gen_b1 = 0.0
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.fake_clip_value = ml_collections.config_dict.placeholder(float)
  c.optim.gen_clip_value = ml_collections.config_dict.placeholder(float)  # SiD-LSG fp16 runs: 1

  c.ema = ml_collections.ConfigDict()
  c.ema.halflife_kimg = 500.0
  c.ema.rampup = 0.05

  c.training = ml_collections.ConfigDict()
  c.training.global_batch = 256
  c.training.micro_batch = 256
  c.training.num_steps = 1000
  # Stop after this many consecutive iterations with a non-finite loss or gradient (0 = never, as
  # the official loop, which only applies nan_to_num to the gradients): a deviation, see train.py.
  c.training.max_nonfinite_steps = 10
  # Resume a checkpoint even when settings that define the run differ (logged as a warning);
  # see checkpoints.RESUMABLE_CHANGES for what may always change.
  c.training.resume_allow_changes = False

  # Axes `data` and `fsdp` (-1: the remaining devices); parameters, gradients, EMA and optimiser
  # states with at least `fsdp_min_size` elements are split over `fsdp` (0: every leaf whose
  # shape allows it).
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "fsdp_min_size": 2**18})

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 500
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True

  c.log = ml_collections.ConfigDict()
  c.log.every_steps = 50
  c.log.progress_every_secs = 30.0
  c.log.sample_every_steps = 1000
  c.log.grid_columns = 8

  # In-loop evaluation of the EMA generator (fixed randomness, comparable across steps).
  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 1000
  c.eval.num_samples = 2048
  c.eval.batch = 256
  c.eval.seed = 12345
  # auto: gmm for a mixture teacher, fid when inception and ref are both set, else none.
  c.eval.kind = "auto"  # auto | gmm | digits | fid | none
  c.eval.every_kimg = 0.0  # > 0: evaluate every this many kimg (overrides every_steps)
  c.eval.inception = ""  # kind 'fid': pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or .npz)
  c.eval.ref = ""  # kind 'fid': reference statistics .npz (EDM fid-refs or evaluate make-ref)
  c.eval.protocol = "edm-fid50k"  # kind 'fid': the FID protocol (edm-fid50k | sid-fid50k-full)
  # The metric whose lowest value is kept in WORKDIR/checkpoints_best ('auto': fid for FID,
  # frechet_distance for gmm/digits; '' = no best checkpoint).
  c.eval.best_metric = "auto"
  # Final metric table (teacher with EDM's Heun sampler vs one-step generators), digits only.
  c.eval.teacher_heun_steps = 18

  # Used when job = 'train_teacher' (EDM training of a small teacher, e.g. on the digits).
  c.teacher_training = ml_collections.ConfigDict()
  c.teacher_training.dataset = "digits"
  c.teacher_training.batch = 128
  c.teacher_training.num_steps = 10000
  c.teacher_training.lr = 1e-3
  c.teacher_training.warmup_steps = 500
  c.teacher_training.b1 = 0.9
  c.teacher_training.b2 = 0.999
  c.teacher_training.eps = 1e-8
  c.teacher_training.p_mean = -1.2
  c.teacher_training.p_std = 1.2
  c.teacher_training.ema_halflife_kimg = 50.0
  c.teacher_training.ema_rampup = 0.05
  c.teacher_training.export_dir = ""  # default: WORKDIR/teacher
  return c


def tiny_schedule(c: ml_collections.ConfigDict, batch: int, grid_columns: int = 4) -> None:
  """The `:tiny` variants' run shape: `batch` in one accumulation round (on a CPU every round is
  unrolled into the compiled iteration), 3 steps, a checkpoint at step 2, a log line per step,
  evaluations and grids only at the start and the end."""
  c.training.global_batch = batch
  c.training.micro_batch = batch
  c.training.num_steps = 3
  c.checkpoint.every_steps = 2
  c.log.every_steps = 1
  c.log.sample_every_steps = 100
  c.log.grid_columns = grid_columns
  c.eval.every_steps = 100
  c.eval.batch = batch
  c.eval.num_samples = max(batch, 2)
