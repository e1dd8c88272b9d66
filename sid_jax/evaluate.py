"""Sample-quality evaluation: FID, Inception Score, precision/recall, KID, CLIP score — each
number named by its protocol (`sid_jax.evaluation.protocols`).

Evaluate a generator checkpoint, a folder of images or an image array:

  python -m sid_jax.evaluate --checkpoint WORKDIR \\
      --inception pt_inception-2015-12-05-6726825d.pth --ref cifar10-32x32.npz --metrics fid,is
  python -m sid_jax.evaluate --images DIR --inception FILE --ref STATS.npz
  python -m sid_jax.evaluate --npz samples.npz --inception FILE --ref STATS.npz --metrics fid,pr,kid

CLIP score of text-to-image samples against the captions they were generated from: the image of
seed s meets caption line s. Samples written by `sid_jax.sample` record each image's prompt (and
are checked against --captions); for other folders or arrays name the seeds in image order:

  python -m sid_jax.evaluate --images DIR --metrics clip --captions captions.txt \\
      --clip_model CLIP-ViT-g-14-laion2B-s12B-b42K [--clip_protocol sid-lsg|plain] \\
      [--seeds 0-29999]

Build reference statistics from real images (add --save_features for precision/recall and KID):

  python -m sid_jax.evaluate make-ref --images DIR --inception FILE --out STATS.npz
  python -m sid_jax.evaluate make-ref --npz FILE --inception FILE --out STATS.npz
  python -m sid_jax.evaluate make-ref --tfds NAME:SPLIT --data_dir DIR --inception FILE \\
      --out STATS.npz

Output: one JSON line (every result carries `protocol` and the protocol's fields: detector,
resize, reference, num_samples, params), then a Markdown table. Nothing is downloaded: the
Inception weights (`--inception`), reference statistics (`--ref`), CLIP model (`--clip_model`) and
captions (`--captions`) are local files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Callable

from absl import app, flags, logging
import jax
import ml_collections
import numpy as np

from sid_jax import checkpoints, cli, images, progress, sharding
from sid_jax import run as run_lib
from sid_jax.data import prompts as prompts_lib
from sid_jax.evaluation import clip_score
from sid_jax.evaluation import features as features_lib
from sid_jax.evaluation import metrics as metrics_lib
from sid_jax.evaluation import pairing
from sid_jax.evaluation import protocols
from sid_jax.nets import clip
from sid_jax.evaluation.sources import (ImageSource, SourceError, folder_source, npz_source,
                                        tfds_source)
from sid_jax.weights import clip as clip_params

# Flags live in their own FlagValues, so evaluation can be run in-process (tests, notebooks) next
# to other absl programs; absl's own flags (--verbosity, ...) are parsed by app.run as usual.
FLAGS = flags.FlagValues()
_ = flags.DEFINE_string("checkpoint", None, "A training workdir (or its checkpoints/ directory): "
                        "samples its EMA generator.", flag_values=FLAGS)
_ = flags.DEFINE_string("images", None, "A folder of PNG/JPEG images (searched recursively, "
                        "natural-sorted by path: img2 before img10).", flag_values=FLAGS)
_ = flags.DEFINE_string("npz", None, "An .npz holding uint8 images as 'arr_0' or 'images', NHWC "
                        "or NCHW.", flag_values=FLAGS)
_ = flags.DEFINE_string("tfds", None, "make-ref only: a prepared TFDS dataset NAME:SPLIT (read "
                        "offline from --data_dir).", flag_values=FLAGS)
_ = flags.DEFINE_string("data_dir", None, "TFDS data directory for --tfds.", flag_values=FLAGS)
_ = flags.DEFINE_string("image_key", "image", "Feature name of the image in --tfds examples.",
                        flag_values=FLAGS)
_ = flags.DEFINE_string("inception", None, "pytorch-fid's pt_inception-2015-12-05-6726825d.pth or "
                        "an .npz of its state dict.", flag_values=FLAGS)
_ = flags.DEFINE_string("ref", None, "Reference statistics .npz (EDM fid-refs or make-ref "
                        "output).", flag_values=FLAGS)
_ = flags.DEFINE_string("out", None, "make-ref: where to write the statistics (.npz).",
                        flag_values=FLAGS)
_ = flags.DEFINE_bool("save_features", False, "make-ref: also store the pool features (needed "
                      "by --metrics pr,kid).", flag_values=FLAGS)
_ = flags.DEFINE_integer("num", None, "Number of images: generated for --checkpoint (default: "
                         "the protocol's count), the first N otherwise (default: all).",
                         flag_values=FLAGS)
_ = flags.DEFINE_list("metrics", ["fid"], "Any of fid, is, pr, kid; clip (text-to-image "
                      "samples, with --clip_model and --captions); gmm (Gaussian-mixture teacher "
                      "checkpoints only).", flag_values=FLAGS)
_ = flags.DEFINE_string("fid_protocol", protocols.DEFAULT_FOR_METRIC["fid"], "FID protocol: "
                        "edm-fid50k, sid-fid50k-full (EDM / SiD), pytorch-fid50k or "
                        "coco2014-fid30k-clean (SiD-LSG's COCO FID; --images of any size).",
                        flag_values=FLAGS)
_ = flags.DEFINE_integer("batch", 64, "Detector batch (a multiple of the device count); also "
                         "the CLIP model's images per jitted call.", flag_values=FLAGS)
_ = flags.DEFINE_string("clip_model", None, "--metrics clip: a Hugging Face CLIPModel folder "
                        "(config.json, model.safetensors or pytorch_model.bin, tokenizer files), "
                        "e.g. a local copy of laion/CLIP-ViT-g-14-laion2B-s12B-b42K.",
                        flag_values=FLAGS)
_ = flags.DEFINE_string("clip_tokenizer", None, "--metrics clip: the CLIP tokenizer's folder "
                        "(vocab.json, merges.txt) if it is not --clip_model.", flag_values=FLAGS)
_ = flags.DEFINE_string("captions", None, "--metrics clip: a UTF-8 text file, one caption per "
                        "line; the image of seed s pairs with line s (as recorded by "
                        "sid_jax.sample, or by --seeds).", flag_values=FLAGS)
_ = flags.DEFINE_string("seeds", None, "--metrics clip on samples that do not record their "
                        "prompts: the seeds of the images in reading order (natural-sorted "
                        "--images, array order of --npz), e.g. 0-29999 or 1,5,9; the image of "
                        "seed s pairs with caption line s.", flag_values=FLAGS)
_ = flags.DEFINE_string("clip_protocol", clip_score.PROTOCOLS[0], "--metrics clip: 'sid-lsg' = "
                        "the CLIP score SiD-LSG reports (protocol coco2014-clip30k-vitg14: "
                        "captions prefixed with 'A photo depicts ', GigaGAN/open_clip "
                        "preprocessing: centre crop, LANCZOS to 256, uint8 round trip, BICUBIC "
                        "to the model's size); 'plain' = the in-training metric (protocol "
                        "clip-plain: no prefix, bicubic straight to the model's size).",
                        flag_values=FLAGS)
_ = flags.DEFINE_integer("seed", 0, "--checkpoint: the first seed (images use seeds seed..seed+num-1, "
                         "as `sid_jax.sample --seeds` and the in-loop evaluation).",
                         flag_values=FLAGS)
_ = flags.DEFINE_integer("step", None, "--checkpoint: which step (default: the latest).",
                         flag_values=FLAGS)
_ = flags.DEFINE_integer("is_splits", 10, "Inception Score splits.", flag_values=FLAGS)
_ = flags.DEFINE_integer("pr_k", 3, "Precision/recall neighbourhood size.", flag_values=FLAGS)
_ = flags.DEFINE_integer("kid_subsets", 100, "KID subsets.", flag_values=FLAGS)
_ = flags.DEFINE_integer("kid_subset_size", 1000, "KID subset size.", flag_values=FLAGS)
_ = flags.DEFINE_string("json_out", None, "Also append the JSON line to this file.",
                        flag_values=FLAGS)

COMMANDS = ("evaluate", "make-ref")
INCEPTION_METRICS = ("fid", "is", "pr", "kid")
KNOWN_METRICS = INCEPTION_METRICS + ("clip", "gmm")
# What `sid_jax.convert.clip_params.read_state_dict` looks for, and the slow CLIPTokenizer's files.
CLIP_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                     "pytorch_model.bin.index.json")
CLIP_TOKENIZER_FILES = ("vocab.json", "merges.txt")


class EvaluationError(ValueError):
  """A setting or input that cannot be evaluated; the message says what to change."""


@dataclasses.dataclass
class CheckpointGenerator:
  """The EMA generator of a training checkpoint, ready to sample."""
  run: Any  # run.Run rebuilt from the checkpoint's config
  params: Any
  step: int
  directory: str


def _checkpoint_dir(path: str) -> str:
  if not os.path.isdir(path):
    raise FileNotFoundError(f"--checkpoint {path!r} is not a directory.")
  inner = os.path.join(path, "checkpoints")
  return os.path.abspath(inner if os.path.isdir(inner) else path)


def restore_generator(path: str, step: int | None = None) -> CheckpointGenerator:
  """Rebuilds the run from the checkpoint's own config and restores its EMA generator."""
  directory = _checkpoint_dir(path)
  ckpt = checkpoints.Checkpointer(directory, every_steps=1, keep=None, async_save=False)
  try:
    available = ckpt.all_steps()
    if not available:
      raise EvaluationError(f"No checkpoints in {directory} (expected step directories written "
                            "by `python -m sid_jax.main`).")
    if step is None:
      step = max(available)
    elif step not in available:
      raise EvaluationError(f"--step={step} is not in {directory}; available: {available}.")
    meta = ckpt.read_meta(step)
    if "config" not in meta:
      raise EvaluationError(f"Checkpoint {directory}/{step} has no config in its metadata.")
    config = ml_collections.ConfigDict(meta["config"])
    if config.get("method") == "sid_lsg":
      raise EvaluationError(
          f"{directory} is a SiD-LSG (text-to-image) run: its samples need prompts. Generate "
          "them with `python -m sid_jax.sample --workdir RUN --prompts CAPTIONS --outdir OUT` "
          "and evaluate with --images OUT (--metrics fid,clip --captions CAPTIONS).")
    run = run_lib.build_run(config)
    restored, _ = ckpt.restore(step, run_lib.abstract_checkpoint(run), config.to_dict())
  finally:
    ckpt.close()
  return CheckpointGenerator(run=run, params=restored["state"].generator_ema, step=step,
                             directory=directory)


