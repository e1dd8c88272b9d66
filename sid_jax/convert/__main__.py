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

import argparse
import sys

from sid_jax.models import official
from sid_jax.weights import pickles

# The errors a user can cause; each is printed as one line and exits 1.
USER_ERRORS = (ValueError, FileNotFoundError, ImportError, pickles.UnsafePickleError)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m sid_jax.convert",
      description="Convert official EDM / EDM2 / SiD / SiDA weights, or a diffusers Stable "
      "Diffusion folder (and SiD-LSG generators), into a sid_jax network checkpoint.",
      epilog="See the module docstring of sid_jax/convert/__main__.py for examples.")
  sub = parser.add_subparsers(dest="family", required=True, metavar="{edm,edm2,sd}")
  sd = sub.add_parser("sd", help="convert a diffusers Stable Diffusion folder (optionally "
                      "with a SiD-LSG generator's UNet)")
  sd.add_argument("--src", required=True,
                  help="local diffusers folder with unet/, vae/, text_encoder/, tokenizer/, "
                  "scheduler/ (with --generator: the generator's teacher)")
  sd.add_argument("--dst", required=True, help="output model directory")
  sd.add_argument("--variant", default=None,
                  help="weight file variant, e.g. fp16 (diffusion_pytorch_model.fp16.safetensors)")
  sd.add_argument("--generator", default=None,
                  help="SiD-LSG generator pickle {'ema': UNet2DConditionModel} whose UNet "
                  "replaces --src's. Unpickling runs code from the file: trusted files only")
  sd.add_argument("--key", default=None,
                  help="pickle entry holding the generator UNet (default: ema; '' = the whole "
                  "pickle); only with --generator")
  sd.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --dst")
  for family, what in (("edm", "EDMPrecond / VPPrecond / VEPrecond / EDMPrecond_EncoderDecoder"),
                       ("edm2", "Precond / EDM_2_Precond_EncoderDecoder / "
                        "EDM_2_Precond_Generator")):
    p = sub.add_parser(family, help=f"convert {what}")
    p.add_argument("--src", required=True,
                   help="official network pickle (.pkl), torch state_dict (.pt/.pth) or .npz "
                   "of torch names")
    p.add_argument("--dst", required=True, help="output network checkpoint directory")
    p.add_argument("--key", default="ema",
                   help="snapshot entry holding the network (default: ema; '' = the whole "
                   "pickle)")
    p.add_argument("--spec", default=None,
                   help="JSON {\"class_name\": ..., \"kwargs\": {...}} for .pt/.npz sources")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing non-empty --dst")
  return parser


def main(argv: list[str] | None = None) -> int:
  """Runs the converter; returns the exit status (0 on success, 1 on a reported error)."""
  args = _parser().parse_args(argv)
  try:
    if args.family == "sd":
      if args.key is not None and args.generator is None:
        raise ValueError("--key selects the UNet in a --generator pickle; there is no "
                         "--generator.")
      summary = official.convert_sd(args.src, args.dst, variant=args.variant,
                                    generator=args.generator,
                                    key="ema" if args.key is None else args.key,
                                    overwrite=args.overwrite)
    else:
      summary = official.convert(args.family, args.src, args.dst, key=args.key,
                                 spec_path=args.spec, overwrite=args.overwrite)
  except USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print("\n".join(summary.lines()))
  return 0


if __name__ == "__main__":
  sys.exit(main())
