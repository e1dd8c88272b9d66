"""Inception features of uint8 images, computed on a device mesh.

`InceptionFeatures` runs `sid_jax.nets.inception.FIDInceptionV3` (pytorch-fid's weights, imported
strictly by `sid_jax.weights.inception`) with the batch split over every mesh axis. Each
call pads the last batch to the fixed batch size (so one program serves every batch) and brings
the features to the host once, as float64. `InceptionFeatures.stream` consumes batches from any
iterable (a generator sampling a model, a folder reader, ...) and accumulates the FID moments in
float64 on the host, keeping the per-image features only when asked to.

Every extractor runs one front-end (`sid_jax.nets.inception.FRONT_ENDS`, named by the protocol):
'tf1-bilinear' (NVIDIA's TorchScript: EDM, StyleGAN3, SiD) and 'pytorch-fid' resize on the device
and take uint8 batches of one size; 'gigagan-clean-fid' (SiD-LSG's COCO FID) resizes each image on
the host with PIL (`gigagan_clean_fid_input`), so its batches may be lists of images of any size.

The detector's weights never come from the network: `load_inception_variables` reads a local
`.pth` (needs torch) or an `.npz` of the same state dict, and says where the file comes from when
it is missing.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Iterable, Iterator, Sequence

from absl import logging
import jax
import numpy as np
from PIL import Image

from sid_jax import checkpoints, sharding
from sid_jax.weights import inception as inception_weights
from sid_jax.weights import readers
from sid_jax.nets import inception

FEATURE_KEYS = ("pool", "logits_unbiased")

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               + WEIGHTS_FILE)
WEIGHTS_HELP = (
    f"The FID detector needs pytorch-fid's Inception-v3 weights, {WEIGHTS_FILE} (the TF "
    f"2015-12-05 Inception graph ported to PyTorch; published at {WEIGHTS_URL}). sid_jax never "
    "downloads: fetch that file where you have network access and pass its path with "
    "--inception=PATH (reading a .pth needs torch), or convert it once to an .npz that needs no "
    "torch: python -c \"import numpy as np; from sid_jax.weights import readers; "
    f"np.savez('fid_inception.npz', **readers.read_torch('{WEIGHTS_FILE}'))\"")


def load_inception_variables(path: str | None) -> dict[str, Any]:
  """FIDInceptionV3 variables from pytorch-fid's `.pth` or an `.npz` of that state dict.

  Raises:
    FileNotFoundError: no path given or no such file (the message names the needed file).
    ValueError: an unknown file type, or a state dict that does not fit (every key named).
  """
  if not path:
    raise FileNotFoundError("No Inception weights given. " + WEIGHTS_HELP)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Inception weights {path!r} do not exist. " + WEIGHTS_HELP)
  if not path.endswith((".npz", ".pth", ".pt")):
    raise ValueError(f"Inception weights must be a .pth or .npz state dict, got {path!r}. "
                     + WEIGHTS_HELP)
  state_dict = readers.read_file(path)
  module = inception.FIDInceptionV3()
  shape = (1, inception.FID_INPUT_SIZE, inception.FID_INPUT_SIZE, 3)
  return inception_weights.torch_state_dict_to_flax(state_dict, module, shape)


def check_images(images: np.ndarray, what: str = "images") -> np.ndarray:
  """Validates uint8 [N, H, W, 3] host images (the detector's input) and returns them."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(f"{what}: expected uint8 images, got {images.dtype}.")
  if images.ndim != 4 or images.shape[-1] != 3 or min(images.shape[1:3]) < 1:
    raise ValueError(f"{what}: expected uint8 RGB images [N, H, W, 3], got shape {images.shape} "
                     "(repeat grey channels to 3 first).")
  return images


# ---------------------------------------------------------------------------------------------
# The host part of the 'gigagan-clean-fid' front-end.
# ---------------------------------------------------------------------------------------------

GIGAGAN_RESOLUTION = 256


def gigagan_crop_resize(image: np.ndarray) -> np.ndarray:
  """GigaGAN's `compute_fid` transform of one uint8 RGB image: centre crop of the long edge to a
  square (torchvision `center_crop`), then PIL LANCZOS to 256x256 (a copy when already 256)."""
  from sid_jax.evaluation import clip_score  # pylint: disable=g-import-not-at-top
  pil = Image.fromarray(image)
  pil = clip_score._centre_crop(pil, min(pil.size))  # pylint: disable=protected-access
  pil = pil.resize((GIGAGAN_RESOLUTION, GIGAGAN_RESOLUTION), Image.LANCZOS)
  return np.asarray(pil)


def clean_resize(image: np.ndarray, size: int = inception.FID_INPUT_SIZE) -> np.ndarray:
  """clean-fid's "clean" resize of one uint8 [H, W, 3] image: float32 [size, size, 3] in [0, 255].

  Each channel becomes a float32 PIL image (mode 'F', no quantisation), is resized with PIL's
  BICUBIC filter (which antialiases: its support widens with the downscale factor) and clipped to
  [0, 255]; the channels are stacked back.
  """
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"clean_resize expects one uint8 [H, W, 3] image, got {image.dtype} "
                     f"{image.shape}.")
  channels = []
  for c in range(3):
    pil = Image.fromarray(image[:, :, c].astype(np.float32), mode="F")
    pil = pil.resize((size, size), resample=Image.BICUBIC)
    channels.append(np.asarray(pil, np.float32).clip(0, 255))
  return np.stack(channels, axis=-1)


