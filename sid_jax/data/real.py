"""Real images (or EDM2 latents) for SiDA and data-conditioned SiD, streamed through `grain`.

SiDA's discriminator sees real images, and ImageNet-conditional runs take their class labels from
the data (its classes are not uniform). This module reads them without ever holding a dataset in
memory, sharded over the hosts of a multi-host run and resumable at the exact record:

* **Sources** (grain random-access data sources: `len`, `[i]`, a `repr` that identifies the
  content). `EDMImageZip`: a zip from EDM's `dataset_tool.py` (PNG files named
  `00000/img00000000.png`, labels in `dataset.json` as `{"labels": [[name, class], ...]}` or
  `null`); records are read one at a time from the zip, whose `zipfile.ZipFile` is opened lazily
  in each process that reads (never pickled into grain's workers). `EDM2LatentZip`: a zip from
  EDM2's `dataset_tool.py encode` (per image an `.npy` of the SD-VAE posterior mean and std,
  [2C, h, w] float32, `00000/img-mean-std-00000000.npy`, same `dataset.json`). `TfdsSource`: a
  prepared tensorflow-datasets split read through `tfds.data_source` (ArrayRecord, random
  access; never downloaded or prepared here). `DigitsSource`: scikit-learn's bundled digits
  (tests and the demo). `LabelsJson`: an EDM `dataset.json` alone (labels, no images: what the
  official SiD-EDM2 runs read); `LabelsOnly` reads just the labels of any source.
* **Order** (grain's `IndexSampler`): the records are split into `process_count` contiguous
  shards of equal size (the remainder is dropped); host `process_index` reads only its shard,
  reshuffled every epoch from `seed` (`shuffle=False`: file order), endlessly.
* **Records to arrays** (`_Prepare`, a grain random map): pixels -> float32 in [-1, 1]
  (`uint8 / 127.5 - 1`, spec §6.2); an EDM2 record draws a latent `mean + std * eps` with the
  record's own seeded generator (grain's per-record Philox key: the same draw when the same
  record position is replayed) and normalises it per channel as EDM2 does (spec §7.4,
  `x * final_std / raw_std + (final_mean - raw_mean * final_std / raw_std)`); labels -> one-hot
  float32 rows (vector labels as given).
* **Feed** (`RealFeed`, the interface of `lsg.PromptFeed`): `next()` returns one batch
  `{'images': [num_micro, micro, H, W, C] float32, 'labels': [num_micro, micro, label_dim]
  float32}` ('labels' only for conditional runs) as global arrays split over the mesh's batch
  axes (`jax.make_array_from_process_local_data`), each host contributing `micro /
  process_count` rows of every micro-batch. `state()` is JSON (grain's iterator state plus what
  it must match); the training loop saves it with every checkpoint and `restore` resumes the
  exact sequence. The state of any host restores every host (hosts read in lockstep; the shard
  offset is translated). A different process count or worker count cannot continue grain's
  sequence (the shards, or the per-worker split, change) and is refused with a clear error.
  SiDA pairs two such batches per iteration (`methods.sida.PairFeed`); a conditional SiD run on
  a dataset takes the labels of two batches (`LabelFeed`, `images=False`: no image decoded).

Memory: nothing grows with the number of records read; per record the zip sources keep only its
name (and label): the decoded arrays live in grain's bounded prefetch buffer
(`read_threads`, `prefetch` records) and the batch being fed.
"""

from __future__ import annotations

import io
import json
import os
import threading
import zipfile
import zlib
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np

from sid_jax import sharding

STATE_VERSION = 1
SOURCES = ("digits", "edm_zip", "edm2_latent_zip", "tfds", "labels_json")
# EDM2's normalisation of SD-VAE latents (training/encoders.py, StabilityVAEEncoder; spec §7.4).
EDM2_RAW_MEAN = (5.81, 3.25, 0.12, -2.15)
EDM2_RAW_STD = (4.17, 4.62, 3.71, 3.28)
EDM2_FINAL_MEAN = 0.0
EDM2_FINAL_STD = 0.5
_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


# ---------------------------------------------------------------------------------------------
# Sources.
# ---------------------------------------------------------------------------------------------