def checkpoint_source(gen: CheckpointGenerator, num: int, seed: int) -> ImageSource:
  """`num` samples of the EMA generator from seeds seed..seed+num-1, exported as uint8."""
  run = gen.run
  seeds = run_lib.eval_seeds(seed, num)
  chunk = run.config.eval.batch

  def batches(size):
    del size  # the generator's batch is config.eval.batch
    for _, x, _ in run.generator.batches(seeds, params=gen.params, batch=chunk):
      yield images.to_uint8(x)

  extra = {"step": gen.step, "generator": "EMA",
           "inputs": f"seeds {seed}..{seed + num - 1} (generators.Generator: z = "
                     f"normal(key(seed)), scaled by sid.sigma_init={run.config.sid.sigma_init} "
                     "in the generator; "
                     + ("class = randint(fold_in(key(seed), 1)))" if run.setup.label_dim
                        else "unconditional)"),
           "to_uint8": "clip(x * 127.5 + 128, 0, 255) truncated (the official export)",
           "teacher": run.teacher.info}
  return ImageSource("checkpoint", gen.directory, num, tuple(run.generator.image_shape), batches,
                     extra=extra)


# ---------------------------------------------------------------------------------------------
# CLIP score inputs: the model folder and the captions, checked before anything heavy is loaded.
# ---------------------------------------------------------------------------------------------

