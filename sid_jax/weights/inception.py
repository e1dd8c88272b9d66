"""Strict import of PyTorch FID-Inception weights into `sid_jax.nets.inception` modules.

Accepted key names (one state dict may not hold a tensor under two names):
  * torchvision `Inception3` names, as in pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`:
    `Conv2d_1a_3x3.conv.weight`, `Mixed_7c.branch_pool.bn.running_var`, `fc.weight`, ...;
  * pytorch-fid's `InceptionV3` wrapper names, `blocks.<i>.<j>.<...>`, translated to the above;
  * the names inside one block or BasicConv2d (`branch1x1.conv.weight`, `bn.bias`, ...) when the
    target module is that block.

Layout changes (`strict.default_layout`): conv weights OIHW -> HWIO, linear weights [out, in] ->
[in, out]. BatchNorm `weight` -> `scale`, `running_mean` / `running_var` -> `batch_stats` `mean` /
`var`; `num_batches_tracked` is dropped (its BatchNorm must still exist). The conversion is
`sid_jax.weights.strict.convert_state_dict` against `jax.eval_shape` of the module's init: any
missing, unexpected or mis-shaped entry raises a ValueError naming all of them. Read the `.pth`
file with `sid_jax.weights.readers.read_torch`.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sid_jax.weights import strict

# pytorch-fid's InceptionV3 wrapper (`blocks.<i>.<j>`) -> torchvision Inception3 layer names.
WRAPPER_TO_INCEPTION3 = {
    "blocks.0.0": "Conv2d_1a_3x3",
    "blocks.0.1": "Conv2d_2a_3x3",
    "blocks.0.2": "Conv2d_2b_3x3",
    "blocks.1.0": "Conv2d_3b_1x1",
    "blocks.1.1": "Conv2d_4a_3x3",
    "blocks.2.0": "Mixed_5b",
    "blocks.2.1": "Mixed_5c",
    "blocks.2.2": "Mixed_5d",
    "blocks.2.3": "Mixed_6a",
    "blocks.2.4": "Mixed_6b",
    "blocks.2.5": "Mixed_6c",
    "blocks.2.6": "Mixed_6d",
    "blocks.2.7": "Mixed_6e",
    "blocks.3.0": "Mixed_7a",
    "blocks.3.1": "Mixed_7b",
    "blocks.3.2": "Mixed_7c",
}

# BatchNorm leaves: (flax collection, flax leaf name) -> torch name.
_BN_TO_TORCH = {
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def canonical_name(key: str) -> str:
  """Translates a wrapper name `blocks.i.j.rest` to its Inception3 name; others pass through."""
  if key.startswith("blocks."):
    parts = key.split(".")
    prefix = ".".join(parts[:3])
    if prefix in WRAPPER_TO_INCEPTION3 and len(parts) > 3:
      return ".".join([WRAPPER_TO_INCEPTION3[prefix]] + parts[3:])
  return key


def torch_name(target: tuple[str, ...]) -> str:
  """The Inception3 torch name of the Flax leaf `(collection, *modules, leaf)`."""
  collection, *modules, leaf = target
  if modules and modules[-1] == "bn":
    leaf = _BN_TO_TORCH.get((collection, leaf), leaf)
  elif leaf == "kernel":
    leaf = "weight"
  return ".".join(modules + [leaf])


def expected_variables(module: nn.Module, input_shape) -> dict[tuple[str, ...], Any]:
  """Flattened {(collection, *path): ShapeDtypeStruct} of `module.init` on float32 inputs."""
  abstract = jax.eval_shape(module.init, jax.random.key(0),
                            jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32))
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(abstract))


def torch_state_dict_to_flax(state_dict: Mapping[str, np.ndarray], module: nn.Module,
                             input_shape=None) -> dict[str, Any]:
  """Converts a torch state dict (name -> array) into `{'params', 'batch_stats'}` for `module`.

  Args:
    state_dict: torch names to numpy arrays (anything `np.asarray` accepts) or torch tensors.
    module: the Flax module the variables are for (FIDInceptionV3, a block or BasicConv2d).
    input_shape: the NHWC input shape used to build the expected tree with `jax.eval_shape`;
      defaults to [1, 299, 299, 3] (fine for FIDInceptionV3, which resizes).

  Returns:
    Nested dicts of float numpy arrays, with exactly the collections and leaves of
    `module.init`, cast to their dtypes.

  Raises:
    ValueError: listing, by torch name, every missing, unexpected and mis-shaped entry.
  """
  if input_shape is None:
    input_shape = (1, 299, 299, 3)
  expected = expected_variables(module, input_shape)
  batch_norms = {key[1:-1] for key in expected if key[0] == "batch_stats"}

  def ignore(name: str) -> bool:  # `num_batches_tracked` of a BatchNorm the module has.
    *bn, leaf = name.split(".")
    return leaf == "num_batches_tracked" and bn[-1:] == ["bn"] and tuple(bn) in batch_norms

  return strict.convert_state_dict(state_dict, expected, torch_name,
                                   what=type(module).__name__, rename=canonical_name,
                                   ignore=ignore)
