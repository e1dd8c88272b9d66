"""Metrics for the digits demo: Fréchet distance in a digits classifier's feature space, and that
classifier's accuracy on generated images against the requested class.

The classifier ships with the package (`sid_jax/assets/digits_classifier`) and is reproduced by

  python -m sid_jax.evaluation.digits --out sid_jax/assets/digits_classifier

It is trained on half A of the fixed split of `sid_jax.data.digits`; reference statistics are
the features of half A, and the "real digits" row of the metric table is half B.
"""

from __future__ import annotations

import functools
import os

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sid_jax import checkpoints, samplers
from sid_jax.data import digits as digits_data
from sid_jax.evaluation import frechet
from sid_jax.nets.classifier import DigitsClassifier

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
DEFAULT_CLASSIFIER = os.path.join(ASSETS, "digits_classifier")
PROTOCOL = "digits-classifier-fd"


def train_classifier(seed: int = 0, steps: int = 3000, batch: int = 128, lr: float = 2e-3):
  """Trains DigitsClassifier on half A with small random shifts; returns (params, accuracy_b)."""
  (xa, ya), (xb, yb) = digits_data.split_halves()
  model = DigitsClassifier()
  params = model.init(jax.random.key(seed), jnp.zeros((1, 8, 8, 1)))["params"]
  tx = optax.adamw(lr, weight_decay=1e-4)
  opt = tx.init(params)
  xa_d, ya_d = jnp.asarray(xa), jnp.asarray(ya)

  @jax.jit
  def step(params, opt, key):
    k_idx, k_shift, k_drop = jax.random.split(key, 3)
    idx = jax.random.randint(k_idx, (batch,), 0, xa_d.shape[0])
    x = xa_d[idx]
    # Random shifts of up to one pixel (background is -1) make the features less brittle.
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1.0)
    dy, dx = jax.random.randint(k_shift, (2,), 0, 3)
    x = jax.lax.dynamic_slice(padded, (0, dy, dx, 0), x.shape)

    def loss_fn(p):
      logits = model.apply({"params": p}, x, train=True, rngs={"dropout": k_drop})["logits"]
      return optax.softmax_cross_entropy_with_integer_labels(logits, ya_d[idx]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  for i in range(steps):
    params, opt, loss = step(params, opt, jax.random.fold_in(jax.random.key(seed), i))
    if i % 500 == 0:
      logging.info("classifier step %d loss %.4f", i, float(loss))
  logits = model.apply({"params": params}, jnp.asarray(xb))["logits"]
  accuracy = float(np.mean(np.argmax(np.asarray(logits), -1) == yb))
  return params, accuracy


@functools.lru_cache(maxsize=4)
def load_classifier(directory: str = DEFAULT_CLASSIFIER):
  spec = checkpoints.load_network_spec(directory)
  if spec.get("class_name") != "DigitsClassifier":
    raise ValueError(f"{directory!r} holds a {spec.get('class_name')!r}, not a DigitsClassifier.")
  model = DigitsClassifier(**spec["kwargs"])
  abstract = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 8, 8, 1)))["params"],
                            jax.random.key(0))
  params = checkpoints.load_network_params(directory, abstract)
  apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
  return apply, params