# The model of the registered 'sid-lsg' protocol, open_clip ViT-g-14 (laion2b_s12b_b42k), as its
# Hugging Face config describes it.
VITG14_SHAPE = {"image_size": 224, "patch_size": 14, "vision_layers": 40, "vision_width": 1408,
                "text_layers": 24, "text_width": 1024, "projection_dim": 1024}


@dataclasses.dataclass
class ClipInputs:
  """The checked `--metrics clip` settings.

  Attributes:
    model_dir: the Hugging Face CLIPModel folder (absolute path).
    tokenizer_dir: the tokenizer's folder (absolute path; `model_dir` unless --clip_tokenizer).
    captions_path: the captions file (absolute path).
    captions: its captions, one per line, in file order.
    preprocess: 'sid-lsg' or 'plain' (`clip_score.PROTOCOLS`).
    protocol: the registered protocol of `preprocess`.
    model_info: the folders and the model's sizes (from config.json), recorded with the score.
    notes: caveats printed with the score.
    pairing: how images were paired with captions (`paired_captions`), printed with the score.
  """
  model_dir: str
  tokenizer_dir: str
  captions_path: str
  captions: list[str]
  preprocess: str
  protocol: protocols.Protocol
  model_info: dict[str, Any]
  notes: list[str] = dataclasses.field(default_factory=list)
  pairing: str = ""


def read_captions(path: str) -> list[str]:
  """`--captions`: `prompts.read_prompt_lines` (the reader of `sid_jax.sample --prompts` too)."""
  try:
    return prompts_lib.read_prompt_lines(path)
  except ValueError as e:  # not UTF-8: the message names the file and the line
    raise EvaluationError(f"--captions {e}") from None


