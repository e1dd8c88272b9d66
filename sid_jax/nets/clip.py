"""CLIP text and vision towers in Flax linen, numerically equal to Hugging Face's `CLIPModel`.

Three modules:
  * `CLIPTextTransformer`: token + position embeddings, a pre-LN transformer with a causal mask,
    a final LayerNorm; returns the normalised hidden states (what Stable Diffusion conditions on)
    and the hidden state at the end-of-text token (the pooled output). This is Stable Diffusion's
    `text_encoder` (`CLIPTextModel`): quick_gelu for SD 1.x (OpenAI CLIP ViT-L/14), exact gelu for
    SD 2.x (OpenCLIP ViT-H/14).
  * `CLIPVisionTransformer`: a ViT with a bias-free patch convolution, a class token, learned
    position embeddings, a LayerNorm before the encoder (Hugging Face's `pre_layrnorm`) and one on
    the class token after it.
  * `CLIPModel`: both towers plus their bias-free projections into the joint embedding space and
    the `logit_scale` scalar.

Submodules and parameters carry Hugging Face's names (`embeddings/token_embedding`,
`encoder/layers_0/self_attn/q_proj`, `mlp/fc1`, `layer_norm1`, `final_layer_norm`, ...; a Flax list
element `layers_<i>` is torch's `layers.<i>`), so `sid_jax.weights.clip` maps each Flax
path to its torch name by renaming leaves only. Everything is inference-only (no dropout).

Images are NHWC float arrays already normalised with CLIP's mean and std (see
`sid_jax.evaluation.clip_score` for the preprocessing). Matmuls default to
`Precision.HIGHEST`; attention softmax and LayerNorm statistics are always computed in float32.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

DEFAULT_PRECISION = jax.lax.Precision.HIGHEST

# The token id pre-2023 Hugging Face configs give as `eos_token_id` (the real one is 49407). With
# it, transformers pools at the largest token id, which is the end-of-text token in CLIP's
# vocabulary; with any other value it pools at the first occurrence of that id.
LEGACY_EOS_TOKEN_ID = 2


def quick_gelu(x: Array) -> Array:
  """OpenAI CLIP's sigmoid approximation of GELU: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


def exact_gelu(x: Array) -> Array:
  """GELU with the exact error function (not the tanh approximation)."""
  return nn.gelu(x, approximate=False)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "quick_gelu": quick_gelu,
    "gelu": exact_gelu,
}


def _activation(name: str) -> Callable[[Array], Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f"Unsupported CLIP hidden_act {name!r}; supported: {sorted(ACTIVATIONS)}.")
  return ACTIVATIONS[name]


def _layer_norm(eps: float, dtype: Dtype, name: str) -> nn.LayerNorm:
  # Two-pass variance, as torch's LayerNorm computes it.
  return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


# ---------------------------------------------------------------------------------------------
# The shared transformer encoder.
# ---------------------------------------------------------------------------------------------


class CLIPAttention(nn.Module):
  """Multi-head self-attention with separate q/k/v/out projections (all with biases)."""
  hidden_size: int
  num_attention_heads: int
  dtype: Dtype = jnp.float32
  precision: Any = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x: Array, mask: Array | None = None) -> Array:
    """Attends over the sequence axis.

    Args:
      x: [B, L, D] hidden states.
      mask: optional boolean [L, L] (or broadcastable to [B, H, L, L]); True = may attend.

    Returns:
      [B, L, D].
    """
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                       f"num_attention_heads {self.num_attention_heads}.")
    head_dim = self.hidden_size // self.num_attention_heads
    batch, length, _ = x.shape

    def project(name: str) -> Array:
      y = nn.Dense(self.hidden_size, dtype=self.dtype, precision=self.precision, name=name)(x)
      return y.reshape(batch, length, self.num_attention_heads, head_dim)

    q, k, v = project("q_proj"), project("k_proj"), project("v_proj")
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=self.precision)
    logits = logits.astype(jnp.float32) * (head_dim ** -0.5)
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v, precision=self.precision)
    out = out.reshape(batch, length, self.hidden_size)
    return nn.Dense(self.hidden_size, dtype=self.dtype, precision=self.precision,
                    name="out_proj")(out)