def gigagan_clean_fid_input(image: np.ndarray) -> np.ndarray:
  """The host part of 'gigagan-clean-fid': uint8 RGB [H, W, 3] of any size -> float32 [299, 299, 3]
  in [0, 255] (`gigagan_crop_resize`, then `clean_resize`)."""
  return clean_resize(gigagan_crop_resize(image))


def _rgb(image: np.ndarray, what: str) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f"{what}: expected a uint8 [H, W, 1 or 3] image, got {image.dtype} "
                     f"{image.shape}.")
  return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def host_input(batch: Any, front_end: str, what: str = "images") -> np.ndarray:
  """What the device program of `front_end` takes, from one host batch.

  `batch` is a uint8 [n, H, W, 3] array or a list of uint8 [H, W, C] images. 'tf1-bilinear' and
  'pytorch-fid' resize on the device and need one size (returns uint8 [n, H, W, 3]);
  'gigagan-clean-fid' resizes each image here (returns float32 [n, 299, 299, 3] in [0, 255]).
  """
  if front_end not in inception.FRONT_ENDS:
    raise ValueError(f"Unknown Inception front-end {front_end!r}; expected one of "
                     f"{inception.FRONT_ENDS}.")
  if front_end == "gigagan-clean-fid":
    if isinstance(batch, np.ndarray) and batch.ndim != 4:
      raise ValueError(f"{what}: expected uint8 images [N, H, W, 3], got shape {batch.shape}.")
    images = [gigagan_clean_fid_input(_rgb(image, what)) for image in batch]
    if not images:
      return np.zeros((0, inception.FID_INPUT_SIZE, inception.FID_INPUT_SIZE, 3), np.float32)
    return np.stack(images)
  if not isinstance(batch, np.ndarray):
    if not len(batch):
      return np.zeros((0, 1, 1, 3), np.uint8)
    shapes = sorted({np.asarray(image).shape for image in batch})
    if len(shapes) > 1:
      raise ValueError(f"{what}: images of several sizes {shapes[:3]}...; the {front_end!r} "
                       "front-end takes one size (only coco2014-fid30k-clean's takes any size).")
    batch = np.stack([np.asarray(image) for image in batch])
  return check_images(batch, what)