def check_clip_inputs(kind: str) -> ClipInputs:
  """Checks the `--metrics clip` flags and files and reads the captions; loads no weights.

  Args:
    kind: the image source flag: 'images' or 'npz' ('checkpoint' is refused).

  Returns:
    The checked settings.

  Raises:
    EvaluationError: naming the flag to change.
  """
  if kind == "checkpoint":
    raise EvaluationError(
        "--metrics clip does not take --checkpoint: a SiD training checkpoint stores no captions "
        "to pair its samples with. Generate the text-to-image samples, then pass them with "
        "--images DIR or --npz FILE and their prompts with --captions FILE.")
  if FLAGS.clip_protocol not in clip_score.PROTOCOLS:
    raise EvaluationError(f"--clip_protocol={FLAGS.clip_protocol!r}: expected sid-lsg (the CLIP "
                          "score SiD-LSG reports) or plain (the in-training metric).")
  missing = [f"--{name}" for name in ("clip_model", "captions") if not FLAGS[name].value]
  if missing:
    raise EvaluationError(
        f"--metrics clip needs {' and '.join(missing)}: --clip_model DIR is a Hugging Face "
        "CLIPModel folder (config.json, weights, tokenizer files), --captions FILE holds one "
        "caption per line in image order.")

  model_dir = os.path.abspath(FLAGS.clip_model)
  if not os.path.isdir(model_dir):
    raise EvaluationError(f"--clip_model {FLAGS.clip_model!r} is not a directory.")
  if not os.path.isfile(os.path.join(model_dir, "config.json")):
    raise EvaluationError(f"--clip_model {model_dir} has no config.json: expected a Hugging Face "
                          "CLIPModel folder, e.g. a local copy of "
                          "laion/CLIP-ViT-g-14-laion2B-s12B-b42K.")
  if not any(os.path.isfile(os.path.join(model_dir, name)) for name in CLIP_WEIGHT_FILES):
    raise EvaluationError(f"--clip_model {model_dir} has no weights: looked for "
                          f"{', '.join(CLIP_WEIGHT_FILES)}.")
  try:
    model = clip.clip_model_from_hf_config(clip_params.read_config(model_dir))
  except ValueError as e:  # also a config.json that is not JSON
    raise EvaluationError(f"--clip_model {model_dir}/config.json: {e}") from None

  tokenizer_flag = "--clip_tokenizer" if FLAGS.clip_tokenizer else "--clip_model"
  tokenizer_dir = os.path.abspath(FLAGS.clip_tokenizer or FLAGS.clip_model)
  if not os.path.isdir(tokenizer_dir):
    raise EvaluationError(f"--clip_tokenizer {FLAGS.clip_tokenizer!r} is not a directory.")
  absent = [name for name in CLIP_TOKENIZER_FILES
            if not os.path.isfile(os.path.join(tokenizer_dir, name))]
  if absent:
    hint = "" if FLAGS.clip_tokenizer else "; pass --clip_tokenizer DIR if it lives elsewhere"
    raise EvaluationError(f"{tokenizer_flag} {tokenizer_dir} has no {' and no '.join(absent)} "
                          f"(the CLIP tokenizer's files){hint}.")

  captions_path = os.path.abspath(FLAGS.captions)
  if not os.path.isfile(captions_path):
    raise EvaluationError(f"--captions {FLAGS.captions!r} does not exist (expected a text file, "
                          "one caption per line).")
  captions = read_captions(captions_path)
  if not captions:
    raise EvaluationError(f"--captions {captions_path} holds no captions.")

  text, vision = model.text_model, model.vision_model
  shape = {"image_size": vision.image_size, "patch_size": vision.patch_size,
           "vision_layers": vision.num_hidden_layers, "vision_width": vision.hidden_size,
           "text_layers": text.num_hidden_layers, "text_width": text.hidden_size,
           "projection_dim": model.projection_dim}
  preprocess = FLAGS.clip_protocol
  notes = []
  if preprocess == "sid-lsg" and shape != VITG14_SHAPE:
    differ = ", ".join(f"{k}={v} (ViT-g-14: {VITG14_SHAPE[k]})" for k, v in shape.items()
                       if v != VITG14_SHAPE[k])
    notes.append(f"the CLIP model is not ViT-g-14 ({differ}): not comparable with SiD-LSG's "
                 "reported CLIP score")
  return ClipInputs(model_dir=model_dir, tokenizer_dir=tokenizer_dir,
                    captions_path=captions_path, captions=captions, preprocess=preprocess,
                    protocol=protocols.get(clip_score.REGISTERED[preprocess]),
                    model_info={"path": model_dir, "tokenizer": tokenizer_dir, **shape},
                    notes=notes)


def paired_captions(inputs: ClipInputs, source: ImageSource, num: int | None) -> list[str]:
  """The caption of each of `source`'s images (`sid_jax.evaluation.pairing.caption_pairs`: by
  the prompts the samples record, else by --seeds); says how in `inputs.pairing`.

  Raises:
    EvaluationError: naming the flag or file when the pairing is unknown or does not fit.
  """
  seeds = None
  if FLAGS.seeds:
    try:
      seeds = cli.parse_seeds(FLAGS.seeds)
    except ValueError as e:
      raise EvaluationError(str(e)) from None
  try:
    captions, how = pairing.caption_pairs(inputs.captions, inputs.captions_path, source, seeds,
                                          num is not None)
  except SourceError as e:
    raise EvaluationError(str(e)) from None
  inputs.pairing = how
  return captions


