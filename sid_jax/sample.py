"""Generation from a distilled generator: class-conditional one-step, or text-to-image (SiD-LSG).

  python -m sid_jax.sample --workdir DIR --seeds 0-49999 --outdir OUT [--class 3] [--npz]
  python -m sid_jax.sample --checkpoint GENERATOR_DIR --seeds 0-63 --outdir OUT
  python -m sid_jax.sample --workdir LSG_RUN --prompts FILE --seeds 0-29999 --outdir OUT \\
      [--steps 1] [--custom_seed] [--batch 16] [--npz] [--init_timestep 625] [--latents Z.npy]

`--workdir` is a distillation run's directory (its exported EMA generator, DIR/generator);
`--checkpoint` is any network checkpoint of a generator (e.g. a converted SiD release). The kind
of generator is read from the checkpoint's network.json.

Class-conditional / unconditional generators (EDM / EDM2 students, network.json has
'sigma_init'): each image depends only on its seed: the latent is drawn from
`jax.random.key(seed)` and, unless `--class` is given, its class from the same key (uniform over
classes) — not on the batch size or the number of devices. PNGs are written as OUT/<seed>.png
(six digits), and with `--npz` all images go to OUT/images.npz (`arr_0`: uint8 NHWC, `labels`,
`seeds`) for FID tools.

Text-to-image generators (class_name 'StableDiffusion': a SiD-LSG run's export, whose spec holds
`kwargs.generator.init_timestep`) follow the official generation (lsg_spec §7): one image per seed,
`--prompts` (one prompt per line) is required.
* Default seeding: the prompt of seed s is line s of the file (0-based) and its file is
  OUT/<s:06d>.png. With `--custom_seed` the listed seeds are only random seeds: the i-th listed
  seed gets prompt line i and file OUT/<i:06d>.png.
* Latents: z = jax.random.normal(jax.random.key(s), (h, w, 4)) (NHWC); with `--steps k > 1` the
  fresh noise of step i >= 1 is jax.random.normal(jax.random.fold_in(jax.random.key(s), i)), and
  the timesteps are t_i = floor(t_init (1 - i / k)). The official code draws z from a CUDA torch
  Philox stream, which JAX cannot reproduce: to compare with official images, dump its latents
  and pass `--latents FILE.npy`, shape [N, 4, h, w] (NCHW, as saved from torch) or [N, h, w, 4],
  one per listed seed in order.
* Images: uint8(clip(x * 127.5 + 128, 0, 255)) (truncation), decoded by the VAE (512 x 512 for
  SD 1.5 / 2.1-base). `--npz` writes OUT/images.npz (`arr_0` uint8 NHWC, `seeds`, `prompts`,
  `prompt_lines`), streamed batch by batch. OUT/generation.json records the settings and, under
  "images", each file's seed, prompt line and prompt (`t2i_image_entries`), which
  `sid_jax.evaluate --metrics clip` pairs with the captions.
* Every batch has the same size (the last one is padded), so one compiled program serves the run,
  and each image is a function of its seed, prompt and latent only, not of `--batch`.
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Any, Sequence

from absl import app, flags
import jax
import numpy as np

from sid_jax import checkpoints, cli, generators, images, progress
from sid_jax.data import prompts as prompts_lib
from sid_jax.models import stable_diffusion

GENERATOR_DIR = "generator"
GENERATION_RECORD = "generation.json"
NPZ_NAME = "images.npz"
CLASS_BATCH = generators.ClassGenerator.default_batch
T2I_BATCH = generators.TextToImageGenerator.default_batch


parse_seeds = cli.parse_seeds  # '0-3,7,10-11' -> [0, 1, 2, 3, 7, 10, 11]


def assign_prompts(seeds: Sequence[int], prompt_lines: Sequence[str], path: str,
                   custom_seed: bool) -> tuple[list[str], list[int]]:
  """(prompt, file number) of every listed seed under the official seeding rule.

  Args:
    seeds: the listed seeds, in order.
    prompt_lines: the prompt file's lines.
    path: the prompt file (for messages).
    custom_seed: False: seed s takes line s and file number s; True: the i-th seed takes line i
      and file number i (the seeds are only random seeds).

  Returns:
    The prompts and file numbers, one per seed.

  Raises:
    ValueError: if a seed (or, with custom_seed, a position) has no line, or two seeds would
      write the same file.
  """
  n = len(prompt_lines)
  if custom_seed:
    if len(seeds) > n:
      raise ValueError(f"--custom_seed with {len(seeds)} seeds takes prompt lines "
                       f"0..{len(seeds) - 1}, but --prompts {path} has only {n} lines.")
    return list(prompt_lines[:len(seeds)]), list(range(len(seeds)))
  for s in seeds:
    if s >= n:
      raise ValueError(f"Seed {s} has no prompt: --prompts {path} has {n} lines, for seeds "
                       f"0..{n - 1} (seed s takes line s). Pass --custom_seed to use the listed "
                       "seeds only as random seeds, with lines 0..N-1.")
  if len(set(seeds)) != len(seeds):
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    raise ValueError(f"--seeds lists {twice} more than once (each seed writes <seed>.png).")
  return [prompt_lines[s] for s in seeds], list(seeds)


def t2i_image_entries(seeds: Sequence[int], names: Sequence[int],
                      prompts: Sequence[str]) -> list[dict[str, Any]]:
  """generation.json's "images": per image, its file, seed, prompt line (= file number under
  both seeding rules) and prompt."""
  return [{"file": f"{name:06d}.png", "seed": int(seed), "prompt_line": int(name),
           "prompt": prompt} for seed, name, prompt in zip(seeds, names, prompts)]


def read_latents(path: str, num: int, latent_shape: tuple[int, int, int]) -> np.ndarray:
  """Memory-mapped [N, h, w, c] latents of a `--latents` .npy file (NCHW files are transposed).

  Args:
    path: the .npy file: [N, c, h, w] (as dumped from torch) or [N, h, w, c].
    num: the number of listed seeds (N must equal it).
    latent_shape: (h, w, c) of the generator.

  Returns:
    An array view [N, h, w, c] (any float dtype; cast per batch).

  Raises:
    FileNotFoundError, ValueError: missing file, wrong shape or count.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--latents {path!r}: no such file.")
  z = np.load(path, mmap_mode="r", allow_pickle=False)
  h, w, c = latent_shape
  if z.ndim == 4 and tuple(z.shape[1:]) == (h, w, c):
    pass
  elif z.ndim == 4 and tuple(z.shape[1:]) == (c, h, w):
    z = z.transpose(0, 2, 3, 1)
  else:
    raise ValueError(f"--latents {path}: shape {tuple(z.shape)}; expected [N, {c}, {h}, {w}] "
                     f"(NCHW) or [N, {h}, {w}, {c}] (NHWC).")
  if z.shape[0] != num:
    raise ValueError(f"--latents {path} holds {z.shape[0]} latents for {num} listed seeds (one "
                     "per seed, in the listed order).")
  if not np.issubdtype(z.dtype, np.floating):
    raise ValueError(f"--latents {path}: dtype {z.dtype} is not floating point.")
  return z


