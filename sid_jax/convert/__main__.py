"""Converts official EDM / EDM2 / SiD / SiDA checkpoints into sid_jax network checkpoints.

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

Then use the converted network as the teacher:

  python -m sid_jax.main --config=configs/X.py --workdir=DIR \
      --config.teacher.type=network --config.teacher.checkpoint=teachers/cifar10-cond

Subcommands: `edm` converts EDMPrecond, VPPrecond, VEPrecond (NVlabs/edm, SiD) and
EDMPrecond_EncoderDecoder (SiDA); `edm2` converts Precond (NVlabs/edm2) and
EDM_2_Precond_EncoderDecoder / EDM_2_Precond_Generator (SiDA).

Pickles are read without the official code and without running any code they carry: only
network data (persistent classes as records, tensors, plain containers) is rebuilt, and any other
Python global in the file stops the conversion with an error naming it (see
`sid_jax/convert/pickles.py`). torch is needed to read .pkl and .pt sources, not .npz. The output
directory holds `network.json` (the spec), `params/` (Orbax) and `source.json` (source path,
sha256, entry). `--overwrite` replaces an existing non-empty output directory.
"""

from __future__ import annotations

import argparse
import sys

from sid_jax.convert import cli, pickles


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m sid_jax.convert",
      description="Convert official EDM / EDM2 / SiD / SiDA weights into a sid_jax network "
      "checkpoint.",
      epilog="See the module docstring of sid_jax/convert/__main__.py for examples.")
  sub = parser.add_subparsers(dest="family", required=True, metavar="{edm,edm2}")
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
    summary = cli.convert(args.family, args.src, args.dst, key=args.key, spec_path=args.spec,
                          overwrite=args.overwrite)
  except (cli.ConversionError, pickles.UnsafePickleError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print("\n".join(summary.lines()))
  return 0


if __name__ == "__main__":
  sys.exit(main())