def _labels_from_json(path: str, names: list[str], text: bytes | None):
  """EDM's labels for `names` from a dataset.json's bytes: int64 [N] classes, float32 [N, D]
  vectors, or None (no dataset.json, or `"labels": null`)."""
  if text is None:
    return None
  try:
    entries = json.loads(text)["labels"]
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{path}: dataset.json is not EDM's format {{\"labels\": [[name, label], "
                     f"...] or null}} ({e}).") from None
  if entries is None:
    return None
  table = dict(entries)
  missing = [n for n in names if n not in table]
  if missing:
    raise ValueError(f"{path}: dataset.json has no label for {len(missing)} file(s), e.g. "
                     f"{missing[0]!r}.")
  labels = np.array([table[n] for n in names])
  del table
  if labels.ndim == 1 and np.issubdtype(labels.dtype, np.integer):
    if labels.size and labels.min() < 0:
      raise ValueError(f"{path}: dataset.json has a negative class label ({labels.min()}).")
    return labels.astype(np.int64)
  if labels.ndim == 2:
    return labels.astype(np.float32)
  raise ValueError(f"{path}: dataset.json labels must be class integers or equal-length vectors, "
                   f"got an array of shape {labels.shape} and dtype {labels.dtype}.")


def _label_record(labels, i: int) -> dict[str, Any]:
  return {} if labels is None else {"label": labels[i]}


class _ZipSource:
  """Files of one kind inside a zip, in sorted name order (as EDM's ImageFolderDataset), read one
  record at a time. The ZipFile is opened on first use in each process (its handle is dropped
  when the source is pickled into a grain worker); zipfile serialises concurrent reads of one
  handle, so grain's reader threads share it."""

  exts: tuple[str, ...] = ()
  what = ""

  def __init__(self, path: str):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"Dataset zip not found: {path}")
    self.path = path
    self._zip = None
    self._pid = None
    self._lock = threading.Lock()
    try:
      zf = self._zipfile()
    except zipfile.BadZipFile as e:
      raise ValueError(f"{path} is not a zip file ({e}).") from None
    all_names = zf.namelist()
    self.names = sorted(n for n in all_names if os.path.splitext(n)[1].lower() in self.exts)
    if not self.names:
      raise ValueError(f"{path} holds no {self.what} ({'/'.join(self.exts)} files).")
    text = zf.read("dataset.json") if "dataset.json" in all_names else None
    del all_names
    self.labels = _labels_from_json(path, self.names, text)
    first = self._decode(0)
    self.record_shape = tuple(first.shape)
    crc = zlib.crc32("\n".join(self.names).encode())
    if self.labels is not None:
      crc = zlib.crc32(np.ascontiguousarray(self.labels).tobytes(), crc)
    self._id = f"records={len(self.names)}, shape={self.record_shape}, crc32={crc:08x}"

  def _zipfile(self) -> zipfile.ZipFile:
    pid = os.getpid()
    if self._zip is None or self._pid != pid:
      with self._lock:
        if self._zip is None or self._pid != pid:
          self._zip = zipfile.ZipFile(self.path)
          self._pid = pid
    return self._zip

  def __getstate__(self):
    return dict(self.__dict__, _zip=None, _pid=None, _lock=None)

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def _read(self, i: int) -> bytes:
    return self._zipfile().read(self.names[i])

  def _decode(self, i: int) -> np.ndarray:
    raise NotImplementedError

  @property
  def vector_labels(self) -> bool:
    return self.labels is not None and self.labels.ndim == 2

  @property
  def num_classes(self) -> int:
    """Classes of the integer labels (max + 1), a vector label's length, 0 without labels."""
    if self.labels is None:
      return 0
    return int(self.labels.max()) + 1 if self.labels.ndim == 1 else int(self.labels.shape[1])

  def __len__(self) -> int:
    return len(self.names)

  def label_of(self, i: int):
    return self.labels[int(i)]

  def __getitem__(self, i: int) -> dict[str, Any]:
    i = int(i)
    x = self._decode(i)
    if x.shape != self.record_shape:
      raise ValueError(f"{self.path}: {self.names[i]} has shape {x.shape}, the dataset's first "
                       f"file {self.names[0]} has {self.record_shape}.")
    return {"x": x, **_label_record(self.labels, i)}

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self._id})"


