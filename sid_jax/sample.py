"""One-step generation from a distilled generator.

  python -m sid_jax.sample --workdir DIR --seeds 0-49999 --outdir OUT [--class 3] [--npz]
  python -m sid_jax.sample --checkpoint GENERATOR_DIR --seeds 0-63 --outdir OUT

`--workdir` is a distillation run's directory (its exported EMA generator, DIR/generator);
`--checkpoint` is any network checkpoint of a generator (e.g. a converted SiD release).
Each image depends only on its seed: the latent is drawn from `jax.random.key(seed)` and, unless
`--class` is given, its class from the same key (uniform over classes) — not on the batch size or
the number of devices. PNGs are written as OUT/<seed>.png (six digits), and with `--npz` all
images go to OUT/images.npz (`arr_0`: uint8 NHWC, `labels`, `seeds`) for FID tools.
"""

from __future__ import annotations

import os
import re

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from sid_jax import checkpoints, images, models, sharding

GENERATOR_DIR = "generator"


def parse_seeds(text: str) -> list[int]:
  """'0-3,7,10-11' -> [0, 1, 2, 3, 7, 10, 11]."""
  seeds = []
  for part in text.split(","):
    part = part.strip()
    m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
    if not m:
      raise ValueError(f"Bad --seeds entry {part!r}: use e.g. 0-49999 or 1,5,9.")
    lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
    if hi < lo:
      raise ValueError(f"Bad --seeds range {part!r}: the end is before the start.")
    seeds.extend(range(lo, hi + 1))
  if not seeds:
    raise ValueError("--seeds is empty.")
  return seeds


class Generator:
  """A one-step generator loaded from a network checkpoint (spec + params + sigma_init)."""

  def __init__(self, directory: str, mesh=None):
    self.spec = checkpoints.load_network_spec(directory)
    if "sigma_init" not in self.spec:
      raise ValueError(f"{directory!r} is a network checkpoint but not a one-step generator "
                       "(its network.json has no 'sigma_init').")
    self.sigma_init = float(self.spec["sigma_init"])
    self.denoiser = models.build_denoiser(self.spec)
    res, _, ch, self.label_dim = models.spec_image_shape(self.spec)
    self.image_shape = (res, res, ch)
    self.params = checkpoints.load_network_params(
        directory, models.abstract_params(self.denoiser, self.image_shape, self.label_dim))
    self.mesh = mesh or sharding.make_mesh({"data": -1})
    param_sh = sharding.param_shardings(self.mesh, self.params)
    self.params = jax.device_put(self.params, param_sh)
    batch = sharding.batch_sharding(self.mesh)
    self._fn = jax.jit(self._generate, in_shardings=(param_sh, batch, batch), out_shardings=batch)

  def _generate(self, params, seeds, classes):
    keys = jax.vmap(jax.random.key)(seeds)
    z = jax.vmap(lambda k: jax.random.normal(k, self.image_shape, jnp.float32))(keys)
    labels = None
    if self.label_dim:
      drawn = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 1), (), 0,
                                                    self.label_dim))(keys)
      labels = jax.nn.one_hot(jnp.where(classes >= 0, classes, drawn), self.label_dim)
    sigma = jnp.full((seeds.shape[0],), self.sigma_init, jnp.float32)
    x = self.denoiser(params, self.sigma_init * z, sigma, labels)
    return x, (jnp.argmax(labels, -1) if labels is not None else jnp.full_like(seeds, -1))

  def __call__(self, seeds, class_idx: int | None = None, batch: int = 256):
    """Images in [-1, 1] [N, H, W, C] and their class ids (-1 if unconditional), host numpy."""
    if class_idx is not None and not 0 <= class_idx < max(self.label_dim, 1):
      raise ValueError(f"--class {class_idx} is out of range for label_dim={self.label_dim}.")
    if class_idx is not None and not self.label_dim:
      raise ValueError("--class given, but this generator is unconditional.")
    shards = sharding.batch_size_divisor(self.mesh)
    batch = max(shards, batch // shards * shards)
    seeds = np.asarray(seeds, np.int32)
    xs, ls = [], []
    for start in range(0, len(seeds), batch):
      chunk = seeds[start:start + batch]
      pad = batch - len(chunk)
      padded = np.concatenate([chunk, np.zeros(pad, np.int32)])
      classes = np.full(batch, -1 if class_idx is None else class_idx, np.int32)
      with jax.set_mesh(self.mesh):
        x, l = self._fn(self.params, padded, classes)
      xs.append(np.asarray(jax.device_get(x))[:len(chunk)])
      ls.append(np.asarray(jax.device_get(l))[:len(chunk)])
    return np.concatenate(xs), np.concatenate(ls)


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


def _define_flags():
  """Flags exist only when this module is the program (so importing it never clashes)."""
  flags.DEFINE_string("workdir", None, "Distillation workdir (uses WORKDIR/generator).")
  flags.DEFINE_string("checkpoint", None, "Generator network checkpoint directory.")
  flags.DEFINE_string("seeds", "0-63", "Seeds, e.g. 0-49999 or 1,5,9.")
  flags.DEFINE_string("outdir", None, "Where to write the images.")
  flags.DEFINE_integer("class", None, "Class for every image (default: random per seed).")
  flags.DEFINE_integer("batch", 256, "Images per generator call.")
  flags.DEFINE_bool("npz", False, "Also write OUT/images.npz.")
  flags.DEFINE_bool("png", True, "Write one PNG per seed.")


def run(*, outdir: str, seeds: str, workdir: str | None = None, checkpoint: str | None = None,
        class_idx: int | None = None, batch: int = 256, npz: bool = False,
        png: bool = True) -> str:
  """What the command does; returns the output directory."""
  gen = Generator(resolve_generator_dir(workdir, checkpoint))
  seed_list = parse_seeds(seeds)
  x, labels = gen(seed_list, class_idx, batch)
  u8 = images.to_uint8(x)
  os.makedirs(outdir, exist_ok=True)
  if png:
    for seed, img in zip(seed_list, u8):
      images.save_png(os.path.join(outdir, f"{seed:06d}.png"), img)
  if npz:
    np.savez(os.path.join(outdir, "images.npz"), arr_0=u8, labels=labels,
             seeds=np.asarray(seed_list))
  print(f"[sid_jax] wrote {len(seed_list)} images to {outdir}")
  return outdir


def main(argv):
  del argv
  f = flags.FLAGS
  if not f.outdir:
    raise app.UsageError("--outdir is required.")
  run(outdir=f.outdir, seeds=f.seeds, workdir=f.workdir, checkpoint=f.checkpoint,
      class_idx=f["class"].value, batch=f.batch, npz=f.npz, png=f.png)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