class FeatureMoments:
  """Running mean and covariance of feature rows in float64, without keeping the rows.

  Sums are taken around a shift (the first batch's mean), which keeps the covariance as accurate
  as a two-pass computation when the mean is large relative to the spread.
  """

  def __init__(self):
    self.num = 0
    self._shift = None
    self._sum = None
    self._outer = None

  def update(self, rows: np.ndarray) -> None:
    rows = np.asarray(rows, np.float64)
    if rows.ndim != 2:
      raise ValueError(f"Expected [N, D] feature rows, got shape {rows.shape}.")
    if rows.shape[0] == 0:
      return
    if self._shift is None:
      self._shift = rows.mean(axis=0)
      self._sum = np.zeros_like(self._shift)
      self._outer = np.zeros((rows.shape[1], rows.shape[1]))
    centred = rows - self._shift
    self._sum += centred.sum(axis=0)
    self._outer += centred.T @ centred
    self.num += rows.shape[0]

  def mean(self) -> np.ndarray:
    if not self.num:
      raise ValueError("No features were accumulated.")
    return self._shift + self._sum / self.num

  def cov(self, ddof: int = 1) -> np.ndarray:
    if self.num <= ddof:
      raise ValueError(f"A covariance with ddof={ddof} needs more than {ddof} rows, got "
                       f"{self.num}.")
    offset = self._sum / self.num
    cov = (self._outer - self.num * np.outer(offset, offset)) / (self.num - ddof)
    return (cov + cov.T) / 2


@dataclasses.dataclass
class StreamResult:
  """What `InceptionFeatures.stream` returns: pool-feature moments and the kept features."""
  moments: FeatureMoments
  features: dict[str, np.ndarray]

  @property
  def num(self) -> int:
    return self.moments.num


def _rebatch(batches: Iterable[Any], size: int, front_end: str) -> Iterator[np.ndarray]:
  """Regroups a stream of image batches of any sizes into batches of exactly `size` (the last
  one may be smaller), each already through `host_input`."""
  pending, count = [], 0
  for i, batch in enumerate(batches):
    batch = host_input(batch, front_end, f"batch {i}")
    while batch.shape[0]:
      take = min(size - count, batch.shape[0])
      pending.append(batch[:take])
      count += take
      batch = batch[take:]
      if count == size:
        yield pending[0] if len(pending) == 1 else np.concatenate(pending)
        pending, count = [], 0
  if count:
    yield np.concatenate(pending)


def _detector(variables, images, front_end):
  module = inception.FIDInceptionV3(resize_input=False, normalize_input=False)
  out = module.apply(variables, inception.front_end_input(images, front_end))
  return {key: out[key] for key in FEATURE_KEYS}


@functools.lru_cache(maxsize=None)
def _detector_program(mesh: jax.sharding.Mesh, front_end: str):
  """One jitted detector per mesh and front-end, shared by every `InceptionFeatures` on it
  (traced once per input shape)."""
  batch = sharding.batch_sharding(mesh)
  return jax.jit(functools.partial(_detector, front_end=front_end),
                 in_shardings=(sharding.replicated(mesh), batch), out_shardings=batch)