def clip_result(inputs: ClipInputs, source: ImageSource, captions: list[str],
                batch: int) -> dict[str, Any]:
  """Loads the CLIP model and scores `source` against `captions`, `batch` images at a time.

  Returns:
    The result record: metric 'clip', `clip_score` (the mean raw cosine similarity over the
    images), the protocol's fields (the registered protocol derived with the image count), the
    model, the captions file and notes.
  """
  logging.info("Loading the CLIP model from %s.", inputs.model_dir)
  scorer = clip_score.load_scorer(inputs.model_dir, inputs.tokenizer_dir,
                                  protocol=inputs.preprocess, batch_size=batch)
  logging.info("Computing the CLIP score (%s) of %d images from %s.", inputs.preprocess,
               source.num, source.path)
  cosines, start = [], 0
  for images in source.rgb_batches(batch):
    cosines.append(scorer.score(images, captions[start:start + len(images)])["per_image"])
    start += len(images)
  per_image = np.concatenate(cosines)
  protocol = inputs.protocol.derive(num_samples=len(per_image))
  return {"metric": "clip", "clip_score": float(np.mean(per_image, dtype=np.float64)),
          **protocol.fields(), "clip_model": inputs.model_info,
          "captions_path": inputs.captions_path, "caption_pairing": inputs.pairing,
          "clip_notes": inputs.notes,
          "input_notes": source.notes}


# ---------------------------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------------------------


def _parse_metrics(names: list[str]) -> list[str]:
  metrics = [m.strip().lower() for m in names if m.strip()]
  unknown = sorted(set(metrics) - set(KNOWN_METRICS))
  if unknown or not metrics:
    raise EvaluationError(f"--metrics={','.join(names)}: expected some of "
                          f"{','.join(KNOWN_METRICS)}.")
  return list(dict.fromkeys(metrics))


def _fid_protocol(name: str) -> protocols.Protocol:
  p = protocols.get(name)
  if p.metric != "fid":
    raise EvaluationError(f"--fid_protocol={name!r} is a {p.metric!r} protocol, not an FID one.")
  if not p.implemented:
    raise EvaluationError(f"Protocol {name!r} is registered for naming only; sid_jax does not "
                          f"compute it ({p.notes}).")
  return p


def _batches_with_progress(source: ImageSource):
  """The source's RGB batches of --batch images; rate and ETA go to the log (sid_jax.progress)."""
  report = progress.Progress("evaluate: Inception features", source.num)
  return progress.iterate(source.rgb_batches(FLAGS.batch), report, size=len)


def _load_ref(path: str) -> metrics_lib.RefStats:
  """`--ref`: any file that is not readable statistics (empty, truncated, not an .npz) is one
  EvaluationError naming it."""
  try:
    return metrics_lib.load_ref_stats(path)
  except FileNotFoundError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # np.load's own errors (EOFError for an empty file, BadZipFile, pickled data...) name no file.
    message = " ".join(str(e).split())
    if path in message:
      raise EvaluationError(message) from None
    raise EvaluationError(f"--ref {path} is not readable reference statistics (an .npz with "
                          f"'mu' and 'sigma'): {type(e).__name__}: {message}") from None


def _check_ref(ref: metrics_lib.RefStats, protocol: protocols.Protocol,
               weights_hash: str | None) -> None:
  try:
    metrics_lib.check_ref_fits(ref, protocol, weights_hash)
  except ValueError as e:
    raise EvaluationError(str(e)) from None


def _load_detector(path: str | None, mesh, batch: int,
                   front_end: str) -> tuple[features_lib.InceptionFeatures, dict]:
  variables = features_lib.load_inception_variables(path)
  detector = features_lib.InceptionFeatures(variables, mesh, batch_size=batch,
                                            front_end=front_end)
  return detector, {"path": os.path.abspath(path), "sha256": detector.weights_hash,
                    "front_end": front_end}


def _front_end(metrics: list[str], fid_protocol: protocols.Protocol) -> str:
  """The one front-end of this run's Inception metrics (one feature stream serves them all)."""
  wanted = {m: (fid_protocol if m == "fid" else protocols.get(protocols.DEFAULT_FOR_METRIC[m]))
            for m in metrics if m in INCEPTION_METRICS}
  ends = {p.front_end for p in wanted.values()}
  if len(ends) > 1:
    names = ", ".join(f"{m}: {p.name} ({p.front_end})" for m, p in wanted.items())
    raise EvaluationError(f"--metrics {','.join(wanted)} need different Inception front-ends "
                          f"({names}); evaluate them in separate runs.")
  return ends.pop() if ends else fid_protocol.front_end


