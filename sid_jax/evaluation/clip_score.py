"""CLIP score of text-to-image samples: the mean cosine similarity of image and caption embeddings.

Two preprocessing protocols (`PROTOCOLS`):

'sid-lsg' -- the number SiD-LSG reports, as GigaGAN's `evaluation/evaluation.py` computes it with
  open_clip ViT-g-14 (laion2b_s12b_b42k). Per generated uint8 RGB image, on the host:
    1. centre crop of the long edge to a square (torchvision `center_crop`: offset
       `int(round((size - side) / 2))`, Python's round half to even);
    2. PIL LANCZOS resize to 256x256 (skipped when already 256x256, as torchvision does);
    3. the uint8 round trip of GigaGAN's loader: ToTensor, Normalize(0.5, 0.5), then
       `((x + 1) * 127.5).clamp(0, 255).to(uint8)`, which truncates, so in float32 the values
       1..63 come back one lower (`GIGAGAN_ROUND_TRIP`, a 256-entry table);
    4. open_clip's transform: PIL BICUBIC resize of the shortest side to the model's image_size,
       centre crop to image_size, / 255, normalise with OpenAI's mean and std (on device).
  Captions get the prefix "A photo depicts " (Hessel et al., CLIPScore), are tokenized to 77
  tokens (start token, at most 75 caption tokens, end token: longer captions are truncated and end
  with the end-of-text token), and the score is the mean over images of the raw cosine similarity
  (not x100, not clipped at 0).

'plain' -- the quick in-repo metric during training: on device, uint8 / 255, bicubic resize
  straight to image_size x image_size with `jax.image.resize(method='bicubic')` (Keys cubic,
  a = -0.5, antialiased when downsampling: equal to PIL BICUBIC on float ('F' mode) images to
  ~1e-5), no crop, the same normalisation, captions without prefix.

Both protocols clean captions as OpenAI's tokenizer does, except for ftfy (not a dependency):
HTML entities are unescaped twice and surrounding whitespace stripped; Hugging Face's
`CLIPTokenizer` then collapses whitespace and lowercases. Its padding token does not matter: the
text tower is causal and pools at the first end-of-text token.

`CLIPScorer` runs a `sid_jax.nets.clip.CLIPModel` (e.g. `sid_jax.weights.clip.load_clip_model`
of laion/CLIP-ViT-g-14-laion2B-s12B-b42K) in fixed-size jitted batches.
"""

from __future__ import annotations

import html
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from sid_jax.nets import clip
from sid_jax.weights import clip as clip_params

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
SID_LSG_PREFIX = "A photo depicts "
SID_LSG_RESOLUTION = 256
CONTEXT_LENGTH = 77
PROTOCOLS = ("sid-lsg", "plain")
# The registered `sid_jax.evaluation.protocols` entry of each preprocessing protocol.
REGISTERED = {"sid-lsg": "coco2014-clip30k-vitg14", "plain": "clip-plain"}


def _gigagan_round_trip_table() -> np.ndarray:
  """uint8 -> uint8 table of GigaGAN's float32 [0, 1] -> [-1, 1] -> truncated uint8 round trip."""
  x = np.arange(256, dtype=np.float32) / np.float32(255)
  x = (x - np.float32(0.5)) / np.float32(0.5)
  x = (x + np.float32(1.0)) * np.float32(127.5)
  return np.clip(x, 0, 255).astype(np.uint8)


GIGAGAN_ROUND_TRIP = _gigagan_round_trip_table()


# ---------------------------------------------------------------------------------------------
# Tokenisation.
# ---------------------------------------------------------------------------------------------


def load_tokenizer(folder: str | os.PathLike):
  """`transformers.CLIPTokenizer` from a local folder (vocab.json + merges.txt); no downloads."""
  from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  return CLIPTokenizer.from_pretrained(os.fspath(folder), local_files_only=True)


def clean_caption(text: str) -> str:
  """OpenAI CLIP's text cleaning (`basic_clean`): ftfy's `fix_text` (mojibake, curly quotes,
  ligatures), HTML entities unescaped twice, ends stripped; the fast tokenizer then folds
  whitespace and case as OpenAI's `whitespace_clean` and BPE do."""
  try:
    import ftfy  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("CLIP scores need ftfy (requirements.txt) to clean captions as OpenAI's "
                      "CLIP does.") from e
  return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def tokenize(tokenizer, captions: Sequence[str], prefix: str = "",
             context_length: int = CONTEXT_LENGTH) -> np.ndarray:
  """[N, context_length] int32 token ids of `prefix + caption`.

  Padding to `context_length`; longer texts are truncated to the start token, the first
  `context_length - 2` tokens and the end-of-text token (OpenAI's `tokenize(truncate=True)`).
  """
  texts = [prefix + clean_caption(c) for c in captions]
  ids = np.asarray(tokenizer(texts, padding="max_length", max_length=context_length,
                             truncation=True)["input_ids"], dtype=np.int32)
  if ids.shape != (len(texts), context_length):
    raise ValueError(f"The tokenizer returned shape {ids.shape}, expected "
                     f"{(len(texts), context_length)}.")
  eos = tokenizer.eos_token_id
  # A truncated row that lost its end-of-text token gets it back in the last position.
  no_eos = ~(ids == eos).any(axis=1)
  ids[no_eos, -1] = eos
  return ids


