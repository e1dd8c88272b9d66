"""Converts official EDM / EDM2 / SiD / SiDA / Stable Diffusion / SiD-LSG checkpoints into
sid_jax network checkpoints.

Usage:

  # An official pickle: NVlabs/edm or NVlabs/edm2 `network-snapshot-*.pkl`, a released EDM / EDM2
  # model, or a released SiD / SiDA generator. The network is the entry `--key` (default `ema`).
  python -m sid_jax.convert edm  --src edm-cifar10-32x32-cond-vp.pkl --dst teachers/cifar10-cond
  python -m sid_jax.convert edm2 --src edm2-img64-s-1073741-0.075.pkl --dst teachers/img64-s
  python -m sid_jax.convert edm  --src network-snapshot-1.200000-100000.pkl --dst gens/cifar10 \
      --key ema

  # Weights you exported yourself: a torch state_dict (.pt / .pth, read with
  # torch.load(weights_only=True)) or an .npz whose keys are the torch names, plus a JSON spec
  # naming the official class and its constructor kwargs.
  python -m sid_jax.convert edm  --src weights.pt  --spec spec.json --dst teachers/mine
  python -m sid_jax.convert edm2 --src weights.npz --spec spec.json --dst teachers/mine

  # spec.json, e.g.:
  #   {"class_name": "EDMPrecond",
  #    "kwargs": {"img_resolution": 32, "img_channels": 3, "label_dim": 10,
  #               "model_type": "SongUNet", "embedding_type": "positional", ...}}

  # Stable Diffusion 1.x / 2.x (epsilon prediction): a local diffusers folder with unet/, vae/,
  # text_encoder/, tokenizer/ and scheduler/ (safetensors, or .bin with torch).
  python -m sid_jax.convert sd --src stable-diffusion-v1-5 --dst teachers/sd15
  python -m sid_jax.convert sd --src stable-diffusion-2-1-base --dst teachers/sd21base \
      --variant fp16

  # A released SiD-LSG generator: a pickle of {'ema': diffusers UNet2DConditionModel}. The UNet
  # comes from the pickle; text encoder, VAE, tokenizer, scheduler (and the UNet's config) from
  # its teacher's diffusers folder --src.
  python -m sid_jax.convert sd --src stable-diffusion-v1-5 --generator sid_lsg_sd15.pkl \
      --dst gens/sid-lsg-sd15

  # A lone Stable Diffusion VAE (diffusers AutoencoderKL: config.json and
  # diffusion_pytorch_model.safetensors in --src or its vae/ subfolder), e.g. EDM2's
  # stabilityai/sd-vae-ft-mse, which turns EDM2 latents into images (config.decoder.vae):
  python -m sid_jax.convert vae --src sd-vae-ft-mse --dst vaes/sd-vae-ft-mse

Then use the converted network as the teacher:

  python -m sid_jax.main --config=configs/X.py --workdir=DIR \
      --config.teacher.type=network --config.teacher.checkpoint=teachers/cifar10-cond
  python -m sid_jax.main --config=configs/sd15_lsg.py --workdir=DIR \
      --config.teacher.checkpoint=teachers/sd15

Subcommands: `edm` converts EDMPrecond, VPPrecond, VEPrecond (NVlabs/edm, SiD) and
EDMPrecond_EncoderDecoder (SiDA); `edm2` converts Precond (NVlabs/edm2) and
EDM_2_Precond_EncoderDecoder / EDM_2_Precond_Generator (SiDA); `sd` converts Stable Diffusion
(diffusers UNet2DConditionModel and AutoencoderKL, transformers CLIPTextModel and CLIPTokenizer)
and SiD-LSG generators.

EDM / EDM2 pickles are read without the official code and without running any code they carry:
only network data (persistent classes as records, tensors, plain containers) is rebuilt, and any
other Python global in the file stops the conversion with an error naming it (see
`sid_jax/weights/pickles.py`). torch is needed to read .pkl and .pt sources, not .npz. The output
directory holds `network.json` (the spec), `params/` (Orbax) and `source.json` (source path,
sha256, entry). `--overwrite` replaces an existing non-empty output directory.

`sd` writes `stable_diffusion.save`'s directory (network.json, params/, tokenizer/) and a
`source.json` naming the diffusers folder, the variant, the sha256 of every weight file read and,
with `--generator`, the pickle (path, sha256, key; the released generators' t_init = 625). It
needs neither torch nor diffusers for safetensors folders. `--generator` is different from the
pickles above: a SiD-LSG pickle holds a whole diffusers module, and unpickling it imports
diffusers and torch and can run any code the file carries. Only pass a file you trust; it is
unpickled only when you name it with `--generator` (needs `pip install 'sid_jax[convert]'
diffusers`).

This module only parses the command line and prints; the work is `sid_jax.models.official`
(`convert`, `convert_sd`) over the strict key maps and file readers of `sid_jax.weights`.
"""

from __future__ import annotations

import sys
import traceback

from absl import app
from absl import flags

from sid_jax import cli
from sid_jax.models import official
from sid_jax.weights import pickles