class NpzStream:
  """Writes an .npz whose `arr_0` (uint8) arrives batch by batch, so that the 30k images of an
  evaluation run are never held in memory; other arrays are added on `close`. The file appears
  under its name only once complete."""

  def __init__(self, path: str, shape: Sequence[int]):
    self.path, self.shape, self.count = path, tuple(shape), 0
    self._tmp = path + ".partial"
    self._zip = zipfile.ZipFile(self._tmp, "w", zipfile.ZIP_STORED, allowZip64=True)
    self._arr = self._zip.open("arr_0.npy", "w", force_zip64=True)
    np.lib.format.write_array_header_1_0(
        self._arr, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                    "fortran_order": False, "shape": self.shape})

  def write(self, images_u8: np.ndarray) -> None:
    if images_u8.dtype != np.uint8 or images_u8.shape[1:] != self.shape[1:]:
      raise ValueError(f"NpzStream: got {images_u8.dtype} {images_u8.shape}, expected uint8 "
                       f"[n, {', '.join(map(str, self.shape[1:]))}].")
    self._arr.write(np.ascontiguousarray(images_u8).tobytes())
    self.count += len(images_u8)

  def close(self, **arrays) -> None:
    self._arr.close()
    if self.count != self.shape[0]:
      self.abort()
      raise ValueError(f"NpzStream: {self.count} images written, {self.shape[0]} announced.")
    for name, value in arrays.items():
      with self._zip.open(f"{name}.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array(f, np.asarray(value), allow_pickle=False)
    self._zip.close()
    os.replace(self._tmp, self.path)

  def abort(self) -> None:
    try:
      self._arr.close()
      self._zip.close()
    finally:
      if os.path.exists(self._tmp):
        os.remove(self._tmp)


def resolve_generator_dir(workdir: str | None, checkpoint: str | None) -> str:
  if bool(workdir) == bool(checkpoint):
    raise ValueError("Give exactly one of --workdir (a distillation run) or --checkpoint "
                     "(a generator network checkpoint).")
  if checkpoint:
    return checkpoint
  path = os.path.join(workdir, GENERATOR_DIR)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{workdir!r} has no exported generator ({GENERATOR_DIR}/): the run "
                            "writes it when it finishes or is stopped.")
  return path


FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "Distillation workdir (uses WORKDIR/generator).",
                    flag_values=FLAGS)
flags.DEFINE_string("checkpoint", None, "Generator network checkpoint directory.",
                    flag_values=FLAGS)
flags.DEFINE_string("seeds", "0-63", "Seeds, e.g. 0-49999 or 1,5,9.", flag_values=FLAGS)
flags.DEFINE_string("outdir", None, "Where to write the images.", flag_values=FLAGS)
flags.DEFINE_integer("class", None, "Class for every image (default: random per seed).",
                     flag_values=FLAGS)
flags.DEFINE_integer("batch", None, f"Images per generator call (default {CLASS_BATCH}, "
                     f"text-to-image {T2I_BATCH}); results do not depend on it.",
                     flag_values=FLAGS)
flags.DEFINE_bool("npz", False, f"Also write OUT/{NPZ_NAME}.", flag_values=FLAGS)
flags.DEFINE_bool("png", True, "Write one PNG per seed.", flag_values=FLAGS)
flags.DEFINE_string("prompts", None, "Text-to-image: prompt file, one prompt per line (seed s "
                    "takes line s; with --custom_seed the i-th seed takes line i).",
                    flag_values=FLAGS)
flags.DEFINE_bool("custom_seed", False, "Text-to-image: the seeds are only random seeds; "
                  "prompts and file names use positions 0..N-1.", flag_values=FLAGS)
flags.DEFINE_integer("steps", 1, "Text-to-image: generation steps k (t_i = floor(t_init "
                     "(1 - i/k))).", flag_values=FLAGS)
flags.DEFINE_integer("init_timestep", None, "Text-to-image: t_init (default: the "
                     "generator's, 625 for SiD-LSG).", flag_values=FLAGS)
flags.DEFINE_float("progress_secs", progress.DEFAULT_EVERY_SECS, "Seconds between progress "
                   "lines (rate, ETA) on the log; 0 = after every batch.", flag_values=FLAGS)
flags.DEFINE_string("latents", None, "Text-to-image: .npy of latents [N, 4, h, w] (NCHW) or "
                    "[N, h, w, 4], one per listed seed, instead of jax.random ones.",
                    flag_values=FLAGS)


def _write_record(outdir: str, record: dict[str, Any]) -> None:
  with open(os.path.join(outdir, GENERATION_RECORD), "w", encoding="utf-8") as f:
    json.dump(record, f, indent=2)
    f.write("\n")