# ---------------------------------------------------------------------------------------------
# Image preprocessing.
# ---------------------------------------------------------------------------------------------


def _centre_crop(image: Image.Image, size: int) -> Image.Image:
  """torchvision `center_crop` of a PIL image to size x size (size <= both sides)."""
  width, height = image.size
  top = int(round((height - size) / 2.0))
  left = int(round((width - size) / 2.0))
  return image.crop((left, top, left + size, top + size))


def _resize_shortest(image: Image.Image, size: int, resample) -> Image.Image:
  """torchvision `Resize(size)` of a PIL image: the shortest side becomes `size`."""
  width, height = image.size
  short, long = min(width, height), max(width, height)
  if short == size:
    return image
  new_long = int(size * long / short)
  new = (size, new_long) if width <= height else (new_long, size)
  return image.resize(new, resample)


def sid_lsg_pixels(image: np.ndarray, image_size: int) -> np.ndarray:
  """Steps 1-4 (before the division by 255) of the 'sid-lsg' protocol for one image.

  Args:
    image: [H, W, 3] uint8 RGB.
    image_size: the CLIP vision tower's input size.

  Returns:
    [image_size, image_size, 3] uint8.
  """
  pil = Image.fromarray(image)
  pil = _centre_crop(pil, min(pil.size))
  if pil.size != (SID_LSG_RESOLUTION, SID_LSG_RESOLUTION):
    pil = pil.resize((SID_LSG_RESOLUTION, SID_LSG_RESOLUTION), Image.LANCZOS)
  pil = Image.fromarray(GIGAGAN_ROUND_TRIP[np.asarray(pil)])
  pil = _centre_crop(_resize_shortest(pil, image_size, Image.BICUBIC), image_size)
  return np.asarray(pil)


def normalize(pixels01: jax.Array) -> jax.Array:
  """[0, 1] RGB -> CLIP input: (x - OpenAI mean) / OpenAI std, channels last."""
  mean = jnp.asarray(OPENAI_MEAN, jnp.float32)
  std = jnp.asarray(OPENAI_STD, jnp.float32)
  return (pixels01 - mean) / std


def plain_pixels(images_uint8: jax.Array, image_size: int) -> jax.Array:
  """The 'plain' CLIP input: /255, bicubic to image_size (jax.image.resize), normalise."""
  x = images_uint8.astype(jnp.float32) / 255.0
  x = jax.image.resize(x, (x.shape[0], image_size, image_size, x.shape[3]), method="bicubic")
  return normalize(x)


# ---------------------------------------------------------------------------------------------
# The scorer.
# ---------------------------------------------------------------------------------------------


def _cosines(model: clip.CLIPModel, params: Any, pixels: jax.Array, ids: jax.Array) -> jax.Array:
  image = model.apply({"params": params}, pixels, method=clip.CLIPModel.get_image_features)
  text = model.apply({"params": params}, ids, method=clip.CLIPModel.get_text_features)
  image = image.astype(jnp.float32)
  text = text.astype(jnp.float32)
  image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
  text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
  return jnp.sum(image * text, axis=-1)