class InceptionFeatures:
  """Pool features and bias-free logits of uint8 images, batch-sharded over a mesh.

  Attributes:
    mesh: the device mesh; the batch is split over all of its axes.
    front_end: how images reach the network (`sid_jax.nets.inception.FRONT_ENDS`; a protocol's
      `front_end`). 'tf1-bilinear' by default: EDM's and SiD's.
    batch_size: the global batch of one detector call (a multiple of the mesh's batch shards).
    weights_hash: sha256 of the detector variables (recorded next to every number).
    num_gathers: how many device-to-host transfers of features have happened (one per
      `__call__`, one per batch in `stream`).
  """

  def __init__(self, variables: Any, mesh: jax.sharding.Mesh, *, batch_size: int | None = None,
               front_end: str = "tf1-bilinear"):
    if front_end not in inception.FRONT_ENDS:
      raise ValueError(f"Unknown Inception front-end {front_end!r}; expected one of "
                       f"{inception.FRONT_ENDS}.")
    shards = sharding.batch_size_divisor(mesh)
    batch_size = 8 * shards if batch_size is None else int(batch_size)
    if batch_size <= 0 or batch_size % shards:
      raise ValueError(f"The detector batch size {batch_size} must be a positive multiple of "
                       f"the mesh's {shards} batch shards.")
    self.mesh = mesh
    self.front_end = front_end
    self.batch_size = batch_size
    self.weights_hash = checkpoints.hash_tree(variables)
    self.num_gathers = 0
    self._batch_sharding = sharding.batch_sharding(mesh)
    self._variables = jax.device_put(variables, sharding.replicated(mesh))
    self._fn = _detector_program(mesh, front_end)

  def _dispatch(self, batch: np.ndarray) -> tuple[dict[str, jax.Array], int]:
    """Starts the detector on one host batch (padded to `batch_size`); returns device outputs."""
    n = batch.shape[0]
    if n < self.batch_size:
      pad = np.zeros((self.batch_size - n,) + batch.shape[1:], batch.dtype)
      batch = np.concatenate([batch, pad])
    # Every process holds the whole batch; each device takes its rows.
    array = jax.make_array_from_callback(batch.shape, self._batch_sharding,
                                         lambda index: batch[index])
    with jax.set_mesh(self.mesh):
      return self._fn(self._variables, array), n

  def _to_host(self, tree: Any) -> Any:
    self.num_gathers += 1
    leaves = jax.tree.leaves(tree)
    if all(leaf.is_fully_addressable for leaf in leaves):
      return jax.device_get(tree)
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return multihost_utils.process_allgather(tree, tiled=True)

  def __call__(self, images_uint8_nhwc: Any) -> dict[str, np.ndarray]:
    """Features of [N, H, W, 3] uint8 images (for 'gigagan-clean-fid' also a list of images of any
    size): {'pool': [N, 2048], 'logits_unbiased': [N, 1008]} as float64 host arrays, gathered
    from the devices once."""
    images = host_input(images_uint8_nhwc, self.front_end)
    n = images.shape[0]
    if n == 0:
      raise ValueError("No images given.")
    outputs = [self._dispatch(images[start:start + self.batch_size])[0]
               for start in range(0, n, self.batch_size)]
    host = self._to_host(outputs)
    return {key: np.concatenate([np.asarray(out[key]) for out in host])[:n].astype(np.float64)
            for key in FEATURE_KEYS}

  def stream(self, batches: Iterable[Any], keep: Sequence[str] = (),
             log_every: int = 0) -> StreamResult:
    """Runs the detector over a stream of uint8 [n_i, H, W, 3] batches (any counts; lists of
    images of any size for 'gigagan-clean-fid').

    The pool features' mean and covariance are accumulated in float64 (`FeatureMoments`); the
    features named in `keep` ('pool', 'logits_unbiased') are also returned, in stream order, as
    float64. The next batch is dispatched before the previous one's features are fetched.
    """
    unknown = sorted(set(keep) - set(FEATURE_KEYS))
    if unknown:
      raise ValueError(f"Unknown feature names {unknown}; expected some of {FEATURE_KEYS}.")
    moments = FeatureMoments()
    kept = {key: [] for key in keep}

    def consume(pending):
      outputs, n = pending
      host = self._to_host(outputs)
      moments.update(np.asarray(host["pool"])[:n])
      for key in keep:
        kept[key].append(np.asarray(host[key])[:n].astype(np.float64))
      if log_every and (moments.num // self.batch_size) % log_every == 0:
        logging.info("Inception features: %d images.", moments.num)

    pending = None
    for batch in _rebatch(batches, self.batch_size, self.front_end):
      current = self._dispatch(batch)
      if pending is not None:
        consume(pending)
      pending = current
    if pending is not None:
      consume(pending)
    if not moments.num:
      raise ValueError("The image stream was empty.")
    return StreamResult(moments, {key: np.concatenate(parts) for key, parts in kept.items()})
