"""Image sources for evaluation: a folder of images, an .npz array, a prepared TFDS split.

Each source is an `ImageSource`: its kind, path, image count and shape, and `batches(size)`, which
yields uint8 [n, H, W, C] arrays with C as stored (1 or 3; `rgb_batches` repeats grey to RGB for
the detectors). Nothing is read until the batches are drawn, except what the checks need (the
array of an .npz, the first image of a folder, a TFDS dataset's info). Folders are read in
natural order (`natural_key`: 'img2.png' before 'img10.png'), so image i pairs with caption i.

Problems with a source raise `SourceError` (or FileNotFoundError for a missing path); their
messages name the `sid_jax.evaluate` flag that gave the input (--images, --npz, --tfds, --num).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable, Iterator

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class SourceError(ValueError):
  """An image source that cannot be read as asked; the message says what to change."""


@dataclasses.dataclass
class ImageSource:
  """uint8 images to evaluate.

  Attributes:
    kind: 'images', 'npz', 'tfds' or 'checkpoint' (the flag that gave them).
    path: where they come from (an absolute path, or NAME:SPLIT).
    num: how many images `batches` yields in all.
    image_shape: (H, W, C) of every image, C = 1 or 3.
    batches: `batches(size)` yields uint8 [n <= size, H, W, C] arrays, in a fixed order.
    notes: caveats recorded with the numbers (layout detected, channels repeated, ...).
    extra: more fields for `describe()`.
    files: for a folder, the image files in reading order, relative to `path` (not described).
  """
  kind: str
  path: str
  num: int
  image_shape: tuple[int, int, int]
  batches: Callable[[int], Iterator[np.ndarray]]
  notes: list[str] = dataclasses.field(default_factory=list)
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)
  files: list[str] | None = None

  def __post_init__(self):
    channels = self.image_shape[-1]
    if channels not in (1, 3):
      raise SourceError(f"{self.kind} {self.path}: images have {channels} channels "
                        f"(shape {self.image_shape}); the detector takes 1 (grey) or 3 (RGB).")
    if channels == 1:
      self.notes.append("1-channel images repeated to 3 channels before the detector")

  def rgb_batches(self, size: int) -> Iterator[Any]:
    """`batches` with grey repeated to RGB (a mixed-size folder's list batches are RGB already)."""
    for batch in self.batches(size):
      if isinstance(batch, np.ndarray) and batch.shape[-1] == 1:
        batch = np.repeat(batch, 3, axis=-1)
      yield batch

  def describe(self) -> dict[str, Any]:
    return {"kind": self.kind, "path": self.path, "num": self.num,
            "image_shape": list(self.image_shape), "notes": list(self.notes), **self.extra}


def _take_count(available: int, num: int | None, what: str) -> int:
  if available == 0:
    raise SourceError(f"{what} holds no images.")
  if num is None:
    return available
  if num <= 0 or num > available:
    raise SourceError(f"--num={num}, but {what} holds {available} images.")
  return num


def npz_source(path: str, num: int | None) -> ImageSource:
  """uint8 images from an .npz ('arr_0' or 'images'), NHWC or NCHW (detected, and noted)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--npz {path!r} does not exist.")
  with np.load(path, allow_pickle=False) as z:
    keys = [k for k in ("arr_0", "images") if k in z.files]
    if not keys:
      raise SourceError(f"{path} has no 'arr_0' or 'images' entry (it has {z.files}).")
    array = z[keys[0]]
  notes = []
  if array.dtype != np.uint8:
    raise SourceError(f"{path}['{keys[0]}'] is {array.dtype}; expected uint8 images "
                      "(0..255).")
  if array.ndim != 4:
    raise SourceError(f"{path}['{keys[0]}'] has shape {array.shape}; expected 4-d uint8 "
                      "images, NHWC or NCHW.")
  if array.shape[-1] in (1, 3):
    notes.append(f"'{keys[0]}' read as NHWC {array.shape}")
  elif array.shape[1] in (1, 3):
    notes.append(f"'{keys[0]}' detected as NCHW {array.shape}, transposed to NHWC")
    array = np.transpose(array, (0, 2, 3, 1))
  else:
    raise SourceError(f"{path}['{keys[0]}'] has shape {array.shape}: neither NHWC nor NCHW "
                      "with 1 or 3 channels.")
  n = _take_count(array.shape[0], num, path)
  array = array[:n]

  def batches(size):
    for start in range(0, n, size):
      yield array[start:start + size]

  return ImageSource("npz", os.path.abspath(path), n, tuple(array.shape[1:]), batches, notes)


def _read_image(path: str, to_rgb: bool = False) -> np.ndarray:
  """One image as uint8 [H, W, C]; with `to_rgb`, any mode converted as PIL's convert('RGB')
  (what clean-fid does with every file it reads)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(path) as im:
    if to_rgb:
      return np.asarray(im.convert("RGB"), np.uint8)
    if im.mode not in ("L", "RGB"):
      raise SourceError(f"{path}: image mode {im.mode!r}; expected 'L' (grey) or 'RGB'.")
    array = np.asarray(im, np.uint8)
  return array[..., None] if array.ndim == 2 else array


_DIGIT_RUN = re.compile(r"(\d+)")


def natural_key(path: str) -> tuple[tuple[str | int, ...], str]:
  """Sort key comparing the digit runs of `path` as numbers: 'img2.png' before 'img10.png'.

  Zero-padded names ('000123.png', as EDM's and SiD's generators write them) keep their plain
  string order; `path` itself breaks ties ('01' vs '1').
  """
  parts = _DIGIT_RUN.split(path)  # text, digits, text, ...: the same types at the same positions
  return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), path