class CLIPScorer:
  """Computes the CLIP score of uint8 images against their captions.

  Attributes:
    model: the `CLIPModel`.
    params: its params (moved to the default device once).
    tokenizer: a `transformers.CLIPTokenizer`.
    protocol: 'sid-lsg' or 'plain' (see the module docstring).
    batch_size: images per jitted call; the last batch is padded, so one compilation per input
      size.
  """

  def __init__(self, model: clip.CLIPModel, params: Any, tokenizer, protocol: str = "sid-lsg",
               batch_size: int = 32):
    if protocol not in PROTOCOLS:
      raise ValueError(f"Unknown CLIP score protocol {protocol!r}; expected one of {PROTOCOLS}.")
    if batch_size < 1:
      raise ValueError(f"batch_size must be positive, got {batch_size}.")
    if model.text_model.max_position_embeddings < CONTEXT_LENGTH:
      raise ValueError(f"The text tower takes {model.text_model.max_position_embeddings} tokens, "
                       f"fewer than CLIP's context length {CONTEXT_LENGTH}.")
    if model.vision_model.num_channels != 3:
      raise ValueError("The CLIP score needs an RGB vision tower (num_channels=3).")
    self.model = model
    self.params = jax.device_put(params)
    self.tokenizer = tokenizer
    self.protocol = protocol
    self.batch_size = int(batch_size)
    self.image_size = model.vision_model.image_size
    self._batch = jax.jit(self._batch_cosines)

  @property
  def prefix(self) -> str:
    return SID_LSG_PREFIX if self.protocol == "sid-lsg" else ""

  @property
  def registered_protocol(self) -> str:
    """The name of this protocol in `sid_jax.evaluation.protocols`."""
    return REGISTERED[self.protocol]

  def token_ids(self, captions: Sequence[str]) -> np.ndarray:
    """[N, 77] int32 ids of the captions as this protocol tokenizes them (prefix included)."""
    return tokenize(self.tokenizer, captions, prefix=self.prefix)

  def host_pixels(self, images: np.ndarray) -> np.ndarray:
    """The uint8 images the jitted step receives: preprocessed for 'sid-lsg', as is for 'plain'."""
    if self.protocol == "plain":
      return images
    return np.stack([sid_lsg_pixels(image, self.image_size) for image in images])

  def _batch_cosines(self, params: Any, images_uint8: jax.Array, ids: jax.Array) -> jax.Array:
    if self.protocol == "plain":
      pixels = plain_pixels(images_uint8, self.image_size)
    else:
      pixels = normalize(images_uint8.astype(jnp.float32) / 255.0)
    return _cosines(self.model, params, pixels, ids)

  def score(self, images: Any, captions: Sequence[str]) -> dict[str, Any]:
    """CLIP score of `images` (uint8 NHWC RGB) against `captions` (one per image).

    Returns:
      dict(mean=float, per_image=[N] float32 cosines, protocol=..., registered_protocol=...,
      num_images=N).

    Raises:
      ValueError for images that are not uint8 [N, H, W, 3] or a caption count other than N.
    """
    images = _check_images(images)
    captions = _check_captions(captions, len(images))
    ids = self.token_ids(captions)
    out = []
    for start in range(0, len(images), self.batch_size):
      batch_images = self.host_pixels(images[start:start + self.batch_size])
      batch_ids = ids[start:start + self.batch_size]
      n = len(batch_images)
      pad = self.batch_size - n
      if pad:
        batch_images = np.concatenate(
            [batch_images, np.zeros((pad,) + batch_images.shape[1:], np.uint8)])
        batch_ids = np.concatenate([batch_ids, np.repeat(batch_ids[-1:], pad, axis=0)])
      cos = self._batch(self.params, jnp.asarray(batch_images), jnp.asarray(batch_ids))
      out.append(np.asarray(cos)[:n])
    per_image = np.concatenate(out).astype(np.float32)
    return dict(mean=float(np.mean(per_image, dtype=np.float64)), per_image=per_image,
                protocol=self.protocol, registered_protocol=self.registered_protocol,
                num_images=len(per_image))


def _check_images(images: Any) -> np.ndarray:
  if isinstance(images, jax.Array):
    images = np.asarray(images)
  if not isinstance(images, np.ndarray):
    raise ValueError(f"images must be a uint8 array [N, H, W, 3], got {type(images).__name__}.")
  if images.dtype != np.uint8:
    raise ValueError(f"images must be uint8 (0..255), got dtype {images.dtype}.")
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be NHWC with 3 channels [N, H, W, 3], got shape "
                     f"{images.shape}.")
  if images.shape[0] == 0 or images.shape[1] == 0 or images.shape[2] == 0:
    raise ValueError(f"images must not be empty, got shape {images.shape}.")
  return images


def _check_captions(captions: Sequence[str], num: int) -> list[str]:
  if isinstance(captions, str):
    raise ValueError("captions must be a sequence of strings (one per image), not one string.")
  captions = list(captions)
  if not all(isinstance(c, str) for c in captions):
    raise ValueError("captions must all be strings.")
  if len(captions) != num:
    raise ValueError(f"Got {num} images but {len(captions)} captions; one caption per image.")
  return captions


def load_scorer(clip_folder: str | os.PathLike, tokenizer_folder: str | os.PathLike | None = None,
                protocol: str = "sid-lsg", batch_size: int = 32, **kw) -> CLIPScorer:
  """A `CLIPScorer` from a local Hugging Face CLIPModel folder (tokenizer files in it by default).

  Args:
    clip_folder: config.json + weights of a `CLIPModel`.
    tokenizer_folder: the tokenizer's folder if it is not `clip_folder`.
    protocol: 'sid-lsg' or 'plain'.
    batch_size: images per jitted call.
    **kw: `dtype` / `precision` for the model.
  """
  model, params = clip_params.load_clip_model(clip_folder, **kw)
  tokenizer = load_tokenizer(tokenizer_folder if tokenizer_folder is not None else clip_folder)
  return CLIPScorer(model, params, tokenizer, protocol=protocol, batch_size=batch_size)