def _image_folder(directory: str, num: int | None, front_end: str) -> ImageSource:
  """--images: one size and mode, or any sizes (converted to RGB) for the host-resizing
  front-end of coco2014-fid30k-clean."""
  return folder_source(directory, num, mixed_sizes=front_end == "gigagan-clean-fid")


def _default_mesh():
  return sharding.make_mesh({"data": -1, "fsdp": 1})


def _check_batch(batch: int, mesh) -> None:
  shards = sharding.batch_size_divisor(mesh)
  if batch <= 0 or batch % shards:
    raise EvaluationError(f"--batch={batch} must be a positive multiple of the {shards} devices.")


def _source_flags(allowed: tuple[str, ...]) -> str:
  given = [name for name in ("checkpoint", "images", "npz", "tfds") if FLAGS[name].value]
  if len(given) != 1 or given[0] not in allowed:
    raise EvaluationError(f"Give exactly one of {', '.join('--' + a for a in allowed)}; got "
                          f"{', '.join('--' + g for g in given) or 'none'}.")
  return given[0]


def evaluate_command() -> dict[str, Any]:
  """`python -m sid_jax.evaluate --checkpoint|--images|--npz ...`: checks, then computes."""
  metrics = _parse_metrics(FLAGS.metrics)
  kind = _source_flags(("checkpoint", "images", "npz"))
  if "gmm" in metrics and kind != "checkpoint":
    raise EvaluationError("--metrics gmm needs --checkpoint (a run with the GMM teacher).")
  inception_metrics = [m for m in metrics if m in INCEPTION_METRICS]
  clip_flags = [f"--{name}" for name in ("clip_model", "clip_tokenizer", "captions", "seeds")
                if FLAGS[name].value]
  if clip_flags and "clip" not in metrics:
    raise EvaluationError(f"{', '.join(clip_flags)} only serve --metrics clip; add clip to "
                          f"--metrics={','.join(metrics)}.")
  clip_inputs = check_clip_inputs(kind) if "clip" in metrics else None

  # Protocols, reference and settings: everything is checked before any image is touched.
  fid_protocol = _fid_protocol(FLAGS.fid_protocol)
  front_end = _front_end(metrics, fid_protocol)
  ref = None
  needs_ref = [m for m in metrics if m in ("fid", "pr", "kid")]
  if needs_ref:
    if not FLAGS.ref:
      raise EvaluationError(f"--metrics {','.join(needs_ref)} need reference statistics: pass "
                            "--ref STATS.npz (EDM fid-refs, or `python -m sid_jax.evaluate "
                            "make-ref ... --out STATS.npz`).")
    ref = _load_ref(FLAGS.ref)
    if ref.mu.shape[0] != 2048:
      raise EvaluationError(f"--ref {ref.path} holds {ref.mu.shape[0]}-d statistics; the "
                            "Inception pool features are 2048-d.")
    _check_ref(ref, fid_protocol, None)
    if {"pr", "kid"} & set(metrics) and ref.features is None:
      raise EvaluationError(f"--metrics pr/kid need the reference features, but {ref.path} holds "
                            "only mu/sigma: rebuild it with `make-ref ... --save_features`.")
  if FLAGS.num is not None and FLAGS.num <= 0:
    raise EvaluationError(f"--num must be positive, got {FLAGS.num}.")
  if "is" in metrics and FLAGS.num is not None and FLAGS.num < FLAGS.is_splits:
    raise EvaluationError(f"--metrics is with --is_splits={FLAGS.is_splits} needs --num >= "
                          f"{FLAGS.is_splits}, got {FLAGS.num}.")

  gen = None
  if kind == "checkpoint":
    gen = restore_generator(FLAGS.checkpoint, FLAGS.step)
    mesh = gen.run.mesh
    if "gmm" in metrics and gen.run.config.teacher.type != "gmm":
      raise EvaluationError(f"--metrics gmm needs a GMM-teacher run; {gen.directory} has "
                            f"teacher.type={gen.run.config.teacher.type!r}.")
  else:
    mesh = _default_mesh()
  _check_batch(FLAGS.batch, mesh)

  source = None
  if inception_metrics or clip_inputs is not None:
    if kind == "checkpoint":
      num = FLAGS.num or protocols.get(
          protocols.DEFAULT_FOR_METRIC[inception_metrics[0]]).num_samples
      source = checkpoint_source(gen, num, FLAGS.seed)
    elif kind == "images":
      source = _image_folder(FLAGS.images, FLAGS.num, front_end)
    else:
      source = npz_source(FLAGS.npz, FLAGS.num)
    if "is" in metrics and source.num < FLAGS.is_splits:
      raise EvaluationError(f"--metrics is with --is_splits={FLAGS.is_splits} needs at least "
                            f"{FLAGS.is_splits} images; {source.path} gives {source.num}.")
  captions = None
  if clip_inputs is not None:
    captions = paired_captions(clip_inputs, source, FLAGS.num)

  detector, weights = None, None
  if inception_metrics:
    detector, weights = _load_detector(FLAGS.inception, mesh, FLAGS.batch, front_end)
    if ref is not None:
      _check_ref(ref, fid_protocol, detector.weights_hash)

  results = []
  if inception_metrics:
    keep = (["pool"] if {"pr", "kid"} & set(metrics) else []) + (
        ["logits_unbiased"] if "is" in metrics else [])
    logging.info("Computing Inception features of %d images from %s.", source.num, source.path)
    stream = detector.stream(_batches_with_progress(source), keep=keep, log_every=50)
    n = stream.num
    common = {"input_notes": source.notes}
    for metric in inception_metrics:
      if metric == "fid":
        p = fid_protocol.derive(num_samples=n)
        value = metrics_lib.fid_from_moments(stream.moments.mean(),
                                             stream.moments.cov(p.param("cov_ddof")), ref.mu,
                                             ref.sigma, sqrtm_rule=p.param("sqrtm"))
        results.append({"metric": "fid", "fid": value, **p.fields(), **ref.describe(), **common})
      elif metric == "is":
        p = protocols.get(protocols.DEFAULT_FOR_METRIC["is"]).derive(num_samples=n,
                                                                     splits=FLAGS.is_splits)
        mean, std = metrics_lib.inception_score(stream.features["logits_unbiased"],
                                                p.param("splits"))
        results.append({"metric": "is", "is_mean": mean, "is_std": std, **p.fields(), **common})
      elif metric == "pr":
        p = protocols.get(protocols.DEFAULT_FOR_METRIC["pr"]).derive(num_samples=n, k=FLAGS.pr_k)
        pr = metrics_lib.precision_recall(ref.features, stream.features["pool"], p.param("k"))
        results.append({"metric": "pr", **pr, **p.fields(), **ref.describe(), **common})
      elif metric == "kid":
        size = metrics_lib.kid_subset_size(ref.features.shape[0], n, FLAGS.kid_subset_size)
        p = protocols.get(protocols.DEFAULT_FOR_METRIC["kid"]).derive(
            num_samples=n, num_subsets=FLAGS.kid_subsets, subset_size=size)
        value = metrics_lib.kid(ref.features, stream.features["pool"], p.param("num_subsets"),
                                p.param("subset_size"), p.param("seed"))
        results.append({"metric": "kid", "kid": value, **p.fields(), **ref.describe(), **common})

  if clip_inputs is not None:
    results.append(clip_result(clip_inputs, source, captions, FLAGS.batch))

  if "gmm" in metrics:
    values = run_lib.evaluate(gen.run, gen.params)
    p = protocols.get(protocols.DEFAULT_FOR_METRIC["gmm"]).derive(
        num_samples=gen.run.config.eval.num_samples)
    results.append({"metric": "gmm", **values, **p.fields(),
                    "seed": gen.run.config.eval.seed})

  if source is None and gen is not None:
    source = checkpoint_source(gen, gen.run.config.eval.num_samples, gen.run.config.eval.seed)
  record = {"command": "evaluate", "source": source.describe(), "results": results}
  if weights is not None:
    record["detector_weights"] = weights
  return record


