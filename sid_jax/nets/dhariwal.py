"""DhariwalUNet: EDM's ADM UNet (Dhariwal & Nichol 2021) in Flax linen, NHWC.

Field names are the official constructor arguments; submodule names follow the official
`state_dict` (torch `enc.32x32_block0.conv0` is `enc_32x32_block0/conv0` here). Outputs as in
`sid_jax.nets.songunet`: 'decoder' (F), 'encoder' (SiDA logits [B, h, w, 1], decoder not run) or
'encoder_decoder' ((F, logits) from one pass). Precision as in SongUNet: `dtype` (None: the
input's) is the compute dtype of the image path; the embedding stays float32, outputs come back in
the input's dtype.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sid_jax.nets import layers
from sid_jax.nets.songunet import (LayerSpec, check_output, drop_labels, layout_buffers,
                                    to_compute)

Array = jax.Array

CHANNELS_PER_HEAD = 64  # Hard-coded in the reference ADM.


class DhariwalUNet(nn.Module):
  img_resolution: int
  in_channels: int
  out_channels: int
  label_dim: int = 0
  augment_dim: int = 0
  model_channels: int = 192
  channel_mult: Sequence[int] = (1, 2, 3, 4)
  channel_mult_emb: int = 4
  num_blocks: int = 3
  attn_resolutions: Sequence[int] = (32, 16, 8)
  dropout: float = 0.10
  label_dropout: float = 0.0
  precision: Any = layers.DEFAULT_PRECISION
  dtype: Any = None  # Compute dtype of the image path (None: the input's).

  @property
  def emb_channels(self) -> int:
    return self.model_channels * self.channel_mult_emb

  def layout(self) -> tuple[list[LayerSpec], list[LayerSpec]]:
    """The encoder and decoder entries, in the official construction (= call) order."""
    mc = self.model_channels
    enc = []
    cout = self.in_channels
    for level, mult in enumerate(self.channel_mult):
      res = self.img_resolution >> level
      tag = f"{res}x{res}"
      if level == 0:
        cin, cout = cout, mc * mult
        enc.append(LayerSpec(f"{tag}_conv", "conv", cin, cout))
      else:
        enc.append(LayerSpec(f"{tag}_down", "block", cout, cout, down=True))
      for idx in range(self.num_blocks):
        cin, cout = cout, mc * mult
        enc.append(LayerSpec(f"{tag}_block{idx}", "block", cin, cout,
                             attention=res in self.attn_resolutions))
    skips = [spec.out_channels for spec in enc]

    dec = []
    last = len(self.channel_mult) - 1
    for level, mult in reversed(list(enumerate(self.channel_mult))):
      res = self.img_resolution >> level
      tag = f"{res}x{res}"
      if level == last:
        dec.append(LayerSpec(f"{tag}_in0", "block", cout, cout, attention=True))
        dec.append(LayerSpec(f"{tag}_in1", "block", cout, cout))
      else:
        dec.append(LayerSpec(f"{tag}_up", "block", cout, cout, up=True))
      for idx in range(self.num_blocks + 1):
        cin, cout = cout + skips.pop(), mc * mult
        dec.append(LayerSpec(f"{tag}_block{idx}", "block", cin, cout,
                             attention=res in self.attn_resolutions))
    return enc, dec

  def torch_buffers(self) -> dict[str, np.ndarray]:
    """Non-learned official buffers (names without the `model.` prefix) and their values."""
    return layout_buffers(self.layout(), (1, 1))

  def _block(self, spec: LayerSpec, name: str) -> layers.UNetBlock:
    return layers.UNetBlock(out_channels=spec.out_channels,
                            up=spec.up,
                            down=spec.down,
                            attention=spec.attention,
                            channels_per_head=CHANNELS_PER_HEAD,
                            dropout=self.dropout,
                            init=_INIT,
                            init_zero=_INIT_ZERO,
                            precision=self.precision,
                            name=name)

  def _embedding(self, noise_labels, class_labels, augment_labels, train):
    emb = layers.PositionalEmbedding(self.model_channels, name="map_noise")(noise_labels)
    if self.augment_dim:
      map_augment = layers.Linear(self.model_channels, use_bias=False, init=_INIT_ZERO,
                                  precision=self.precision, name="map_augment")
      if augment_labels is not None:
        emb = emb + map_augment(augment_labels.astype(emb.dtype))
      elif self.is_initializing():
        map_augment(jnp.zeros((emb.shape[0], self.augment_dim), emb.dtype))
    dense = lambda name: layers.Linear(self.emb_channels, init=_INIT, precision=self.precision,
                                       name=name)
    emb = nn.silu(dense("map_layer0")(emb))
    emb = dense("map_layer1")(emb)
    if self.label_dim:
      if class_labels is None:
        raise ValueError(f"DhariwalUNet has label_dim={self.label_dim}; class_labels are required.")
      labels = drop_labels(self, class_labels.astype(emb.dtype), self.label_dropout, train)
      map_label = layers.Linear(self.emb_channels,
                                use_bias=False,
                                init=layers.InitSpec("kaiming_normal",
                                                     weight=float(np.sqrt(self.label_dim))),
                                precision=self.precision,
                                name="map_label")
      emb = emb + map_label(labels)
    return nn.silu(emb)

  @nn.compact
  def __call__(self, x: Array, noise_labels: Array, class_labels: Array | None,
               augment_labels: Array | None = None, *, train: bool = False,
               output: str = "decoder"):
    check_output(output)
    enc, dec = self.layout()
    emb = self._embedding(noise_labels, class_labels, augment_labels, train)
    out_dtype = x.dtype
    x = to_compute(x, self.dtype)

    skips = []
    for spec in enc:
      name = f"enc_{spec.name}"
      if spec.kind == "conv":
        x = layers.Conv2d(spec.out_channels, 3, init=_INIT, precision=self.precision,
                          name=name)(x)
      else:
        x = self._block(spec, name)(x, emb, train)
      skips.append(x)

    logits = (jnp.mean(x.astype(out_dtype), axis=-1, keepdims=True)
              if output != "decoder" else None)
    if output == "encoder":
      return logits

    for spec in dec:
      if x.shape[-1] != spec.in_channels:
        x = jnp.concatenate([x, skips.pop()], axis=-1)
      x = self._block(spec, f"dec_{spec.name}")(x, emb, train)
    x = layers.GroupNorm(name="out_norm")(x)
    x = layers.Conv2d(self.out_channels, 3, init=_INIT_ZERO, precision=self.precision,
                      name="out_conv")(nn.silu(x)).astype(out_dtype)
    if output == "decoder":
      return x
    return x, logits


_INIT = layers.InitSpec("kaiming_uniform", weight=float(np.sqrt(1 / 3)), bias=float(np.sqrt(1 / 3)))
_INIT_ZERO = layers.InitSpec("kaiming_uniform", weight=0.0, bias=0.0)