class CLIPMLP(nn.Module):
  """fc1 -> activation -> fc2."""
  hidden_size: int
  intermediate_size: int
  hidden_act: str
  dtype: Dtype = jnp.float32
  precision: Any = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x: Array) -> Array:
    act = _activation(self.hidden_act)
    h = nn.Dense(self.intermediate_size, dtype=self.dtype, precision=self.precision,
                 name="fc1")(x)
    return nn.Dense(self.hidden_size, dtype=self.dtype, precision=self.precision,
                    name="fc2")(act(h))


class CLIPEncoderLayer(nn.Module):
  """Pre-LN block: x + attn(LN(x)), then x + mlp(LN(x))."""
  hidden_size: int
  intermediate_size: int
  num_attention_heads: int
  hidden_act: str
  layer_norm_eps: float
  dtype: Dtype = jnp.float32
  precision: Any = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x: Array, mask: Array | None = None) -> Array:
    h = _layer_norm(self.layer_norm_eps, self.dtype, "layer_norm1")(x)
    x = x + CLIPAttention(self.hidden_size, self.num_attention_heads, dtype=self.dtype,
                          precision=self.precision, name="self_attn")(h, mask)
    h = _layer_norm(self.layer_norm_eps, self.dtype, "layer_norm2")(x)
    return x + CLIPMLP(self.hidden_size, self.intermediate_size, self.hidden_act,
                       dtype=self.dtype, precision=self.precision, name="mlp")(h)


class CLIPEncoder(nn.Module):
  """`num_hidden_layers` encoder layers, named `layers_0`, `layers_1`, ..."""
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  hidden_act: str
  layer_norm_eps: float
  dtype: Dtype = jnp.float32
  precision: Any = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x: Array, mask: Array | None = None) -> Array:
    for i in range(self.num_hidden_layers):
      x = CLIPEncoderLayer(self.hidden_size, self.intermediate_size, self.num_attention_heads,
                           self.hidden_act, self.layer_norm_eps, dtype=self.dtype,
                           precision=self.precision, name=f"layers_{i}")(x, mask)
    return x


# ---------------------------------------------------------------------------------------------
# Text tower.
# ---------------------------------------------------------------------------------------------


class CLIPTextEmbeddings(nn.Module):
  """Token embedding plus learned absolute position embedding."""
  vocab_size: int
  hidden_size: int
  max_position_embeddings: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: Array) -> Array:
    length = input_ids.shape[-1]
    if length > self.max_position_embeddings:
      raise ValueError(f"Sequence length {length} exceeds max_position_embeddings "
                       f"{self.max_position_embeddings}.")
    tokens = nn.Embed(self.vocab_size, self.hidden_size, dtype=self.dtype,
                      name="token_embedding")(input_ids)
    positions = nn.Embed(self.max_position_embeddings, self.hidden_size, dtype=self.dtype,
                         name="position_embedding")(jnp.arange(length))
    return tokens + positions[None]


class CLIPTextTransformer(nn.Module):
  """CLIP's text encoder (Hugging Face `CLIPTextModel`), causal attention only.

  Attributes:
    vocab_size: number of token ids (49408 for CLIP's BPE vocabulary).
    hidden_size: width D.
    intermediate_size: MLP width.
    num_hidden_layers: number of encoder layers.
    num_attention_heads: heads per attention layer.
    max_position_embeddings: longest sequence (77).
    hidden_act: 'quick_gelu' (OpenAI CLIP, SD 1.x) or 'gelu' (exact erf; OpenCLIP, SD 2.x).
    layer_norm_eps: LayerNorm epsilon.
    eos_token_id: the config's end-of-text id; `LEGACY_EOS_TOKEN_ID` (2) selects the legacy
      "pool at the largest id" rule, any other value pools at its first occurrence.
    dtype: compute dtype (parameters stay float32).
    precision: matmul precision.
  """
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407
  dtype: Dtype = jnp.float32
  precision: Any = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Array | None = None
               ) -> tuple[Array, Array]:
    """Encodes token ids.

    Args:
      input_ids: [B, L] integer token ids, L <= max_position_embeddings.
      attention_mask: must be None. Stable Diffusion and CLIP scoring use the causal mask alone;
        padding after the end-of-text token cannot influence earlier positions anyway.

    Returns:
      (last_hidden_state [B, L, D] after the final LayerNorm, pooled [B, D]).
    """
    if attention_mask is not None:
      raise ValueError("CLIPTextTransformer applies the causal mask only; pass "
                       "attention_mask=None.")
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}.")
    input_ids = input_ids.astype(jnp.int32)
    x = CLIPTextEmbeddings(self.vocab_size, self.hidden_size, self.max_position_embeddings,
                           dtype=self.dtype, name="embeddings")(input_ids)
    length = input_ids.shape[1]
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    x = CLIPEncoder(self.hidden_size, self.intermediate_size, self.num_hidden_layers,
                    self.num_attention_heads, self.hidden_act, self.layer_norm_eps,
                    dtype=self.dtype, precision=self.precision, name="encoder")(x, causal)
    x = _layer_norm(self.layer_norm_eps, self.dtype, "final_layer_norm")(x)
    if self.eos_token_id == LEGACY_EOS_TOKEN_ID:
      position = jnp.argmax(input_ids, axis=-1)
    else:
      position = jnp.argmax(input_ids == self.eos_token_id, axis=-1)
    pooled = jnp.take_along_axis(x, position[:, None, None], axis=1)[:, 0]
    return x, pooled