class EDMImageZip(_ZipSource):
  """An EDM dataset zip: images (PNG as EDM's dataset tool writes them) -> uint8 [H, W, C]."""

  exts = _IMAGE_EXTS
  what = "images"
  kind = "uint8"

  def _decode(self, i: int) -> np.ndarray:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    with Image.open(io.BytesIO(self._read(i))) as img:
      x = np.asarray(img)
    if x.dtype != np.uint8:
      raise ValueError(f"{self.path}: {self.names[i]} is not 8-bit ({x.dtype}).")
    return x.reshape(*x.shape[:2], -1)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return self.record_shape


class EDM2LatentZip(_ZipSource):
  """An EDM2 latent zip: per image the VAE posterior mean and std, [2C, h, w] -> float32
  [h, w, 2C] (channels last: mean first, then std)."""

  exts = (".npy",)
  what = "latents"
  kind = "latent"

  def _decode(self, i: int) -> np.ndarray:
    x = np.load(io.BytesIO(self._read(i)), allow_pickle=False)
    x = x.reshape(-1, *x.shape[-2:])
    if x.shape[0] % 2:
      raise ValueError(f"{self.path}: {self.names[i]} has {x.shape[0]} channels; EDM2 latents "
                       "hold a mean and a std per channel (an even number).")
    return np.ascontiguousarray(np.transpose(x, (1, 2, 0)), np.float32)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    h, w, c2 = self.record_shape
    return (h, w, c2 // 2)


class TfdsSource:
  """A prepared tensorflow-datasets split (ArrayRecord), random access via `tfds.data_source`:
  an image feature (uint8 [H, W, C]) and optionally a class-label feature."""

  kind = "uint8"
  vector_labels = False

  def __init__(self, name: str, split: str, data_dir: str | None, image_feature: str = "image",
               label_feature: str = "label"):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    where = data_dir or "tfds' default data_dir"
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # pylint: disable=broad-except  # tfds raises several kinds.
      raise FileNotFoundError(f"No prepared tfds dataset {name!r} in {where}: {e}") from e
    if not builder.is_prepared():
      raise FileNotFoundError(f"The tfds dataset {name!r} is not prepared in {builder.data_dir}; "
                              "prepare it beforehand (data is never downloaded here).")
    features = builder.info.features
    if image_feature not in features:
      raise ValueError(f"The tfds dataset {name!r} has no feature {image_feature!r} "
                       f"(config.data.image_feature); it has {sorted(features.keys())}.")
    self.num_classes = 0
    self.label_feature = None
    if label_feature and label_feature in features:
      num = getattr(features[label_feature], "num_classes", None)
      if num is None:
        raise ValueError(f"The tfds feature {label_feature!r} of {name!r} is not a ClassLabel.")
      self.num_classes, self.label_feature = int(num), label_feature
    try:
      self._source = builder.as_data_source(split=split)
    except (ValueError, KeyError, NotImplementedError) as e:
      raise ValueError(f"Cannot read split {split!r} of the tfds dataset {name!r} with random "
                       f"access (it must be prepared in the array_record format): {e}") from e
    self.path = f"tfds:{name}:{split} ({builder.data_dir})"
    self.image_feature = image_feature
    self.names = None
    if not len(self._source):
      raise ValueError(f"{self.path} holds no record.")
    first = self[0]["x"]
    self.image_shape = tuple(first.shape)
    version = builder.info.version
    self._id = f"{name}:{split}:v{version}, records={len(self)}, shape={self.image_shape}"

  def __len__(self) -> int:
    return len(self._source)

  def label_of(self, i: int):
    return np.int64(self._source[int(i)][self.label_feature])

  def __getitem__(self, i: int) -> dict[str, Any]:
    rec = self._source[int(i)]
    x = np.asarray(rec[self.image_feature])
    if x.dtype != np.uint8:
      raise ValueError(f"{self.path}: feature {self.image_feature!r} is {x.dtype}, not uint8 "
                       "pixels.")
    x = x.reshape(*x.shape[:2], -1)
    out = {"x": x}
    if self.label_feature:
      out["label"] = np.int64(rec[self.label_feature])
    return out

  def __repr__(self) -> str:
    return f"TfdsSource({self._id})"


class DigitsSource:
  """scikit-learn's 8x8 digits (float pixels already in [-1, 1]) and their classes; `split`
  'all' (the 1,797 images the digits teacher was trained on) or 'a' / 'b' (the fixed halves of
  `digits.split_halves`). `channels` > 1 repeats the grey channel (grey RGB digits, or a
  4-channel stand-in for latents): the real data of the paper configs' `:tiny` variants, which
  run the SiDA code path on a CPU without files."""

  kind = "float"
  num_classes = 10
  vector_labels = False

  def __init__(self, split: str = "all", channels: int = 1):
    from sid_jax.data import digits  # pylint: disable=g-import-not-at-top
    if split == "all":
      self.images, self.labels = digits.load_digits()
    elif split in ("a", "b"):
      self.images, self.labels = digits.split_halves()[0 if split == "a" else 1]
    else:
      raise ValueError(f"config.data.split for the digits must be 'all', 'a' or 'b', got "
                       f"{split!r}.")
    if channels < 1:
      raise ValueError(f"config.data.channels must be >= 1 for the digits, got {channels}.")
    if channels > 1:
      self.images = np.repeat(self.images[..., :1], channels, axis=-1)
    self.channels = channels
    self.path = f"digits ({split})" if channels == 1 else f"digits ({split}, {channels} channels)"
    self.split = split
    self.names = None
    self.image_shape = tuple(self.images.shape[1:])

  def __len__(self) -> int:
    return len(self.images)

  def label_of(self, i: int):
    return np.int64(self.labels[int(i)])

  def __getitem__(self, i: int) -> dict[str, Any]:
    i = int(i)
    return {"x": self.images[i], "label": np.int64(self.labels[i])}

  def __repr__(self) -> str:
    if self.channels == 1:
      return f"DigitsSource({self.split}, records={len(self)})"
    return f"DigitsSource({self.split}, records={len(self)}, channels={self.channels})"


class LabelsJson:
  """Class labels alone, from an EDM/EDM2 `dataset.json` file (what the official SiD-EDM2 runs
  read: ImageNet's training labels, no images): records {'label'}."""

  kind = "labels"
  image_shape = None
  vector_labels = False

  def __init__(self, path: str):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"Label file not found: {path}")
    with open(path, "rb") as f:
      text = f.read()
    try:
      names = [e[0] for e in json.loads(text)["labels"] or []]
    except (ValueError, KeyError, TypeError, IndexError) as e:
      raise ValueError(f"{path} is not EDM's dataset.json format ({e}).") from None
    self.labels = _labels_from_json(path, names, text)
    if self.labels is None or not len(self.labels) or self.labels.ndim != 1:
      raise ValueError(f"{path} holds no class labels.")
    self.path = path
    self.num_classes = int(self.labels.max()) + 1
    crc = zlib.crc32(self.labels.tobytes())
    self._id = f"records={len(self.labels)}, crc32={crc:08x}"

  def __len__(self) -> int:
    return len(self.labels)

  def label_of(self, i: int):
    return self.labels[int(i)]

  def __getitem__(self, i: int) -> dict[str, Any]:
    return {"label": self.labels[int(i)]}

  def __repr__(self) -> str:
    return f"LabelsJson({self._id})"