def folder_source(directory: str, num: int | None, mixed_sizes: bool = False) -> ImageSource:
  """Images from a folder (recursively, natural-sorted by relative path).

  By default all images must have one size and mode ('L' or 'RGB'). With `mixed_sizes` (the
  host-resizing front-end of coco2014-fid30k-clean, e.g. for COCO's val2014) every image is
  converted to RGB and may have its own size; a batch is then a uint8 array when its images share
  a size and a list of [H, W, 3] arrays otherwise, and `image_shape` is the first image's.
  """
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"--images {directory!r} is not a directory.")
  files = []
  for root, _, names in os.walk(directory):
    files += [os.path.join(root, n) for n in names if n.lower().endswith(IMAGE_SUFFIXES)]
  files.sort(key=lambda p: natural_key(os.path.relpath(p, directory)))
  n = _take_count(len(files), num, f"--images {directory}")
  files = files[:n]
  shape = _read_image(files[0], mixed_sizes).shape

  def mixed_batches(size):
    for start in range(0, n, size):
      batch = [_read_image(path, True) for path in files[start:start + size]]
      same = len({image.shape for image in batch}) == 1
      yield np.stack(batch) if same else batch

  relative = [os.path.relpath(path, directory) for path in files]
  if mixed_sizes:
    return ImageSource("images", os.path.abspath(directory), n, tuple(shape), mixed_batches,
                       ["any image sizes; every image converted to RGB (PIL convert('RGB'))"],
                       files=relative)

  def batches(size):
    for start in range(0, n, size):
      batch = []
      for path in files[start:start + size]:
        image = _read_image(path)
        if image.shape != shape:
          raise SourceError(f"{path} has shape {image.shape}, but {files[0]} has {shape}; "
                            "all images must have one size and mode.")
        batch.append(image)
      yield np.stack(batch)

  return ImageSource("images", os.path.abspath(directory), n, tuple(shape), batches,
                     files=relative)


def tfds_source(spec: str, data_dir: str | None, image_key: str,
                num: int | None) -> ImageSource:
  """Images of a prepared TFDS dataset `NAME:SPLIT`, read offline from `data_dir`."""
  name, sep, split = spec.partition(":")
  if not sep or not name or not split:
    raise SourceError(f"--tfds must be NAME:SPLIT, got {spec!r}.")
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except
    raise SourceError(f"TFDS dataset {name!r} not found under --data_dir={data_dir!r} "
                      f"(offline: prepare it first): {e}") from e
  if not builder.is_prepared():
    raise SourceError(f"TFDS dataset {name!r} is not prepared under --data_dir="
                      f"{data_dir!r}; nothing is downloaded here.")
  if split not in builder.info.splits:
    raise SourceError(f"TFDS dataset {name!r} has splits {list(builder.info.splits)}, not "
                      f"{split!r}.")
  if image_key not in builder.info.features:
    raise SourceError(f"TFDS dataset {name!r} has features {list(builder.info.features)}; "
                      f"no --image_key={image_key!r}.")
  n = _take_count(builder.info.splits[split].num_examples, num, f"--tfds {spec}")
  shape = tuple(builder.info.features[image_key].shape)

  def examples():
    try:
      source = builder.as_data_source(split=split)
      for i in range(n):
        yield source[i][image_key]
    except NotImplementedError:  # tfrecord files: read through tf.data instead
      ds = builder.as_dataset(split=split, shuffle_files=False, decoders=None)
      for i, example in enumerate(tfds.as_numpy(ds)):
        if i >= n:
          break
        yield example[image_key]

  def batches(size):
    batch = []
    for image in examples():
      image = np.asarray(image)
      image = image[..., None] if image.ndim == 2 else image
      if image.dtype != np.uint8:
        raise SourceError(f"--tfds {spec}: {image_key!r} is {image.dtype}, expected uint8.")
      batch.append(image)
      if len(batch) == size:
        yield np.stack(batch)
        batch = []
    if batch:
      yield np.stack(batch)

  if None in shape:
    first = np.asarray(next(examples()))
    shape = first.shape if first.ndim == 3 else first.shape + (1,)
  elif len(shape) == 2:
    shape = shape + (1,)
  notes = [f"the first {n} examples in the split's stored order"] if (
      n < builder.info.splits[split].num_examples) else []
  return ImageSource("tfds", f"{name}:{split}", n, tuple(shape), batches, notes,
                     extra={"data_dir": data_dir})