# ---------------------------------------------------------------------------------------------
# Vision tower.
# ---------------------------------------------------------------------------------------------


class CLIPVisionEmbeddings(nn.Module):
  """Bias-free patch convolution, class token, learned position embedding."""
  image_size: int
  patch_size: int
  hidden_size: int
  dtype: Dtype = jnp.float32
  precision: Any = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, pixel_values: Array) -> Array:
    batch = pixel_values.shape[0]
    patches = nn.Conv(self.hidden_size, (self.patch_size, self.patch_size),
                      strides=(self.patch_size, self.patch_size), padding="VALID", use_bias=False,
                      dtype=self.dtype, precision=self.precision,
                      name="patch_embedding")(pixel_values)
    patches = patches.reshape(batch, -1, self.hidden_size)  # Row-major over the patch grid.
    cls = self.param("class_embedding", nn.initializers.normal(1.0), (self.hidden_size,))
    cls = jnp.broadcast_to(cls.astype(self.dtype), (batch, 1, self.hidden_size))
    x = jnp.concatenate([cls, patches], axis=1)
    num_positions = (self.image_size // self.patch_size) ** 2 + 1
    positions = nn.Embed(num_positions, self.hidden_size, dtype=self.dtype,
                         name="position_embedding")(jnp.arange(num_positions))
    return x + positions[None]


class CLIPVisionTransformer(nn.Module):
  """CLIP's image encoder (Hugging Face `CLIPVisionModel`).

  Attributes:
    image_size: input height and width (square inputs only).
    patch_size: patch (and stride) size of the patch convolution.
    num_channels: input channels.
    hidden_size: width D.
    intermediate_size: MLP width.
    num_hidden_layers: number of encoder layers.
    num_attention_heads: heads per attention layer.
    hidden_act: 'quick_gelu' or 'gelu'.
    layer_norm_eps: LayerNorm epsilon.
    dtype: compute dtype (parameters stay float32).
    precision: matmul / convolution precision.
  """
  image_size: int = 224
  patch_size: int = 32
  num_channels: int = 3
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32
  precision: Any = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, pixel_values: Array) -> tuple[Array, Array]:
    """Encodes normalised images.

    Args:
      pixel_values: [B, image_size, image_size, num_channels] floats, already normalised.

    Returns:
      (last_hidden_state [B, 1 + num_patches, D] (no final LayerNorm, as Hugging Face),
       pooled [B, D] = post-LayerNorm of the class token).
    """
    want = (self.image_size, self.image_size, self.num_channels)
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
      raise ValueError(f"pixel_values must be NHWC [batch, {want[0]}, {want[1]}, {want[2]}], got "
                       f"shape {tuple(pixel_values.shape)}.")
    x = CLIPVisionEmbeddings(self.image_size, self.patch_size, self.hidden_size, dtype=self.dtype,
                             precision=self.precision,
                             name="embeddings")(pixel_values.astype(self.dtype))
    x = _layer_norm(self.layer_norm_eps, self.dtype, "pre_layrnorm")(x)
    x = CLIPEncoder(self.hidden_size, self.intermediate_size, self.num_hidden_layers,
                    self.num_attention_heads, self.hidden_act, self.layer_norm_eps,
                    dtype=self.dtype, precision=self.precision, name="encoder")(x)
    pooled = _layer_norm(self.layer_norm_eps, self.dtype, "post_layernorm")(x[:, 0])
    return x, pooled