class LabelsOnly:
  """The labels of a source's records, without reading or decoding the images (a SiD run
  conditioned on the data's classes)."""

  kind = "labels"
  image_shape = None

  def __init__(self, source):
    self.source, self.path = source, source.path
    self.num_classes = source.num_classes
    self.vector_labels = source.vector_labels

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> dict[str, Any]:
    return {"label": self.source.label_of(i)}

  def __repr__(self) -> str:
    return f"LabelsOnly({self.source!r})"


# ---------------------------------------------------------------------------------------------
# Records to arrays, and the grain loader.
# ---------------------------------------------------------------------------------------------


class _Prepare(grain.transforms.RandomMap):
  """A source record -> {'images', 'labels'}: uint8 pixels / 127.5 - 1, float pixels as they
  are, EDM2 latents drawn with the record's generator and normalised; labels one-hot (vectors as
  given). A module-level class so that grain can pickle it into worker processes."""

  def __init__(self, kind: str, label_dim: int, raw_mean=EDM2_RAW_MEAN, raw_std=EDM2_RAW_STD,
               final_mean=EDM2_FINAL_MEAN, final_std=EDM2_FINAL_STD):
    self.kind, self.label_dim = kind, int(label_dim)
    self.scale = np.float32(final_std) / np.asarray(raw_std, np.float32)
    self.bias = np.float32(final_mean) - np.asarray(raw_mean, np.float32) * self.scale

  def random_map(self, record, rng):
    out = {}
    if self.kind != "labels":
      out["images"] = self._image(record["x"], rng)
    if self.label_dim:
      label = np.asarray(record["label"])
      if label.ndim == 0:
        onehot = np.zeros(self.label_dim, np.float32)
        onehot[int(label)] = 1
        label = onehot
      out["labels"] = label.astype(np.float32)
    return out

  def _image(self, x, rng):
    if self.kind == "uint8":
      x = x.astype(np.float32) / np.float32(127.5) - np.float32(1)
    elif self.kind == "latent":
      c = x.shape[-1] // 2
      mean, std = x[..., :c], x[..., c:]
      x = mean + std * rng.standard_normal(mean.shape, dtype=np.float32)
      x = x * self.scale + self.bias
    return np.ascontiguousarray(x, np.float32)