PROG = "python -m sid_jax.convert"
FAMILIES = ("edm", "edm2", "sd", "vae")
# The errors a user can cause; each is one line "sid_jax.convert: error: ..." (the traceback too
# with --verbosity=1) and exit status 1 (2 for a bad command line).
USER_ERRORS = (ValueError, FileNotFoundError, ImportError, pickles.UnsafePickleError)

# Flags live in their own FlagValues, so the converter can run in-process (tests, notebooks) next
# to other absl programs; absl's own flags (--verbosity, ...) are parsed by app.run as usual.
FLAGS = flags.FlagValues()
_ = flags.DEFINE_string("src", None, "edm / edm2: an official network pickle (.pkl), a torch "
                        "state_dict (.pt/.pth) or an .npz of torch names. sd: a local diffusers "
                        "folder with unet/, vae/, text_encoder/, tokenizer/, scheduler/ (with "
                        "--generator: the generator's teacher).", flag_values=FLAGS)
_ = flags.DEFINE_string("dst", None, "The output network checkpoint directory.",
                        flag_values=FLAGS)
_ = flags.DEFINE_string("key", None, "edm / edm2: the snapshot entry holding the network "
                        "(default: ema; '' = the whole pickle). sd: the --generator pickle's "
                        "entry holding the UNet (default: ema), only with --generator.",
                        flag_values=FLAGS)
_ = flags.DEFINE_string("spec", None, "edm / edm2, for .pt/.npz sources: JSON "
                        "{\"class_name\": ..., \"kwargs\": {...}}.", flag_values=FLAGS)
_ = flags.DEFINE_string("variant", None, "sd: the weight file variant, e.g. fp16 "
                        "(diffusion_pytorch_model.fp16.safetensors).", flag_values=FLAGS)
_ = flags.DEFINE_string("generator", None, "sd: a SiD-LSG generator pickle "
                        "{'ema': UNet2DConditionModel} whose UNet replaces --src's. Unpickling "
                        "runs code from the file: trusted files only.", flag_values=FLAGS)
_ = flags.DEFINE_bool("overwrite", False, "Replace an existing non-empty --dst.",
                      flag_values=FLAGS)
# Flags that only one kind of subcommand takes.
_ONLY_FOR = {"spec": ("edm", "edm2"), "variant": ("sd", "vae"), "generator": ("sd",),
             "key": ("edm", "edm2", "sd")}


class UsageError(ValueError):
  """A command line that names no subcommand, lacks a flag or gives one that does not apply."""


def execute(args: list[str]):
  """Converts as the parsed FLAGS and the positional `args` (the subcommand) say; the summary."""
  if len(args) != 1 or args[0] not in FAMILIES:
    raise UsageError(f"expected one subcommand, {', '.join(FAMILIES)}, got {args or 'none'}; "
                     f"see {PROG} --help.")
  family = args[0]
  missing = [f"--{name}" for name in ("src", "dst") if FLAGS[name].value is None]
  if missing:
    raise UsageError(f"`{family}` needs {' and '.join(missing)}.")
  for name, families in _ONLY_FOR.items():
    if FLAGS[name].present and family not in families:
      raise UsageError(f"--{name} is only for {' / '.join(families)}, not `{family}`.")
  key = "ema" if FLAGS.key is None else FLAGS.key
  if family == "vae":
    return official.convert_vae(FLAGS.src, FLAGS.dst, variant=FLAGS.variant,
                                overwrite=FLAGS.overwrite)
  if family != "sd":
    return official.convert(family, FLAGS.src, FLAGS.dst, key=key, spec_path=FLAGS.spec,
                            overwrite=FLAGS.overwrite)
  if FLAGS.key is not None and FLAGS.generator is None:
    raise ValueError("--key selects the UNet in a --generator pickle; there is no --generator.")
  return official.convert_sd(FLAGS.src, FLAGS.dst, variant=FLAGS.variant,
                             generator=FLAGS.generator, key=key, overwrite=FLAGS.overwrite)


def run(argv: list[str]):
  """Parses `argv` (argv[0] is the program name) and converts; returns the summary.

  The in-process entry point (tests, notebooks): errors are raised, not turned into exit codes.
  """
  FLAGS.unparse_flags()
  return execute(FLAGS(list(argv))[1:])


def _finish(convert) -> int:
  """Runs `convert()`: prints the summary (0) or one error (1; 2 for a bad command line)."""
  try:
    summary = convert()
  except (flags.Error, *USER_ERRORS) as e:
    if cli.debug_requested():
      traceback.print_exc()
    print(f"sid_jax.convert: error: {e}", file=sys.stderr)
    return 2 if isinstance(e, (flags.Error, UsageError)) else 1
  print("\n".join(summary.lines()))
  return 0


def main(argv: list[str] | None = None) -> int:
  """Runs the converter on `argv` (the subcommand and flags, without the program name; default
  sys.argv[1:]); returns the exit status."""
  argv = sys.argv[1:] if argv is None else argv
  return _finish(lambda: run([PROG, *argv]))


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(_finish(lambda: execute(argv[1:]))),
          flags_parser=cli.quiet_parser(FLAGS, __doc__, "sid_jax.convert"))