# ---------------------------------------------------------------------------------------------
# Both towers with projections.
# ---------------------------------------------------------------------------------------------


class CLIPModel(nn.Module):
  """Text and vision towers with bias-free projections to `projection_dim`, and `logit_scale`.

  Attributes:
    text_model: the text tower.
    vision_model: the vision tower.
    projection_dim: width of the joint embedding space.
    logit_scale_init_value: initial log of the logit temperature (only used by `init`).
    dtype: compute dtype of the projections.
    precision: matmul precision of the projections.
  """
  text_model: CLIPTextTransformer
  vision_model: CLIPVisionTransformer
  projection_dim: int = 512
  logit_scale_init_value: float = 2.6592
  dtype: Dtype = jnp.float32
  precision: Any = DEFAULT_PRECISION

  def setup(self):
    self.text_projection = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype,
                                    precision=self.precision)
    self.visual_projection = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype,
                                      precision=self.precision)
    self.logit_scale = self.param("logit_scale",
                                  nn.initializers.constant(self.logit_scale_init_value), ())

  def get_text_features(self, input_ids: Array) -> Array:
    """[B, L] token ids -> [B, projection_dim] projected pooled text features (not normalised)."""
    _, pooled = self.text_model(input_ids)
    return self.text_projection(pooled)

  def get_image_features(self, pixel_values: Array) -> Array:
    """[B, H, W, C] normalised images -> [B, projection_dim] projected features (not normalised)."""
    _, pooled = self.vision_model(pixel_values)
    return self.visual_projection(pooled)

  def __call__(self, input_ids: Array, pixel_values: Array) -> tuple[Array, Array, Array]:
    """Returns (text_features, image_features, logits_per_image).

    logits_per_image[i, j] = exp(logit_scale) * cos(image_i, text_j), as Hugging Face's.
    """
    text = self.get_text_features(input_ids)
    image = self.get_image_features(pixel_values)
    text_n = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
    image_n = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
    logits = jnp.exp(self.logit_scale) * jnp.einsum("id,td->it", image_n, text_n,
                                                    precision=self.precision)
    return text, image, logits


# ---------------------------------------------------------------------------------------------
# Factories from Hugging Face config.json contents.
# ---------------------------------------------------------------------------------------------

# Defaults of transformers' CLIPTextConfig / CLIPVisionConfig / CLIPConfig, used for keys a
# config.json leaves out (transformers does the same when it loads the config).
TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                     num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                     hidden_act="quick_gelu", layer_norm_eps=1e-5, eos_token_id=49407)
VISION_DEFAULTS = dict(image_size=224, patch_size=32, num_channels=3, hidden_size=768,
                       intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       hidden_act="quick_gelu", layer_norm_eps=1e-5)
CLIP_DEFAULTS = dict(projection_dim=512, logit_scale_init_value=2.6592)

_TEXT_MODEL_TYPES = ("clip_text_model",)
_VISION_MODEL_TYPES = ("clip_vision_model",)
_CLIP_MODEL_TYPES = ("clip",)