def make_loader(source, *, batch: int, seed: int, process_index: int = 0, process_count: int = 1,
                shuffle: bool = True, label_dim: int = 0, worker_count: int = 0,
                read_threads: int = 2, prefetch: int = 0, latent_norm: dict | None = None):
  """grain's DataLoader over `source`: this host's shard, endless epochs (reshuffled from
  `seed`), records prepared to {'images', 'labels'} and stacked `batch` at a time.

  Args:
    source: a data source of this module.
    batch: records per yielded batch (this host's).
    seed: the shuffle seed and the base of every record's random key (a 32-bit integer).
    process_index, process_count: this host and the number of hosts.
    shuffle: False reads every epoch in record order.
    label_dim: > 0 adds one-hot 'labels' of that width.
    worker_count: grain worker processes (0: read in this process).
    read_threads: threads reading records in each process.
    prefetch: records buffered ahead by those threads (0: two batches).
    latent_norm: EDM2's raw_mean/raw_std/final_mean/final_std (latent sources).

  Returns:
    A `grain.DataLoader`.
  """
  shard = grain.sharding.ShardOptions(shard_index=process_index, shard_count=process_count,
                                      drop_remainder=True)
  if len(source) < process_count:
    raise ValueError(f"{source.path} has {len(source)} records, fewer than the {process_count} "
                     "processes that share it.")
  sampler = grain.samplers.IndexSampler(len(source), shard_options=shard, shuffle=shuffle,
                                        num_epochs=None, seed=seed)
  prepare = _Prepare(source.kind, label_dim, **(latent_norm or {}))
  if worker_count > 0:
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (unparsed under pytest)
      flags.FLAGS.mark_as_parsed()
  return grain.DataLoader(
      data_source=source, sampler=sampler,
      operations=[prepare, grain.transforms.Batch(batch, drop_remainder=True)],
      worker_count=worker_count, shard_options=shard,
      read_options=grain.ReadOptions(num_threads=max(1, read_threads),
                                     prefetch_buffer_size=prefetch or 2 * batch))


# ---------------------------------------------------------------------------------------------
# The feed.
# ---------------------------------------------------------------------------------------------


