"""Image conversions at the edges: generator output in [-1, 1] -> uint8, grids, PNG files."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image


def to_uint8(x) -> np.ndarray:
  """The official export: uint8(clip(x * 127.5 + 128, 0, 255)) with truncation."""
  x = np.asarray(x, np.float32)
  return np.clip(x * 127.5 + 128.0, 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, rows: int, cols: int, pad: int = 1) -> np.ndarray:
  """[rows*cols, H, W, C] uint8 -> one [rows*(H+pad)+pad, cols*(W+pad)+pad, C] image."""
  n, h, w, c = images.shape
  if n != rows * cols:
    raise ValueError(f"make_grid: {n} images do not fill {rows}x{cols}.")
  grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.uint8)
  for i in range(n):
    r, k = divmod(i, cols)
    y, x = pad + r * (h + pad), pad + k * (w + pad)
    grid[y:y + h, x:x + w] = images[i]
  return grid


def save_png(path: str, image: np.ndarray, scale: int = 1) -> None:
  """Writes an [H, W, C] uint8 image (C = 1 or 3), optionally upscaled by pixel repetition."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if scale > 1:
    image = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
  if image.shape[-1] == 1:
    Image.fromarray(image[..., 0], mode="L").save(path)
  else:
    Image.fromarray(image).save(path)