def make_ref_command() -> dict[str, Any]:
  """`python -m sid_jax.evaluate make-ref ...`: reference statistics from real images."""
  kind = _source_flags(("images", "npz", "tfds"))
  if not FLAGS.out:
    raise EvaluationError("make-ref needs --out STATS.npz.")
  if not FLAGS.out.endswith(".npz"):
    raise EvaluationError(f"--out must end in .npz, got {FLAGS.out!r}.")
  protocol = _fid_protocol(FLAGS.fid_protocol)
  if kind == "images":
    source = _image_folder(FLAGS.images, FLAGS.num, protocol.front_end)
  elif kind == "npz":
    source = npz_source(FLAGS.npz, FLAGS.num)
  else:
    source = tfds_source(FLAGS.tfds, FLAGS.data_dir, FLAGS.image_key, FLAGS.num)
  if source.num < 2:
    raise EvaluationError(f"Reference statistics need at least 2 images, got {source.num}.")
  mesh = _default_mesh()
  _check_batch(FLAGS.batch, mesh)
  detector, weights = _load_detector(FLAGS.inception, mesh, FLAGS.batch, protocol.front_end)
  keep = ("pool",) if FLAGS.save_features else ()
  stream = detector.stream(_batches_with_progress(source), keep=keep, log_every=50)
  description = json.dumps(source.describe(), sort_keys=True, default=str)
  if jax.process_index() == 0:
    metrics_lib.save_ref_stats(FLAGS.out, stream.moments.mean(),
                               stream.moments.cov(protocol.param("cov_ddof")), protocol,
                               stream.num, features=stream.features.get("pool"),
                               detector_hash=detector.weights_hash, source=description)
  return {"command": "make-ref", "out": os.path.abspath(FLAGS.out), "num": stream.num,
          "features_saved": bool(FLAGS.save_features), "source": source.describe(),
          "detector_weights": weights, **protocol.fields()}