class RealFeed:
  """Real batches for each update: {'images': [num_micro, micro, H, W, C], 'labels': [num_micro,
  micro, label_dim]} (see the module docstring); each host reads its own shard, and the position
  is saved with every checkpoint."""

  def __init__(self, source, mesh, num_micro: int, micro_batch: int, *, image_shape,
               label_dim: int, seed: int = 0, shuffle: bool = True, worker_count: int = 0,
               read_threads: int = 2, prefetch: int = 0, latent_norm: dict | None = None,
               process_index: int | None = None, process_count: int | None = None,
               images: bool = True):
    """Opens the grain loader over `source` (None: an abstract feed, shapes only, for plans).

    Args:
      source: a data source of this module, or None.
      mesh: the device mesh (the batch is split over its batch axes).
      num_micro, micro_batch: the global batch as num_micro micro-batches of micro_batch.
      image_shape: (H, W, C) the networks take; the source must match it.
      label_dim: the networks' label width (0: unconditional; labels are then not fed).
      seed: the shuffle seed (any non-negative integer; grain takes it modulo 2**32).
      shuffle, worker_count, read_threads, prefetch, latent_norm: see `make_loader`.
      process_index, process_count: default jax's.
      images: False feeds the labels alone ({'labels'}; images are neither read nor decoded).
    """
    self.num_micro, self.micro = int(num_micro), int(micro_batch)
    self.image_shape, self.label_dim = tuple(image_shape), int(label_dim)
    self.images = bool(images)
    if not self.images and not self.label_dim:
      raise ValueError("A labels-only data feed needs config.data.label_dim > 0.")
    self.index = jax.process_index() if process_index is None else int(process_index)
    self.count = jax.process_count() if process_count is None else int(process_count)
    self.sharding = sharding.batch_sharding(mesh, 1)
    self.source = source
    self._it = None
    if source is None:
      return
    if self.micro % self.count:
      raise ValueError(f"config.training.micro_batch={self.micro} is not divisible by the "
                       f"{self.count} processes.")
    if source.kind == "labels" and self.images:
      raise ValueError(f"{source.path} holds labels only, but this run needs images (SiDA's "
                       "discriminator); configure an image or latent dataset.")
    if not self.images and source.kind != "labels":
      source = self.source = LabelsOnly(source)
    if self.images and tuple(source.image_shape) != self.image_shape:
      h, w, c = source.image_shape
      raise ValueError(f"{source.path}: the data are {h}x{w} with {c} channels, but config.data "
                       f"asks resolution={self.image_shape[0]}, channels={self.image_shape[2]}.")
    if self.label_dim:
      if not source.num_classes:
        raise ValueError(f"{source.path} has no labels, but config.data.label_dim="
                         f"{self.label_dim} (a conditional run needs labelled data).")
      if source.vector_labels and source.num_classes != self.label_dim:
        raise ValueError(f"{source.path} has label vectors of length {source.num_classes}, but "
                         f"config.data.label_dim={self.label_dim}.")
      if source.num_classes > self.label_dim:
        raise ValueError(f"{source.path} has labels of {source.num_classes} classes, more than "
                         f"config.data.label_dim={self.label_dim}.")
    self.seed = int(seed) % 2**32
    self.shuffle = bool(shuffle)
    self.worker_count = int(worker_count)
    self.local = self.num_micro * self.micro // self.count
    self.loader = make_loader(source, batch=self.local, seed=self.seed, process_index=self.index,
                              process_count=self.count, shuffle=self.shuffle,
                              label_dim=self.label_dim, worker_count=self.worker_count,
                              read_threads=read_threads, prefetch=prefetch,
                              latent_norm=latent_norm)
    self._batches = 0

  def _iterator(self):
    if self.source is None:
      raise RuntimeError("This data feed is abstract (a plan's): it has shapes, no data.")
    if self._it is None:
      self._it = iter(self.loader)
    return self._it

  def next_local(self) -> dict[str, np.ndarray]:
    """This host's next batch as NumPy arrays [local batch, ...] (advances the stream)."""
    out = next(self._iterator())
    self._batches += 1
    return out

  def next(self) -> dict[str, jax.Array]:
    local = self.next_local()
    shape = (self.num_micro, self.micro)
    out = {}
    for name, value in local.items():
      value = value.reshape(self.num_micro, self.micro // self.count, *value.shape[1:])
      out[name] = jax.make_array_from_process_local_data(self.sharding, value,
                                                         shape + value.shape[2:])
    return out

  def abstract(self) -> dict[str, jax.ShapeDtypeStruct]:
    lead = (self.num_micro, self.micro)
    out = {}
    if self.images:
      out["images"] = jax.ShapeDtypeStruct(lead + self.image_shape, jnp.float32,
                                           sharding=self.sharding)
    if self.label_dim:
      out["labels"] = jax.ShapeDtypeStruct(lead + (self.label_dim,), jnp.float32,
                                           sharding=self.sharding)
    return out

  def state(self) -> dict[str, Any]:
    """A JSON-serialisable snapshot: grain's iterator state and what a restore must match."""
    return {
        "version": STATE_VERSION,
        "source": repr(self.source),
        "seed": self.seed,
        "shuffle": self.shuffle,
        "process_count": self.count,
        "process_index": self.index,
        "worker_count": self.worker_count,
        "local_batch": self.local,
        "batches": self._batches,
        "grain": json.loads(self._iterator().get_state().decode()),
    }

  def restore(self, state: dict[str, Any]) -> None:
    """Resumes from `state()` of a feed over the same data, seed, batch and process count (saved
    by any host).

    Raises:
      ValueError: a field is missing or does not match (the message names it).
    """
    required = ("version", "source", "seed", "shuffle", "process_count", "process_index",
                "worker_count", "local_batch", "batches", "grain")
    missing = [k for k in required if k not in state]
    if missing:
      raise ValueError(f"Data feed state lacks the field(s) {missing}; it was not written by "
                       "sid_jax.data.real.")
    if state["version"] != STATE_VERSION:
      raise ValueError(f"Data feed state: 'version' {state['version']} is not {STATE_VERSION}.")
    if state["process_count"] != self.count:
      raise ValueError(
          f"The checkpoint's data position was written by {state['process_count']} processes, "
          f"this run has {self.count}: grain splits the records into one shard per process, "
          "each shuffled on its own, so the sequence cannot continue with another process count. "
          "Resume with the same number of processes.")
    if state["worker_count"] != self.worker_count:
      raise ValueError(
          f"The checkpoint's data position was written with config.data.worker_count="
          f"{state['worker_count']}, this run has {self.worker_count}: grain's iterator state "
          "is per worker. Resume with the same worker count.")
    for field, mine, what in (("source", repr(self.source), "data"),
                              ("seed", self.seed, "shuffle seed"),
                              ("shuffle", self.shuffle, "config.data.shuffle"),
                              ("local_batch", self.local, "per-process batch")):
      if state[field] != mine:
        raise ValueError(f"Data feed state mismatch in {field!r} ({what}): the checkpoint has "
                         f"{state[field]!r}, this run ({self.source.path}) has {mine!r}.")
    grain_state = dict(state["grain"])
    # Hosts read in lockstep: another host's grain positions differ by the shard offset only.
    shift = self.index - int(state["process_index"])
    grain_state["last_seen_indices"] = {
        k: int(v) + shift for k, v in grain_state["last_seen_indices"].items()}
    grain_state["sampler"] = repr(self.loader._sampler)  # pylint: disable=protected-access
    it = iter(self.loader)
    it.set_state(json.dumps(grain_state).encode())
    self._it = it
    self._batches = int(state["batches"])


# ---------------------------------------------------------------------------------------------
# From a config.
# ---------------------------------------------------------------------------------------------


def configured(config) -> bool:
  """Whether `config.data.source` names a dataset (real data is fed to the step)."""
  return bool(config.data.get("source", ""))


def open_source(config):
  """The data source that `config.data` names (see `make_feed`)."""
  d = config.data
  kind = d.get("source", "")
  path = d.get("path", "")
  if kind not in SOURCES:
    raise ValueError(f"config.data.source={kind!r} is not one of {', '.join(SOURCES)}.")
  if kind == "digits":
    return DigitsSource(d.get("split", "") or "all", channels=int(d.get("channels", 1)))
  if not path:
    official = d.get("official_name", "")
    raise ValueError(f"config.data.source={kind!r} needs config.data.path (the "
                     f"{'tfds dataset name' if kind == 'tfds' else 'zip file'}"
                     + (f"; this config's data: {official}" if official else "") + ").")
  if kind == "edm_zip":
    return EDMImageZip(path)
  if kind == "edm2_latent_zip":
    return EDM2LatentZip(path)
  if kind == "labels_json":
    return LabelsJson(path)
  return TfdsSource(path, d.get("split", "") or "train", d.get("data_dir", "") or None,
                    image_feature=d.get("image_feature", "image"),
                    label_feature=d.get("label_feature", "label"))


def _latent_norm(config) -> dict:
  """EDM2's latent normalisation, from `config.decoder` when the config has one."""
  dec = config.get("decoder", None)
  if dec is None:
    return {}
  return {k: (tuple(dec[k]) if isinstance(dec[k], (list, tuple)) else float(dec[k]))
          for k in ("raw_mean", "raw_std", "final_mean", "final_std") if k in dec}


def make_feed(config, mesh, num_micro: int, micro_batch: int, abstract: bool = False, *,
              images: bool = True):
  """The real-data feed of `config.data`, or None when it names no dataset.

  config.data fields: `source` ('' none, 'digits', 'edm_zip', 'edm2_latent_zip', 'tfds',
  'labels_json': an EDM dataset.json, labels only), `path` (the zip or json file, or the tfds
  dataset name), `split` (tfds split, default 'train'; digits 'all'/'a'/
  'b'), `data_dir` (tfds), `image_feature` / `label_feature` (tfds, default 'image' / 'label'),
  `shuffle` (default True), `seed` (default: config.seed), `worker_count` (grain worker
  processes, default 0), `read_threads` (default 2), `prefetch` (records, default two batches);
  `resolution`, `channels` and `label_dim` must match the data. With `abstract`, no file is
  opened (shapes only, for `sid_jax.plan`); `images=False` feeds labels alone.
  """
  if not configured(config):
    return None
  d = config.data
  shape = (int(d.resolution), int(d.resolution), int(d.channels))
  source = None if abstract else open_source(config)
  latent_norm = _latent_norm(config) if d.source == "edm2_latent_zip" else None
  if latent_norm and source is not None:
    for k in ("raw_mean", "raw_std"):
      if k in latent_norm and len(latent_norm[k]) != source.image_shape[2]:
        raise ValueError(f"{source.path}: latents have {source.image_shape[2]} channels but "
                         f"config.decoder.{k} has {len(latent_norm[k])} values.")
  seed = d.get("seed", None)
  seed = int(config.seed) if seed is None or seed < 0 else int(seed)
  return RealFeed(source, mesh, num_micro, micro_batch, image_shape=shape,
                  label_dim=int(d.label_dim), seed=seed, shuffle=bool(d.get("shuffle", True)),
                  worker_count=int(d.get("worker_count", 0)),
                  read_threads=int(d.get("read_threads", 2)), prefetch=int(d.get("prefetch", 0)),
                  latent_norm=latent_norm, images=images)


class LabelFeed:
  """The step's batch for SiD on a labelled dataset: {'fake': {'labels'}, 'gen': {'labels'}},
  the class labels of two successive data batches (one per update, as SiDA's loop draws them)
  in place of uniform draws: the data's class frequencies condition the generator."""

  def __init__(self, feed: RealFeed):
    self.feed = feed

  def next(self) -> dict[str, dict[str, jax.Array]]:
    fake = self.feed.next()
    return {"fake": fake, "gen": self.feed.next()}

  def abstract(self) -> dict[str, dict[str, jax.ShapeDtypeStruct]]:
    a = self.feed.abstract()
    return {"fake": a, "gen": a}

  def state(self) -> dict[str, Any]:
    return self.feed.state()

  def restore(self, state: dict[str, Any]) -> None:
    self.feed.restore(state)


def make_label_feed(config, mesh, num_micro: int, micro_batch: int, abstract: bool = False):
  """A `LabelFeed` when `config.data` names a dataset and the run is conditional, else None."""
  if not configured(config) or not int(config.data.label_dim):
    return None
  return LabelFeed(make_feed(config, mesh, num_micro, micro_batch, abstract, images=False))
