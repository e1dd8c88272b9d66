"""The device mesh and how arrays are laid out on it.

The mesh has two axes: `data` (pure data parallelism) and `fsdp` (data parallelism whose
parameters and optimiser state are also split across the axis). Batches are split over both axes
together; parameters are replicated over `data` and, when `fsdp` > 1, split over `fsdp` along
their largest divisible dimension (big_vision's rule), if they are large enough to be worth it.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
from jax.experimental import multihost_utils
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = MESH_AXES  # A batch dimension is split over every mesh axis.
# config.mesh also holds this setting: leaves with fewer elements stay replicated over `fsdp`.
FSDP_MIN_SIZE_KEY = "fsdp_min_size"
FSDP_MIN_SIZE = 2**18


def mesh_shape(axes: dict[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves one -1 entry to use all remaining devices; validates the product."""
  unknown = [name for name in axes if name not in MESH_AXES + (FSDP_MIN_SIZE_KEY,)]
  if unknown:
    raise ValueError(f"config.mesh has unknown axes {unknown}; expected {list(MESH_AXES)}.")
  sizes = [int(axes.get(name, 1)) for name in MESH_AXES]
  if sum(s == -1 for s in sizes) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}.")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh: sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}.")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"config.mesh: {num_devices} devices are not divisible by the fixed axes "
                       f"({known}).")
    sizes = [num_devices // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} "
                     f"devices, but {num_devices} are available.")
  return tuple(sizes)


def make_mesh(axes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(dict(axes), len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def batch_size_divisor(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, leading_dims: int = 0) -> NamedSharding:
  """Splits dimension `leading_dims` (the batch) over all mesh axes; leading dims stay whole."""
  return NamedSharding(mesh, P(*([None] * leading_dims), BATCH_AXES))


def split_batch(x):
  """`x` with its leading (batch) dimension constrained to be split over every mesh axis.

  Networks call this on their convolution outputs so that, under FSDP, the partitioner gathers
  the split weights and keeps activations split over the batch, rather than splitting a
  convolution over the weight's output channels and repeating the rest of the block on every
  `fsdp` device. A no-op outside a mesh context (`jax.set_mesh`), on one device, for a batch the
  mesh does not divide, and for arrays that are not batched activations (scalars).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names) or not getattr(x, "ndim", 0):
    return x
  n = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
  if n == 1 or x.shape[0] % n:
    return x
  return jax.lax.with_sharding_constraint(x, P(BATCH_AXES))


def fsdp_spec(shape: Sequence[int], fsdp: int, min_size: int) -> P:
  """Splits the largest dimension divisible by `fsdp` (ties: the last one), if large enough."""
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  order = sorted(range(len(shape)), key=lambda i: (shape[i], i), reverse=True)
  for i in order:
    if shape[i] % fsdp == 0:
      spec = [None] * len(shape)
      spec[i] = "fsdp"
      return P(*spec)
  return P()


def fsdp_min_size(config_mesh) -> int:
  """`config.mesh.fsdp_min_size` (default 2^18): the smallest leaf split over `fsdp`."""
  value = int(dict(config_mesh).get(FSDP_MIN_SIZE_KEY, FSDP_MIN_SIZE))
  if value < 0:
    raise ValueError(f"config.mesh.{FSDP_MIN_SIZE_KEY} must be >= 0, got {value}.")
  return value


def param_shardings(mesh: Mesh, abstract_tree: Any, min_size: int = FSDP_MIN_SIZE) -> Any:
  """NamedShardings for a pytree of parameters or optimiser state (shapes only are read): each
  leaf of at least `min_size` elements is split over `fsdp` along its largest dimension that
  `fsdp` divides; the others stay replicated."""
  fsdp = mesh.shape["fsdp"]

  def one(x):
    shape = getattr(x, "shape", ())
    return NamedSharding(mesh, fsdp_spec(shape, fsdp, min_size))

  return jax.tree.map(one, abstract_tree)


def to_host(x) -> np.ndarray:
  """The whole value of a (possibly multi-process) array as NumPy, on every process: the other
  processes' shards are all-gathered when this one cannot address them."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
