"""SongUNet: EDM's DDPM++ / NCSN++ UNet (Song et al. 2021) in Flax linen, NHWC.

The field names are the official constructor arguments. Submodules are named after the official
`state_dict` entries with the `ModuleDict` dot replaced by an underscore: the torch module
`enc.32x32_block0.conv0` is `enc_32x32_block0/conv0` here (see `sid_jax.weights.edm`).

One call can return the denoiser output F ('decoder'), the SiDA discriminator logits
('encoder': the channel mean of the last encoder activation, [B, h, w, 1]) or both
('encoder_decoder'); the 'encoder' mode does not run the decoder.

Precision. Parameters stay float32. `dtype` (None: the input's dtype) is the compute dtype of the
image path: the input is cast to it, so every convolution casts its weights to it, while the
noise/label embedding stays in the input's precision (float32), as does every GroupNorm's
statistics and attention's softmax (see `sid_jax.nets.layers`). Outputs come back in the input's
dtype. This is EDM's `use_fp16` scheme with `dtype` in place of float16.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sid_jax.nets import layers

Array = jax.Array

OUTPUTS = ("decoder", "encoder", "encoder_decoder")


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """One entry of the official encoder/decoder `ModuleDict`, in call order."""
  name: str  # Official key, e.g. '16x16_block0' or '8x8_aux_residual'.
  # 'conv', 'block', 'aux_down', 'aux_skip', 'aux_residual', 'aux_up', 'aux_norm' or 'aux_conv'.
  kind: str
  in_channels: int
  out_channels: int
  up: bool = False
  down: bool = False
  attention: bool = False

  def resample_buffers(self) -> tuple[str, ...]:
    """Official names (relative to this entry) of the `resample_filter` buffers it owns."""
    if not (self.up or self.down):
      return ()
    if self.kind == "block":
      # A resampling block always has a skip connection, itself resampling.
      return ("conv0.resample_filter", "skip.resample_filter")
    return ("resample_filter",)


def swap_halves(emb: Array) -> Array:
  """[a, b] -> [b, a] along the channels (turns [cos, sin] into [sin, cos])."""
  b = emb.shape[0]
  return emb.reshape(b, 2, -1)[:, ::-1].reshape(emb.shape)


def drop_labels(module: nn.Module, labels: Array, rate: float, train: bool) -> Array:
  """Zeroes whole label rows with probability `rate` (classifier-free guidance) when training."""
  if not (train and rate):
    return labels
  keep = jax.random.uniform(module.make_rng("dropout"), (labels.shape[0], 1)) >= rate
  return labels * keep.astype(labels.dtype)


def to_compute(x: Array, dtype: Any) -> Array:
  """`x` cast to the compute dtype `dtype` (None: unchanged)."""
  return x if dtype is None else x.astype(dtype)


def check_output(output: str) -> None:
  if output not in OUTPUTS:
    raise ValueError(f"Invalid output {output!r}; expected one of {OUTPUTS}.")


def layout_buffers(layout: tuple[list[LayerSpec], list[LayerSpec]],
                   taps: Sequence[float]) -> dict[str, np.ndarray]:
  """The official `resample_filter` buffers of a UNet layout: {'enc.<name>.<buf>': filter}."""
  f = layers.resample_filter_2d(taps)[None, None]
  enc, dec = layout
  return {f"{prefix}.{spec.name}.{buf}": f
          for prefix, specs in (("enc", enc), ("dec", dec))
          for spec in specs
          for buf in spec.resample_buffers()}


class SongUNet(nn.Module):
  img_resolution: int
  in_channels: int
  out_channels: int
  label_dim: int = 0
  augment_dim: int = 0
  model_channels: int = 128
  channel_mult: Sequence[int] = (1, 2, 2, 2)
  channel_mult_emb: int = 4
  num_blocks: int = 4
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.10
  label_dropout: float = 0.0
  embedding_type: str = "positional"  # 'positional' (DDPM++) or 'fourier' (NCSN++).
  channel_mult_noise: int = 1
  encoder_type: str = "standard"  # 'standard', 'skip' or 'residual'.
  decoder_type: str = "standard"  # 'standard' or 'skip'.
  resample_filter: Sequence[float] = (1, 1)
  precision: Any = layers.DEFAULT_PRECISION
  dtype: Any = None  # Compute dtype of the image path (None: the input's); see the module doc.

  # --------------------------------------------------------------------------------------------
  # Static structure, shared by the forward pass and the checkpoint converter.
  # --------------------------------------------------------------------------------------------

  def check_config(self) -> None:
    if self.embedding_type not in ("fourier", "positional"):
      raise ValueError(f"Invalid embedding_type {self.embedding_type!r}.")
    if self.encoder_type not in ("standard", "skip", "residual"):
      raise ValueError(f"Invalid encoder_type {self.encoder_type!r}.")
    if self.decoder_type not in ("standard", "skip"):
      raise ValueError(f"Invalid decoder_type {self.decoder_type!r}.")

  @property
  def emb_channels(self) -> int:
    return self.model_channels * self.channel_mult_emb

  @property
  def noise_channels(self) -> int:
    return self.model_channels * self.channel_mult_noise

  def layout(self) -> tuple[list[LayerSpec], list[LayerSpec]]:
    """The encoder and decoder entries, in the official construction (= call) order."""
    self.check_config()
    mc = self.model_channels
    enc = []
    cout = caux = self.in_channels
    for level, mult in enumerate(self.channel_mult):
      res = self.img_resolution >> level
      tag = f"{res}x{res}"
      if level == 0:
        cin, cout = cout, mc  # Level 0 always maps to model_channels, whatever channel_mult[0].
        enc.append(LayerSpec(f"{tag}_conv", "conv", cin, cout))
      else:
        enc.append(LayerSpec(f"{tag}_down", "block", cout, cout, down=True))
        if self.encoder_type == "skip":
          enc.append(LayerSpec(f"{tag}_aux_down", "aux_down", caux, caux, down=True))
          enc.append(LayerSpec(f"{tag}_aux_skip", "aux_skip", caux, cout))
        if self.encoder_type == "residual":
          enc.append(LayerSpec(f"{tag}_aux_residual", "aux_residual", caux, cout, down=True))
          caux = cout
      for idx in range(self.num_blocks):
        cin, cout = cout, mc * mult
        enc.append(LayerSpec(f"{tag}_block{idx}", "block", cin, cout,
                             attention=res in self.attn_resolutions))
    skips = [spec.out_channels for spec in enc if "aux" not in spec.name]

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
                             attention=(idx == self.num_blocks and res in self.attn_resolutions)))
      if self.decoder_type == "skip" or level == 0:
        if self.decoder_type == "skip" and level < last:
          dec.append(LayerSpec(f"{tag}_aux_up", "aux_up", self.out_channels, self.out_channels,
                               up=True))
        dec.append(LayerSpec(f"{tag}_aux_norm", "aux_norm", cout, cout))
        dec.append(LayerSpec(f"{tag}_aux_conv", "aux_conv", cout, self.out_channels))
    return enc, dec

  def torch_buffers(self) -> dict[str, np.ndarray]:
    """Non-learned official buffers (names without the `model.` prefix) and their values."""
    return layout_buffers(self.layout(), self.resample_filter)

  # --------------------------------------------------------------------------------------------
  # Forward pass.
  # --------------------------------------------------------------------------------------------

  def _block(self, spec: LayerSpec, name: str) -> layers.UNetBlock:
    return layers.UNetBlock(
        out_channels=spec.out_channels,
        up=spec.up,
        down=spec.down,
        attention=spec.attention,
        num_heads=1,
        dropout=self.dropout,
        skip_scale=float(np.sqrt(0.5)),
        eps=1e-6,
        resample_filter=tuple(self.resample_filter),
        resample_proj=True,
        adaptive_scale=False,
        init=_INIT,
        init_zero=_INIT_ZERO,
        init_attn=_INIT_ATTN,
        precision=self.precision,
        name=name)

  def _conv(self, spec: LayerSpec, name: str, kernel: int, init=None, **kw) -> layers.Conv2d:
    return layers.Conv2d(spec.out_channels,
                         kernel,
                         init=init or layers.InitSpec(),
                         resample_filter=tuple(self.resample_filter),
                         precision=self.precision,
                         name=name,
                         **kw)

  def _embedding(self, noise_labels, class_labels, augment_labels, train):
    if self.embedding_type == "positional":
      emb = layers.PositionalEmbedding(self.noise_channels, endpoint=True,
                                       name="map_noise")(noise_labels)
    else:
      emb = layers.FourierEmbedding(self.noise_channels, name="map_noise")(noise_labels)
    emb = swap_halves(emb)  # sin first, then cos.
    dense = lambda features, name, **kw: layers.Linear(features, init=_INIT,
                                                       precision=self.precision, name=name, **kw)
    if self.label_dim:
      if class_labels is None:
        raise ValueError(f"SongUNet has label_dim={self.label_dim}; class_labels are required.")
      labels = drop_labels(self, class_labels.astype(emb.dtype), self.label_dropout, train)
      emb = emb + dense(self.noise_channels, "map_label")(labels * np.sqrt(self.label_dim))
    if self.augment_dim:
      map_augment = dense(self.noise_channels, "map_augment", use_bias=False)
      if augment_labels is not None:
        emb = emb + map_augment(augment_labels.astype(emb.dtype))
      elif self.is_initializing():
        map_augment(jnp.zeros((emb.shape[0], self.augment_dim), emb.dtype))
    emb = nn.silu(dense(self.emb_channels, "map_layer0")(emb))
    emb = nn.silu(dense(self.emb_channels, "map_layer1")(emb))
    return emb

  @nn.compact
  def __call__(self, x: Array, noise_labels: Array, class_labels: Array | None,
               augment_labels: Array | None = None, *, train: bool = False,
               output: str = "decoder"):
    check_output(output)
    enc, dec = self.layout()
    emb = self._embedding(noise_labels, class_labels, augment_labels, train)
    out_dtype = x.dtype
    x = to_compute(x, self.dtype)

    # Encoder.
    skips = []
    aux = x
    for spec in enc:
      name = f"enc_{spec.name}"
      if spec.kind == "aux_down":
        aux = self._conv(spec, name, 0, down=True)(aux)
      elif spec.kind == "aux_skip":
        x = skips[-1] = x + self._conv(spec, name, 1, _INIT)(aux)
      elif spec.kind == "aux_residual":
        res = self._conv(spec, name, 3, _INIT, down=True, fused_resample=True)(aux)
        # A Python float: a NumPy scalar would promote a bfloat16 activation to float32.
        x = skips[-1] = aux = (x + res) / float(np.sqrt(2))
      elif spec.kind == "conv":
        x = self._conv(spec, name, 3, _INIT)(x)
        skips.append(x)
      else:
        x = self._block(spec, name)(x, emb, train)
        skips.append(x)

    logits = (jnp.mean(x.astype(out_dtype), axis=-1, keepdims=True)
              if output != "decoder" else None)
    if output == "encoder":
      return logits

    # Decoder.
    aux = None
    tmp = None
    for spec in dec:
      name = f"dec_{spec.name}"
      if spec.kind == "aux_up":
        aux = self._conv(spec, name, 0, up=True)(aux)
      elif spec.kind == "aux_norm":
        tmp = layers.GroupNorm(eps=1e-6, name=name)(x)
      elif spec.kind == "aux_conv":
        tmp = self._conv(spec, name, 3, _INIT_ZERO)(nn.silu(tmp))
        aux = tmp if aux is None else tmp + aux
      else:
        if x.shape[-1] != spec.in_channels:
          x = jnp.concatenate([x, skips.pop()], axis=-1)
        x = self._block(spec, name)(x, emb, train)
    aux = aux.astype(out_dtype)
    if output == "decoder":
      return aux
    return aux, logits


_INIT = layers.InitSpec("xavier_uniform")
_INIT_ZERO = layers.InitSpec("xavier_uniform", weight=1e-5)
_INIT_ATTN = layers.InitSpec("xavier_uniform", weight=float(np.sqrt(0.2)))