def run_text_to_image(directory: str, *, outdir: str, seeds: str, prompts: str | None,
                      custom_seed: bool = False, steps: int = 1, init_timestep: int | None = None,
                      latents: str | None = None, batch: int | None = None, npz: bool = False,
                      png: bool = True, mesh=None,
                      progress_secs: float = progress.DEFAULT_EVERY_SECS) -> str:
  """The text-to-image command (see the module docstring); returns the output directory."""
  spec = checkpoints.load_network_spec(directory)
  if not prompts:
    raise ValueError(f"--prompts is required: {directory!r} is a text-to-image (Stable "
                     "Diffusion) generator; give a prompt file, one prompt per line.")
  t_init, t_origin = generators.resolve_init_timestep(directory, spec, init_timestep)
  if steps < 1:
    raise ValueError(f"--steps must be at least 1, got {steps}.")
  seed_list = parse_seeds(seeds)
  if max(seed_list) >= 2**31:
    raise ValueError(f"--seeds: {max(seed_list)} is too large (seeds are int32).")
  lines = prompts_lib.read_prompt_lines(prompts)
  prompt_list, names = assign_prompts(seed_list, lines, prompts, custom_seed)
  if latents is not None and not os.path.isfile(latents):
    raise FileNotFoundError(f"--latents {latents!r}: no such file.")

  gen = generators.load(directory, mesh=mesh, init_timestep=t_init)
  z = None if latents is None else read_latents(latents, len(seed_list), gen.latent_shape)
  os.makedirs(outdir, exist_ok=True)
  sched = stable_diffusion.scheduler_settings(spec["kwargs"]["scheduler"])
  record = {
      "checkpoint": os.path.abspath(directory),
      "network_json_sha256": checkpoints.hash_path(
          os.path.join(directory, checkpoints.NETWORK_SPEC)),
      "kind": "text-to-image",
      "init_timestep": t_init, "init_timestep_from": t_origin,
      "steps": steps, "timesteps": gen.timesteps(steps),
      "num_train_timesteps": sched["num_train_timesteps"],
      "prompts": os.path.abspath(prompts), "prompt_lines": len(lines),
      "seeds": seeds, "num_images": len(seed_list),
      "seeding": ("custom_seed: the i-th listed seed is only a random seed; prompt line i, "
                  "file <i:06d>.png") if custom_seed else
                 "default: seed s takes prompt line s and writes <s:06d>.png",
      "latents": os.path.abspath(latents) if latents else
                 "jax.random.normal(jax.random.key(seed), (h, w, c)); step i >= 1 noise: "
                 "jax.random.normal(jax.random.fold_in(jax.random.key(seed), i), (h, w, c))",
      "latent_shape": list(gen.latent_shape),
      "image_conversion": "uint8(clip(x * 127.5 + 128, 0, 255)), truncated",
      "png": png, "npz": npz, "jax_version": jax.__version__,
      # The latents of jax.random.normal depend on this setting (True by default in new JAX).
      "jax_threefry_partitionable": bool(jax.config.jax_threefry_partitionable),
      "images": t2i_image_entries(seed_list, names, prompt_list),
  }
  _write_record(outdir, record)

  stream = None
  count = 0
  report = progress.Progress("sample", len(seed_list), every_secs=progress_secs)
  try:
    for start, x, _ in gen.batches(seed_list, prompt_list, steps, latents=z,
                                   batch=batch or T2I_BATCH):
      u8 = images.to_uint8(x)
      if npz and stream is None:
        stream = NpzStream(os.path.join(outdir, NPZ_NAME), (len(seed_list),) + u8.shape[1:])
      if stream is not None:
        stream.write(u8)
      if png:
        for name, img in zip(names[start:start + len(u8)], u8):
          images.save_png(os.path.join(outdir, f"{name:06d}.png"), img)
      count += len(u8)
      report.update(count)
    if stream is not None:
      stream.close(seeds=np.asarray(seed_list, np.int64), prompts=np.asarray(prompt_list, str),
                   prompt_lines=np.asarray(names, np.int64))
      stream = None
  finally:
    if stream is not None:
      stream.abort()
  print(f"[sid_jax] wrote {len(seed_list)} images to {outdir}")
  return outdir