# ---------------------------------------------------------------------------------------------
# Output.
# ---------------------------------------------------------------------------------------------

_VALUE_KEYS = {"fid": ("fid",), "is": ("is_mean", "is_std"), "pr": ("precision", "recall"),
               "kid": ("kid",), "clip": ("clip_score",),
               "gmm": ("frechet_distance", "nearest_component_accuracy")}


def _fmt(value) -> str:
  return f"{value:.6g}" if isinstance(value, float) else str(value)


def markdown(record: dict[str, Any]) -> str:
  """The record as a Markdown table (plus one line per protocol with its full definition)."""
  if record["command"] == "make-ref":
    lines = ["| reference statistics | images | protocol | features saved |", "|---|---|---|---|",
             f"| {record['out']} | {record['num']} | {record['protocol']} | "
             f"{record['features_saved']} |"]
    protos = [record]
  else:
    lines = ["| metric | value | protocol | samples | reference |", "|---|---|---|---|---|"]
    for r in record["results"]:
      values = ", ".join(f"{k}={_fmt(r[k])}" for k in _VALUE_KEYS[r["metric"]] if k in r)
      reference = r.get("ref_path") or r.get("captions_path") or r["reference"]
      lines.append(f"| {r['metric']} | {values} | {r['protocol']} | {r['num_samples']} | "
                   f"{reference} |")
    protos = record["results"]
  lines.append("")
  seen = set()
  for p in protos:
    if p["protocol"] in seen:
      continue
    seen.add(p["protocol"])
    params = ", ".join(f"{k}={v}" for k, v in p["params"].items()) or "-"
    lines.append(f"- `{p['protocol']}`: detector {p['detector']}; resize {p['resize']}; "
                 f"reference {p['reference']}; {p['num_samples']} samples; {params}."
                 + ("" if p["standard_protocol"] else " (derived: not the registered protocol)"))
    if "clip_model" in p:
      lines.append(f"  CLIP model {p['clip_model']['path']} (tokenizer "
                   f"{p['clip_model']['tokenizer']}); captions {p['captions_path']}"
                   + "".join(f"; {note}" for note in [p["caption_pairing"]] + p["clip_notes"])
                   + ".")
  notes = record["source"].get("notes")
  if notes:
    lines.append(f"- input: {'; '.join(notes)}.")
  return "\n".join(lines)


def execute(args: list[str]) -> dict[str, Any]:
  """Runs the command named by the positional `args` with the parsed FLAGS; prints JSON + table."""
  args = list(args[1:])
  if len(args) > 1 or (args and args[0] not in COMMANDS):
    raise EvaluationError(f"Unexpected arguments {args}; the only subcommand is make-ref.")
  command = args[0] if args else "evaluate"
  try:
    record = make_ref_command() if command == "make-ref" else evaluate_command()
  except SourceError as e:  # an input the sources cannot read: the same message, the CLI's type
    raise EvaluationError(str(e)) from e
  if jax.process_index() == 0:
    line = json.dumps(record, default=str)
    print(line)
    print()
    print(markdown(record))
    sys.stdout.flush()
    if FLAGS.json_out:
      with open(FLAGS.json_out, "a") as f:
        f.write(line + "\n")
  return record


def run(argv: list[str]) -> dict[str, Any]:
  """Parses `argv` (argv[0] is the program name) and executes it; returns the printed record.

  The in-process entry point (tests, notebooks): errors are raised, not turned into exit codes.
  """
  FLAGS.unparse_flags()
  return execute(FLAGS(list(argv)))


def main(argv: list[str]) -> None:
  if os.environ.get("SID_JAX_DISTRIBUTED", "0") == "1":
    jax.distributed.initialize()
  cli.report_errors("sid_jax.evaluate", lambda: execute(argv))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parser(FLAGS, __doc__, "sid_jax.evaluate"))