class DigitsEvaluator:
  """Features / accuracy of [-1, 1] 8x8 digits with the shipped classifier."""

  def __init__(self, directory: str = DEFAULT_CLASSIFIER):
    self.apply, self.params = load_classifier(directory)
    (xa, _), (xb, yb) = digits_data.split_halves()
    self.ref_mu, self.ref_sigma = frechet.feature_moments(self.features(xa)[0])
    self.real_b = (xb, yb)

  def features(self, images: np.ndarray, batch: int = 512):
    feats, logits = [], []
    for i in range(0, len(images), batch):
      out = self.apply(self.params, jnp.asarray(images[i:i + batch], jnp.float32))
      feats.append(np.asarray(out["features"], np.float64))
      logits.append(np.asarray(out["logits"]))
    return np.concatenate(feats), np.concatenate(logits)

  def metrics(self, images: np.ndarray, labels: np.ndarray | None) -> dict:
    """{'frechet_distance', 'classifier_accuracy' (if labels), 'num_images', 'protocol'}."""
    images = np.asarray(images, np.float32)
    if images.shape[1:] != (8, 8, 1):
      raise ValueError(f"Digits metrics need [N, 8, 8, 1] images, got {images.shape}.")
    finite = np.all(np.isfinite(images.reshape(len(images), -1)), axis=1)
    if not finite.all():
      return {"frechet_distance": float("nan"), "nonfinite_sample_fraction": 1 - finite.mean(),
              "protocol": PROTOCOL}
    # Generated images are exported as uint8 and read back, as any saved sample would be.
    images = np.clip(np.floor(images * 127.5 + 128.0), 0, 255) / 127.5 - 1.0
    feats, logits = self.features(images)
    mu, sigma = frechet.feature_moments(feats)
    out = {"frechet_distance": frechet.frechet_distance(mu, sigma, self.ref_mu, self.ref_sigma),
           "num_images": int(len(images)), "protocol": PROTOCOL}
    if labels is not None:
      out["classifier_accuracy"] = float(np.mean(np.argmax(logits, -1) == np.asarray(labels)))
    return out

  def real_metrics(self) -> dict:
    xb, yb = self.real_b
    return self.metrics(xb, yb)


def metric_table(generator, seeds: np.ndarray, classes: np.ndarray, rows_params, *,
                 teacher=None, batch: int = 256, mesh=None) -> list[dict]:
  """The digits demo's table: real data, the teacher with EDM's Heun sampler, and one-step
  generators -- same labels, same latents (those of `seeds`), same metric.

  Args:
    generator: a `generators.ClassGenerator` (images from seeds and class ids).
    seeds, classes: one per image (the held-out half's labels).
    rows_params: [(row name, generator params)], one row each.
    teacher: optional (denoiser, params, Heun steps) for the teacher's row.
    batch: images per call.
    mesh: the mesh the teacher's sampler runs under.
  """
  ev = DigitsEvaluator()
  rows = [dict(model="real digits (held-out half)", nfe=0, **ev.real_metrics())]
  if teacher is not None:
    denoiser, params, num_steps = teacher
    z = generator.latents(seeds)
    labels = np.eye(generator.label_dim, dtype=np.float32)[classes]
    heun = jax.jit(functools.partial(samplers.edm_sampler, denoiser, num_steps=num_steps))
    with jax.set_mesh(mesh):
      x = np.concatenate([np.asarray(jax.device_get(heun(params, z[i:i + batch],
                                                         labels[i:i + batch])))
                          for i in range(0, len(z), batch)])
    rows.append(dict(model=f"teacher, EDM Heun sampler ({num_steps} steps)",
                     nfe=samplers.heun_nfe(num_steps), **ev.metrics(x, classes)))
  for name, params in rows_params:
    x = generator.generate(seeds, classes, params=params, batch=batch)
    rows.append(dict(model=name, nfe=1, **ev.metrics(x, classes)))
  return rows


def table_markdown(rows: list[dict]) -> str:
  lines = ["| model | NFE | Fréchet distance (classifier features) ↓ | classifier accuracy ↑ |",
           "|---|---|---|---|"]
  for r in rows:
    acc = r.get("classifier_accuracy")
    lines.append(f"| {r['model']} | {r['nfe'] or '—'} | {r['frechet_distance']:.3f} | "
                 f"{'—' if acc is None else f'{100 * acc:.1f} %'} |")
  return "\n".join(lines)


def main(argv):
  del argv
  f = flags.FLAGS
  params, accuracy = train_classifier(steps=f.steps)
  spec = {"class_name": "DigitsClassifier", "kwargs": {},
          "trained_on": "sklearn digits, half A of sid_jax.data.digits.split_halves(seed=0)",
          "held_out_accuracy": accuracy}
  checkpoints.save_network(f.out, params, spec)
  print(f"[sid_jax] digits classifier: held-out accuracy {accuracy:.4f}; written to {f.out}")


if __name__ == "__main__":
  # Flags exist only when this module is the program, so importing it never clashes.
  flags.DEFINE_string("out", DEFAULT_CLASSIFIER, "Where to write the classifier.")
  flags.DEFINE_integer("steps", 3000, "Training steps.")
  app.run(main)