def run(*, outdir: str, seeds: str, workdir: str | None = None, checkpoint: str | None = None,
        class_idx: int | None = None, batch: int | None = None, npz: bool = False,
        png: bool = True, prompts: str | None = None, custom_seed: bool = False, steps: int = 1,
        init_timestep: int | None = None, latents: str | None = None, mesh=None,
        progress_secs: float = progress.DEFAULT_EVERY_SECS) -> str:
  """What the command does; returns the output directory.

  The generator's network.json decides the mode: a Stable Diffusion model is sampled as a
  text-to-image generator (`run_text_to_image`; `prompts` required), anything else as a
  class-conditional / unconditional one-step generator. `mesh` defaults to all devices.
  Progress (rate, ETA) is logged every `progress_secs` seconds (0: every batch).
  """
  directory = resolve_generator_dir(workdir, checkpoint)
  if batch is not None and batch <= 0:
    raise ValueError(f"--batch must be positive, got {batch}.")
  if progress_secs < 0:
    raise ValueError(f"--progress_secs must be >= 0, got {progress_secs}.")
  spec = checkpoints.load_network_spec(directory)
  if generators.is_text_to_image(spec):
    if class_idx is not None:
      raise ValueError(f"--class is for class-conditional generators; {directory!r} is a "
                       "text-to-image generator (use --prompts).")
    return run_text_to_image(directory, outdir=outdir, seeds=seeds, prompts=prompts,
                             custom_seed=custom_seed, steps=steps, init_timestep=init_timestep,
                             latents=latents, batch=batch, npz=npz, png=png, mesh=mesh,
                             progress_secs=progress_secs)
  t2i_only = {"--prompts": prompts is not None, "--custom_seed": custom_seed,
              "--steps": steps != 1, "--init_timestep": init_timestep is not None,
              "--latents": latents is not None}
  given = [name for name, on in t2i_only.items() if on]
  if given:
    raise ValueError(f"{', '.join(given)}: text-to-image options, but {directory!r} is a "
                     f"{spec.get('class_name')!r} generator (class-conditional or "
                     "unconditional, one step).")
  seed_list = parse_seeds(seeds)
  gen = generators.load(directory, mesh=mesh)
  if class_idx is not None and not gen.label_dim:
    raise ValueError("--class given, but this generator is unconditional.")
  if class_idx is not None and not 0 <= class_idx < gen.label_dim:
    raise ValueError(f"--class {class_idx} is out of range for label_dim={gen.label_dim}.")
  report = progress.Progress("sample", len(seed_list), every_secs=progress_secs)
  parts = list(progress.iterate(gen.batches(seed_list, class_idx, batch=batch or CLASS_BATCH),
                                report, size=lambda part: len(part[1])))
  u8 = images.to_uint8(np.concatenate([x for _, x, _ in parts]))
  labels = np.concatenate([l for _, _, l in parts])
  os.makedirs(outdir, exist_ok=True)
  if png:
    for seed, img in zip(seed_list, u8):
      images.save_png(os.path.join(outdir, f"{seed:06d}.png"), img)
  if npz:
    np.savez(os.path.join(outdir, NPZ_NAME), arr_0=u8, labels=labels,
             seeds=np.asarray(seed_list))
  print(f"[sid_jax] wrote {len(seed_list)} images to {outdir}")
  return outdir


def execute(args: list[str]) -> str:
  """Runs the command with the parsed FLAGS; returns the output directory."""
  if len(args) > 1:
    raise ValueError(f"Unexpected arguments {args[1:]}.")
  f = FLAGS
  if not f.outdir:
    raise ValueError("--outdir is required.")
  return run(outdir=f.outdir, seeds=f.seeds, workdir=f.workdir, checkpoint=f.checkpoint,
             class_idx=f["class"].value, batch=f.batch, npz=f.npz, png=f.png, prompts=f.prompts,
             custom_seed=f.custom_seed, steps=f.steps, init_timestep=f.init_timestep,
             latents=f.latents, progress_secs=f.progress_secs)


def main(argv: list[str]) -> None:
  cli.report_errors("sid_jax.sample", lambda: execute(argv))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parser(FLAGS, __doc__, "sid_jax.sample"))
