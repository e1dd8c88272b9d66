"""scikit-learn's bundled UCI handwritten digits (1,797 grey 8x8 images, 10 classes), offline.

Images are returned NHWC in [-1, 1] (pixel values 0..16 mapped linearly), labels as int32.
The split into two halves is fixed (seeded) so that every number computed on it is reproducible.
"""

from __future__ import annotations

import numpy as np

NUM_CLASSES = 10
RESOLUTION = 8


def load_digits() -> tuple[np.ndarray, np.ndarray]:
  try:
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
  except ImportError as e:  # pragma: no cover - scikit-learn is in requirements.txt
    raise ImportError("The digits data ships with scikit-learn: pip install scikit-learn") from e
  bunch = datasets.load_digits()
  images = (bunch.images.astype(np.float32) / 8.0 - 1.0)[..., None]
  return images, bunch.target.astype(np.int32)


def split_halves(seed: int = 0):
  """(images_a, labels_a), (images_b, labels_b): a fixed random half/half split."""
  images, labels = load_digits()
  order = np.random.RandomState(seed).permutation(len(images))
  a, b = order[:len(order) // 2], order[len(order) // 2:]
  return (images[a], labels[a]), (images[b], labels[b])