def _square(value: Any, key: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise ValueError(f"Unsupported CLIP {key} {value!r}: only square sizes are supported.")
    value = value[0]
  return int(value)


def _settings(cfg: Mapping[str, Any], defaults: Mapping[str, Any], model_types: tuple[str, ...],
              what: str) -> dict[str, Any]:
  """The module fields from `cfg`, defaults filled in, unsupported settings rejected."""
  model_type = cfg.get("model_type")
  if model_type is not None and model_type not in model_types:
    raise ValueError(f"Unsupported {what} model_type {model_type!r}; expected one of "
                     f"{list(model_types)}.")
  out = {key: cfg.get(key, default) for key, default in defaults.items()}
  for key, value in out.items():
    if value is None:
      raise ValueError(f"Unsupported {what} setting {key}=None.")
  _activation(out["hidden_act"])
  if out["hidden_size"] % out["num_attention_heads"]:
    raise ValueError(f"Unsupported {what} setting: hidden_size {out['hidden_size']} is not a "
                     f"multiple of num_attention_heads {out['num_attention_heads']}.")
  if "eos_token_id" in out and not isinstance(out["eos_token_id"], int):
    raise ValueError(f"Unsupported {what} setting eos_token_id={out['eos_token_id']!r}: a single "
                     "int is needed.")
  for key in ("image_size", "patch_size"):
    if key in out:
      out[key] = _square(out[key], key)
  if "image_size" in out and out["image_size"] % out["patch_size"]:
    raise ValueError(f"Unsupported {what} setting: image_size {out['image_size']} is not a "
                     f"multiple of patch_size {out['patch_size']}.")
  out["layer_norm_eps"] = float(out["layer_norm_eps"])
  return out


def _sub_config(cfg: Mapping[str, Any], key: str) -> dict[str, Any]:
  """`text_config` / `vision_config`, updated by the legacy `*_config_dict` entries if present."""
  merged = dict(cfg.get(key) or {})
  merged.update(cfg.get(f"{key}_dict") or {})
  return merged


def text_model_from_hf_config(cfg: Mapping[str, Any], **kw) -> CLIPTextTransformer:
  """A `CLIPTextTransformer` from a `CLIPTextConfig` dict (e.g. SD's text_encoder/config.json).

  Args:
    cfg: the config.json contents of a `CLIPTextModel`.
    **kw: module fields to set or override, e.g. `dtype=jnp.bfloat16`.

  Raises:
    ValueError: for a full `CLIPModel` config or an unsupported setting (unknown hidden_act, ...).
  """
  if "text_config" in cfg or "vision_config" in cfg:
    raise ValueError("This is a CLIPModel config (it has text_config / vision_config); use "
                     "clip_model_from_hf_config.")
  return CLIPTextTransformer(**{**_settings(cfg, TEXT_DEFAULTS, _TEXT_MODEL_TYPES, "text"),
                                **kw})


def vision_model_from_hf_config(cfg: Mapping[str, Any], **kw) -> CLIPVisionTransformer:
  """A `CLIPVisionTransformer` from a `CLIPVisionConfig` dict; see `text_model_from_hf_config`."""
  return CLIPVisionTransformer(**{**_settings(cfg, VISION_DEFAULTS, _VISION_MODEL_TYPES,
                                              "vision"), **kw})


def clip_model_from_hf_config(cfg: Mapping[str, Any], **kw) -> CLIPModel:
  """A `CLIPModel` from a `CLIPConfig` dict (`text_config`, `vision_config`, `projection_dim`).

  Args:
    cfg: the config.json contents of a Hugging Face `CLIPModel`.
    **kw: `dtype` / `precision`, applied to both towers and the projections.

  Raises:
    ValueError: for a config that is not a CLIPModel's or has an unsupported setting.
  """
  model_type = cfg.get("model_type")
  if model_type is not None and model_type not in _CLIP_MODEL_TYPES:
    raise ValueError(f"Unsupported CLIPModel model_type {model_type!r}; expected one of "
                     f"{list(_CLIP_MODEL_TYPES)}.")
  unknown = sorted(set(kw) - {"dtype", "precision"})
  if unknown:
    raise ValueError(f"clip_model_from_hf_config accepts only dtype / precision overrides, got "
                     f"{unknown}.")
  text_cfg = _sub_config(cfg, "text_config")
  vision_cfg = _sub_config(cfg, "vision_config")
  settings = {key: cfg.get(key, default) for key, default in CLIP_DEFAULTS.items()}
  if settings["projection_dim"] is None:
    raise ValueError("Unsupported CLIPModel setting projection_dim=None.")
  return CLIPModel(text_model=text_model_from_hf_config(text_cfg, **kw),
                   vision_model=vision_model_from_hf_config(vision_cfg, **kw),
                   projection_dim=int(settings["projection_dim"]),
                   logit_scale_init_value=float(settings["logit_scale_init_value"]), **kw)
