"""Flax CLIP: parity with transformers' PyTorch CLIP through the strict importer, and the CLIP score.

Tiny random-weight models (hidden 32, 2 layers, the 514-token byte-level vocabulary of
`tests/tiny_tokenizer.py`) are saved with `save_pretrained` and loaded through
`sid_jax.weights.clip`, the path users run. The CLIP score is recomputed independently with
the PyTorch model, PIL and torch tensor ops following GigaGAN's evaluator step by step.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.numpy import save_file

from sid_jax import evaluate
from sid_jax.weights import clip as clip_params
from sid_jax.weights import readers
from sid_jax.evaluation import clip_score, protocols, sources
from sid_jax.nets import clip
from tests import tiny_tokenizer

TOL = 1e-4
TEXT = dict(vocab_size=514, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, bos_token_id=512)
VISION = dict(image_size=30, patch_size=6, hidden_size=32, intermediate_size=37,
              num_hidden_layers=2, num_attention_heads=4)
LONG = "a long caption " + "x " * 90  # > 77 tokens: one token per letter.
PROMPTS = ["", "A photo of a Cat!", "two  dogs &amp; a frisbee", LONG]
# SD 1.x text encoder: quick_gelu and the legacy eos_token_id 2 (pooling at the largest id);
# SD 2.x: exact gelu and the real end-of-text id (pooling at its first occurrence), '!' padding.
TEXT_CASES = {
    "quick_gelu": dict(hidden_act="quick_gelu", eos_token_id=2, pad_token_id=1),
    "gelu": dict(hidden_act="gelu", eos_token_id=tiny_tokenizer.EOS_ID, pad_token_id=0),
}


def _max_err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
  root = tmp_path_factory.mktemp("tokenizers")
  return {pad: clip_score.load_tokenizer(tiny_tokenizer.write_tiny_clip_tokenizer(root / name,
                                                                                  pad_token=pad))
          for name, pad in (("eos", tiny_tokenizer.EOS), ("bang", "!"))}


@pytest.fixture(scope="module")
def text_models(tmp_path_factory):
  """act -> (torch CLIPTextModel, folder written by save_pretrained)."""
  out = {}
  for act, extra in TEXT_CASES.items():
    torch.manual_seed(0)
    model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT, **extra)).eval()
    folder = tmp_path_factory.mktemp(f"text_{act}")
    model.save_pretrained(folder)
    out[act] = (model, str(folder))
  return out


def _redraw(model, seed, std=0.1):
  """Every parameter but the logit scale redrawn, so that no bias is zero and no norm scale one
  (transformers' init) and a mis-mapped bias or scale shows: matrices and embeddings
  N(0, std^2), norm scales 1 + N(0, 0.1^2), biases and the class embedding N(0, 0.05^2)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name == "logit_scale":
        continue
      noise = torch.randn(p.shape, generator=g)
      if p.ndim > 1:
        p.copy_(std * noise)
      elif name.endswith("weight"):  # the 1-D weights are the layer norms' scales
        p.copy_(1.0 + 0.1 * noise)
      else:
        p.copy_(0.05 * noise)
  return model


@pytest.fixture(scope="module")
def clip_torch(tmp_path_factory):
  """(torch CLIPModel with every weight redrawn, {format: folder}) with safetensors, sharded
  safetensors and .bin copies."""
  torch.manual_seed(1)
  config = transformers.CLIPConfig(
      text_config=dict(TEXT, hidden_act="gelu", eos_token_id=tiny_tokenizer.EOS_ID),
      vision_config=VISION, projection_dim=16, logit_scale_init_value=2.5)
  model = _redraw(transformers.CLIPModel(config).eval(), 1)
  folders = {}
  folders["safetensors"] = tmp_path_factory.mktemp("clip_st")
  model.save_pretrained(folders["safetensors"])
  folders["sharded"] = tmp_path_factory.mktemp("clip_sharded")
  model.save_pretrained(folders["sharded"], max_shard_size="20KB")
  folders["bin"] = tmp_path_factory.mktemp("clip_bin")
  model.config.save_pretrained(folders["bin"])
  torch.save(model.state_dict(), folders["bin"] / "pytorch_model.bin")
  return model, {k: str(v) for k, v in folders.items()}


@pytest.fixture(scope="module")
def clip_flax(clip_torch):
  return clip_params.load_clip_model(clip_torch[1]["safetensors"])


# ---------------------------------------------------------------------------------------------
# The tiny tokenizer.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pad", [tiny_tokenizer.EOS, "!"])
def test_tiny_tokenizer(tokenizers, pad):
  tok = tokenizers[pad]
  pad_id = tiny_tokenizer.EOS_ID if pad == tiny_tokenizer.EOS else 0
  assert len(tok) == tiny_tokenizer.VOCAB_SIZE and tok.pad_token_id == pad_id
  ids = clip_score.tokenize(tok, ["", "ab c", LONG])
  assert ids.shape == (3, 77) and ids.dtype == np.int32
  assert ids[0].tolist() == [tiny_tokenizer.BOS_ID, tiny_tokenizer.EOS_ID] + [pad_id] * 75
  # Byte-level symbols without merges: one token per character, `</w>` ending each word.
  assert tok.convert_ids_to_tokens(ids[1, :5].tolist()) == [tiny_tokenizer.BOS, "a", "b</w>",
                                                           "c</w>", tiny_tokenizer.EOS]
  # Truncation keeps the start token, 75 tokens and the end-of-text token.
  assert ids[2, 0] == tiny_tokenizer.BOS_ID and ids[2, 76] == tiny_tokenizer.EOS_ID
  assert tiny_tokenizer.EOS_ID not in ids[2, :76].tolist()


# ---------------------------------------------------------------------------------------------
# Parity with transformers.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", sorted(TEXT_CASES))
def test_text_encoder_parity(text_models, tokenizers, act):
  torch_model, folder = text_models[act]
  module, params = clip_params.load_text_encoder(folder)
  assert module.hidden_act == act and module.eos_token_id == TEXT_CASES[act]["eos_token_id"]
  tok = tokenizers[tiny_tokenizer.EOS if act == "quick_gelu" else "!"]
  ids = clip_score.tokenize(tok, PROMPTS)
  with torch.no_grad():
    ref = torch_model(torch.from_numpy(ids).long())
  hidden, pooled = module.apply({"params": params}, jnp.asarray(ids))
  assert hidden.shape == (len(PROMPTS), 77, 32) and pooled.shape == (len(PROMPTS), 32)
  assert _max_err(hidden, ref.last_hidden_state) < TOL
  assert _max_err(pooled, ref.pooler_output) < TOL
  # The pooled output is the hidden state at the end-of-text token.
  eos_at = np.argmax(ids == tiny_tokenizer.EOS_ID, axis=1)
  np.testing.assert_array_equal(np.asarray(pooled), np.asarray(hidden)[np.arange(len(ids)), eos_at])


def test_pooling_rules_follow_transformers(text_models):
  """Legacy eos_token_id 2 pools at the largest id, any other id at its first occurrence."""
  torch_model, folder = text_models["gelu"]
  module, params = clip_params.load_text_encoder(folder)
  ids = np.random.default_rng(3).integers(0, 300, (2, 20))
  ids[:, 4], ids[:, 9], ids[1, 15] = 511, 300, 300  # 300 is not the largest id here.
  pooled = {}
  try:
    for eos in (2, 300):
      torch_model.eos_token_id = eos
      with torch.no_grad():
        ref = torch_model(torch.from_numpy(ids).long()).pooler_output
      pooled[eos] = module.clone(eos_token_id=eos).apply({"params": params}, jnp.asarray(ids))[1]
      assert _max_err(pooled[eos], ref) < TOL
  finally:
    torch_model.eos_token_id = TEXT_CASES["gelu"]["eos_token_id"]
  hidden = np.asarray(module.apply({"params": params}, jnp.asarray(ids))[0])
  np.testing.assert_array_equal(np.asarray(pooled[2]), hidden[:, 4])
  np.testing.assert_array_equal(np.asarray(pooled[300]), hidden[:, 9])


def test_text_encoder_from_transformers4_layout(text_models, tokenizers, tmp_path):
  """`text_model.`-prefixed names and the position_ids buffer, as SD's text_encoder/ stores them."""
  torch_model, folder = text_models["quick_gelu"]
  state = {"text_model." + k: v.numpy() for k, v in torch_model.state_dict().items()}
  state["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
  save_file(state, str(tmp_path / "model.fp16.safetensors"))
  with open(os.path.join(folder, "config.json")) as f:
    (tmp_path / "config.json").write_text(f.read())
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    clip_params.load_text_encoder(tmp_path)
  module, params = clip_params.load_text_encoder(tmp_path, variant="fp16")
  ids = clip_score.tokenize(tokenizers[tiny_tokenizer.EOS], PROMPTS[:2])
  with torch.no_grad():
    ref = torch_model(torch.from_numpy(ids).long()).pooler_output
  assert _max_err(module.apply({"params": params}, jnp.asarray(ids))[1], ref) < TOL


@pytest.mark.parametrize("fmt", ["safetensors", "sharded", "bin"])
def test_clip_model_parity(clip_torch, tokenizers, fmt):
  torch_model, folders = clip_torch
  if fmt == "sharded":
    assert os.path.exists(os.path.join(folders[fmt], "model.safetensors.index.json"))
  module, params = clip_params.load_clip_model(folders[fmt])
  assert module.projection_dim == 16 and module.vision_model.image_size == 30
  ids = clip_score.tokenize(tokenizers["!"], PROMPTS)
  pixels = np.random.default_rng(0).normal(size=(2, 30, 30, 3)).astype(np.float32)
  with torch.no_grad():
    ref_text = torch_model.get_text_features(torch.from_numpy(ids).long()).pooler_output
    ref_image = torch_model.get_image_features(
        torch.from_numpy(pixels.transpose(0, 3, 1, 2))).pooler_output
  text = module.apply({"params": params}, jnp.asarray(ids),
                      method=clip.CLIPModel.get_text_features)
  image = module.apply({"params": params}, jnp.asarray(pixels),
                       method=clip.CLIPModel.get_image_features)
  assert text.shape == (len(PROMPTS), 16) and image.shape == (2, 16)
  assert _max_err(text, ref_text) < TOL and _max_err(image, ref_image) < TOL
  assert float(params["logit_scale"]) == pytest.approx(2.5)
  with torch.no_grad():
    ref_logits = torch_model(input_ids=torch.from_numpy(ids[:2]).long(),
                             pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
  logits = module.apply({"params": params}, jnp.asarray(ids[:2]), jnp.asarray(pixels))[2]
  scale = np.exp(2.5)  # Compare the cosines inside the logits.
  assert _max_err(np.asarray(logits) / scale, ref_logits.logits_per_image / scale) < TOL


# ---------------------------------------------------------------------------------------------
# Strictness and configs.
# ---------------------------------------------------------------------------------------------


def test_importer_is_strict(text_models, clip_torch, clip_flax):
  torch_model, folder = text_models["gelu"]
  module, _ = clip_params.load_text_encoder(folder)
  state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  name = "encoder.layers.1.mlp.fc2.bias"
  with pytest.raises(ValueError, match=r"1 missing:\n\s+encoder\.layers\.1\.mlp\.fc2\.bias"):
    clip_params.text_encoder_params({k: v for k, v in state.items() if k != name}, module)
  with pytest.raises(ValueError, match=r"1 unexpected:\n\s+encoder\.layers\.2\.mlp\.fc2\.bias"):
    clip_params.text_encoder_params(dict(state, **{"encoder.layers.2.mlp.fc2.bias": state[name]}),
                                    module)
  bad = dict(state, **{"final_layer_norm.weight": np.ones(31, np.float32)})
  with pytest.raises(ValueError, match=r"1 mis-shaped:\n\s+final_layer_norm\.weight"):
    clip_params.text_encoder_params(bad, module)
  # A CLIPModel state dict is not a text encoder's, and vice versa.
  clip_state = readers.read_folder(clip_torch[1]["safetensors"])
  with pytest.raises(ValueError, match=r"(?s)42 unexpected:.*text_projection\.weight"):
    clip_params.text_encoder_params(clip_state, module)
  clip_module = clip_flax[0]
  missing = {k: v for k, v in clip_state.items() if k != "visual_projection.weight"}
  with pytest.raises(ValueError, match=r"1 missing:\n\s+visual_projection\.weight"):
    clip_params.clip_model_params(missing, clip_module)
  # Buffers are ignored, but only the known ones.
  clip_params.clip_model_params(
      dict(clip_state, **{"vision_model.embeddings.position_ids": np.arange(26)[None]}),
      clip_module)


def test_configs_and_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="model.safetensors.*pytorch_model.bin"):
    readers.read_folder(tmp_path)
  with pytest.raises(FileNotFoundError, match="config.json"):
    clip_params.load_clip_model(tmp_path)
  with pytest.raises(ValueError, match="hidden_act 'relu'"):
    clip.text_model_from_hf_config(dict(TEXT, hidden_act="relu"))
  with pytest.raises(ValueError, match="model_type 'siglip_text_model'"):
    clip.text_model_from_hf_config(dict(TEXT, model_type="siglip_text_model"))
  with pytest.raises(ValueError, match="clip_model_from_hf_config"):
    clip.text_model_from_hf_config({"text_config": TEXT})
  with pytest.raises(ValueError, match="patch_size"):
    clip.clip_model_from_hf_config({"vision_config": dict(VISION, patch_size=7)})
  model = clip.clip_model_from_hf_config({"text_config": TEXT, "vision_config": VISION,
                                          "text_config_dict": {"hidden_act": "gelu"}})
  assert model.text_model.hidden_act == "gelu" and model.projection_dim == 512
  assert model.text_model.eos_token_id == 49407  # transformers' default.


# ---------------------------------------------------------------------------------------------
# CLIP score.
# ---------------------------------------------------------------------------------------------


def _torch_center_crop(image: Image.Image, size: int) -> Image.Image:
  """torchvision.transforms.functional.center_crop on a PIL image (size <= both sides)."""
  w, h = image.size
  top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
  return image.crop((left, top, left + size, top + size))


def _to_tensor(image: Image.Image) -> torch.Tensor:
  """torchvision ToTensor: uint8 HWC -> float CHW / 255."""
  return torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)


def _gigagan_pixels(image: np.ndarray, size: int) -> torch.Tensor:
  """GigaGAN's EvalDataset + tensor2pil + open_clip's preprocess, for one uint8 image."""
  pil = Image.fromarray(image)
  pil = _torch_center_crop(pil, min(pil.size))
  pil = pil.resize((256, 256), Image.LANCZOS)
  x = _to_tensor(pil).sub(0.5).div(0.5)
  pil = Image.fromarray(((x + 1.0) * 127.5).clamp(0.0, 255.0).to(torch.uint8)
                        .permute(1, 2, 0).numpy())
  pil = _torch_center_crop(pil.resize((size, size), Image.BICUBIC), size)
  mean = torch.tensor(clip_score.OPENAI_MEAN)[:, None, None]
  std = torch.tensor(clip_score.OPENAI_STD)[:, None, None]
  return _to_tensor(pil).sub(mean).div(std)


def _plain_pixels(image: np.ndarray, size: int) -> torch.Tensor:
  """/255, PIL BICUBIC on float ('F') images per channel to size x size, normalise."""
  x = image.astype(np.float32) / 255.0
  x = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(x[..., c])).resize(
      (size, size), Image.BICUBIC)) for c in range(3)], axis=-1)
  x = (x - np.float32(clip_score.OPENAI_MEAN)) / np.float32(clip_score.OPENAI_STD)
  return torch.from_numpy(x).permute(2, 0, 1)


def _gigagan_tokens(tok, captions, prefix="A photo depicts "):
  """GigaGAN's splice: caption tokens (pad 0) with the prefix's tokens after the start token."""
  def tokenize(texts):  # OpenAI's `tokenize(texts, truncate=True)` with the '!' (id 0) padding.
    return torch.tensor(tok(texts, padding="max_length", max_length=77, truncation=True)[
        "input_ids"])

  tokens, prefix_tokens = tokenize(captions), tokenize([prefix])
  k = int(np.argmax(prefix_tokens[0].numpy() == tiny_tokenizer.EOS_ID)) - 1
  new = torch.cat([tokens[:, :1], prefix_tokens[:, 1:1 + k].expand(len(captions), -1),
                   tokens[:, 1:]], dim=1)[:, :77]
  last = new[:, 76:77]
  last[last > 0] = tiny_tokenizer.EOS_ID
  return torch.cat([new[:, :76], last], dim=1)


def _torch_cosines(model, pixels, ids):
  with torch.no_grad():
    image = model.get_image_features(torch.stack(pixels)).pooler_output
    text = model.get_text_features(ids).pooler_output
    return torch.nn.functional.cosine_similarity(image, text, dim=1).numpy()


@pytest.fixture(scope="module")
def score_inputs():
  rng = np.random.default_rng(2)
  # Non-square, with an odd long-minus-short difference (13: torchvision rounds 6.5 to 6).
  images = rng.integers(0, 256, (3, 37, 50, 3), dtype=np.uint8)
  images[1, :, :25] = 5  # Dark values exercise GigaGAN's truncating round trip.
  captions = ["a red square &amp; a cat", "", LONG]
  return images, captions


def test_gigagan_round_trip_table():
  v = torch.arange(256, dtype=torch.uint8).float().div(255).sub(0.5).div(0.5)
  expected = ((v + 1.0) * 127.5).clamp(0.0, 255.0).to(torch.uint8).numpy()
  np.testing.assert_array_equal(clip_score.GIGAGAN_ROUND_TRIP, expected)
  changed = np.nonzero(clip_score.GIGAGAN_ROUND_TRIP != np.arange(256))[0]
  assert changed.tolist() == list(range(1, 64))


def test_clip_score_sid_lsg_matches_gigagan(clip_torch, clip_flax, tokenizers, score_inputs):
  torch_model = clip_torch[0]
  images, captions = score_inputs
  scorer = clip_score.CLIPScorer(*clip_flax, tokenizers[tiny_tokenizer.EOS], protocol="sid-lsg",
                                 batch_size=2)
  result = scorer.score(images, captions)
  assert result["protocol"] == "sid-lsg" and result["num_images"] == 3
  assert result["registered_protocol"] == "coco2014-clip30k-vitg14"
  pixels = [_gigagan_pixels(im, 30) for im in images]
  # The reference tokenizes like OpenAI's `tokenize` (pads with id 0) after html-unescaping.
  cleaned = [clip_score.clean_caption(c) for c in captions]
  assert cleaned[0] == "a red square & a cat"
  # OpenAI's basic_clean: ftfy first (mojibake, curly quotes), then html twice, ends stripped.
  assert clip_score.clean_caption("  a caf\u00c3\u00a9 &amp;amp; \u201cdog\u201d ") == 'a café & "dog"'

  ref = _torch_cosines(torch_model, pixels, _gigagan_tokens(tokenizers["!"], cleaned))
  assert result["per_image"].shape == (3,) and _max_err(result["per_image"], ref) < TOL
  assert result["mean"] == pytest.approx(float(np.mean(ref)), abs=TOL)
  # The prefix matters, and only this protocol applies it.
  unprefixed = _torch_cosines(torch_model, pixels,
                              torch.from_numpy(clip_score.tokenize(tokenizers["!"], cleaned)).long())
  assert _max_err(unprefixed, ref) > 1e-3
  np.testing.assert_array_equal(
      scorer.token_ids(captions),
      clip_score.tokenize(tokenizers[tiny_tokenizer.EOS], captions, prefix="A photo depicts "))
  # Preprocessed pixels equal the reference's exactly (uint8 before normalisation).
  host = scorer.host_pixels(images)
  assert host.dtype == np.uint8 and host.shape == (3, 30, 30, 3)
  normalised = (host.astype(np.float32) / 255 - np.float32(clip_score.OPENAI_MEAN)) / np.float32(
      clip_score.OPENAI_STD)
  assert _max_err(normalised, torch.stack(pixels).permute(0, 2, 3, 1)) < 1e-6


def test_clip_score_plain(clip_torch, clip_flax, tokenizers, score_inputs):
  torch_model = clip_torch[0]
  images, captions = score_inputs
  scorer = clip_score.CLIPScorer(*clip_flax, tokenizers["!"], protocol="plain", batch_size=4)
  result = scorer.score(images, captions)
  assert result["protocol"] == "plain" and result["registered_protocol"] == "clip-plain"
  ids = clip_score.tokenize(tokenizers["!"], captions)
  np.testing.assert_array_equal(scorer.token_ids(captions), ids)
  ref = _torch_cosines(torch_model, [_plain_pixels(im, 30) for im in images],
                       torch.from_numpy(ids).long())
  assert _max_err(result["per_image"], ref) < TOL
  assert result["mean"] == pytest.approx(float(np.mean(ref)), abs=TOL)


def test_clip_score_rejects_bad_inputs(clip_flax, tokenizers, score_inputs):
  images, captions = score_inputs
  tok = tokenizers[tiny_tokenizer.EOS]
  scorer = clip_score.CLIPScorer(*clip_flax, tok, protocol="plain", batch_size=2)
  cases = [
      (images.astype(np.float32), captions, "uint8"),
      (images.transpose(0, 3, 1, 2), captions, "NHWC"),
      (np.concatenate([images, images[..., :1]], axis=-1), captions, "3 channels"),
      (images[0], captions, "NHWC"),
      (images, captions[:2], "3 images but 2 captions"),
      (images, "a cat", "not one string"),
      (images[:1], [3], "strings"),
  ]
  for bad_images, bad_captions, message in cases:
    with pytest.raises(ValueError, match=message):
      scorer.score(bad_images, bad_captions)
  with pytest.raises(ValueError, match="Unknown CLIP score protocol"):
    clip_score.CLIPScorer(*clip_flax, tok, protocol="clipscore")


def test_clip_protocols_registered():
  for name, preprocess in (("coco2014-clip30k-vitg14", "sid-lsg"), ("clip-plain", "plain")):
    p = protocols.get(name)
    assert p.metric == "clip" and p.implemented and p.param("preprocess") == preprocess
    assert clip_score.REGISTERED[preprocess] == name and name in protocols.table()
  sid_lsg = protocols.get("coco2014-clip30k-vitg14")
  assert sid_lsg.num_samples == 30_000 and "ViT-g-14 laion2b_s12b_b42k" in sid_lsg.detector
  assert sid_lsg.derive(num_samples=100).name == "coco2014-clip30k-vitg14[n=100]"


def test_config_json_round_trip(clip_torch):
  """The factory reads exactly what save_pretrained wrote."""
  with open(os.path.join(clip_torch[1]["safetensors"], "config.json")) as f:
    cfg = json.load(f)
  model = clip.clip_model_from_hf_config(cfg)
  assert model.text_model.eos_token_id == tiny_tokenizer.EOS_ID
  assert model.text_model.hidden_act == "gelu" and model.vision_model.hidden_act == "quick_gelu"
  assert (model.vision_model.patch_size, model.vision_model.num_channels) == (6, 3)


# ---------------------------------------------------------------------------------------------
# `python -m sid_jax.evaluate --metrics clip`.
# ---------------------------------------------------------------------------------------------

# Natural order img1, img2, img10 (string order would be img1, img10, img2); an empty caption too.
CLI_NAMES = ("img1.png", "img2.png", "img10.png")
CLI_CAPTIONS = ["a red square &amp; a cat", "", "two dogs on grass"]


@pytest.fixture(scope="module")
def clip_cli_files(clip_torch, tmp_path_factory):
  """Paths of a CLIPModel folder (with the tiny tokenizer), PNGs, captions and .npz files."""
  root = tmp_path_factory.mktemp("clip_cli")
  model_dir = root / "clip"
  clip_torch[0].save_pretrained(model_dir)
  tiny_tokenizer.write_tiny_clip_tokenizer(model_dir, pad_token="!")
  no_weights = root / "config_only"
  clip_torch[0].config.save_pretrained(no_weights)
  images = np.random.default_rng(3).integers(0, 256, (4, 40, 40, 3), dtype=np.uint8)
  (root / "pngs").mkdir()
  for name, image in zip(CLI_NAMES, images):
    Image.fromarray(image).save(root / "pngs" / name)
  np.savez(root / "four.npz", arr_0=images)  # one image more than there are captions
  (root / "captions.txt").write_text("\n".join(CLI_CAPTIONS) + "\n", encoding="utf-8")
  (root / "empty.txt").write_text("", encoding="utf-8")
  return {"root": str(root), "model": str(model_dir), "no_weights": str(no_weights),
          "pngs": str(root / "pngs"), "npz": str(root / "four.npz"),
          "captions": str(root / "captions.txt"), "empty": str(root / "empty.txt"),
          "images": images}


def _clip_cli(capsys, *args):
  record = evaluate.run(["sid_jax.evaluate", "--metrics=clip", "--batch=8", *args])
  lines = capsys.readouterr().out.splitlines()
  assert json.loads(lines[0]) == json.loads(json.dumps(record, default=str))
  (result,) = record["results"]
  return result, "\n".join(lines[1:])


def test_read_captions_and_natural_order(tmp_path):
  path = tmp_path / "c.txt"
  path.write_bytes("\ufeffa cat\r\n\r\n  two dogs \nlast".encode("utf-8"))
  assert evaluate.read_captions(str(path)) == ["a cat", "", "  two dogs ", "last"]
  path.write_bytes(b"\xff\xfe")
  with pytest.raises(evaluate.EvaluationError, match="--captions .* not UTF-8"):
    evaluate.read_captions(str(path))
  names = ["b/img10.png", "a/img2.png", "b/img9.png", "img01.png", "img1.png", "a/img10.png"]
  assert sorted(names, key=sources.natural_key) == [
      "a/img2.png", "a/img10.png", "b/img9.png", "b/img10.png", "img01.png", "img1.png"]


@pytest.mark.parametrize("preprocess,registered", [("sid-lsg", "coco2014-clip30k-vitg14"),
                                                   ("plain", "clip-plain")])
def test_evaluate_cli_clip_score(capsys, clip_flax, clip_cli_files, preprocess, registered):
  files = clip_cli_files
  result, table = _clip_cli(capsys, f"--images={files['pngs']}", f"--clip_model={files['model']}",
                            f"--captions={files['captions']}", f"--clip_protocol={preprocess}",
                            "--seeds=0-2")
  scorer = clip_score.CLIPScorer(*clip_flax, clip_score.load_tokenizer(files["model"]),
                                 protocol=preprocess, batch_size=8)
  images = files["images"][:3]  # img1, img2, img10: the natural order
  expected = scorer.score(images, CLI_CAPTIONS)["mean"]
  np.testing.assert_allclose(result["clip_score"], expected, rtol=1e-6)
  # The pairing matters: string order (img1, img10, img2) would give another score.
  assert abs(scorer.score(images[[0, 2, 1]], CLI_CAPTIONS)["mean"] - expected) > 1e-4
  name = f"{registered}[n=3]"
  assert result["metric"] == "clip" and result["protocol"] == name
  assert result["num_samples"] == 3 and not result["standard_protocol"]
  assert result["params"] == {"preprocess": preprocess}
  assert result["detector"] == protocols.get(registered).detector
  assert result["captions_path"] == files["captions"]
  assert result["clip_model"] == {"path": files["model"], "tokenizer": files["model"],
                                  "image_size": 30, "patch_size": 6, "vision_layers": 2,
                                  "vision_width": 32, "text_layers": 2, "text_width": 32,
                                  "projection_dim": 16}
  # Only the SiD-LSG protocol names a model (ViT-g-14); the tiny one is flagged as another.
  assert len(result["clip_notes"]) == (preprocess == "sid-lsg")
  if preprocess == "sid-lsg":
    assert "not ViT-g-14 (image_size=30 (ViT-g-14: 224)" in result["clip_notes"][0]
  row = f"| clip | clip_score={result['clip_score']:.6g} | {name} | 3 | {files['captions']} |"
  assert row in table and f"- `{name}`: detector " in table
  assert f"CLIP model {files['model']}" in table


def test_evaluate_cli_clip_num_limits_images_and_captions(capsys, clip_flax, clip_cli_files):
  files = clip_cli_files
  args = [f"--npz={files['npz']}", f"--clip_model={files['model']}",
          f"--clip_tokenizer={files['model']}", f"--captions={files['captions']}", "--seeds=0-3"]
  with pytest.raises(evaluate.EvaluationError,
                     match=r"seed 3\) belongs to caption line 3, but --captions .* holds 3"):
    evaluate.run(["sid_jax.evaluate", "--metrics=clip", "--batch=8", *args])
  result, _ = _clip_cli(capsys, *args, "--num=2")  # the default protocol: sid-lsg
  scorer = clip_score.CLIPScorer(*clip_flax, clip_score.load_tokenizer(files["model"]),
                                 protocol="sid-lsg", batch_size=8)
  expected = scorer.score(files["images"][:2], CLI_CAPTIONS[:2])["mean"]
  np.testing.assert_allclose(result["clip_score"], expected, rtol=1e-6)
  assert result["protocol"] == "coco2014-clip30k-vitg14[n=2]" and result["num_samples"] == 2


@pytest.mark.parametrize("args,pattern", [
    (["--images={pngs}", "--captions={captions}"], "--metrics clip needs --clip_model"),
    (["--images={pngs}", "--clip_model={model}"], "--metrics clip needs --captions"),
    (["--images={pngs}"], "needs --clip_model and --captions"),
    (["--checkpoint={root}", "--clip_model={model}", "--captions={captions}"],
     "does not take --checkpoint: a SiD training checkpoint stores no captions"),
    (["--images={pngs}", "--clip_model={root}/nope", "--captions={captions}"],
     "--clip_model .*nope' is not a directory"),
    (["--images={pngs}", "--clip_model={pngs}", "--captions={captions}"],
     "--clip_model .* has no config.json"),
    (["--images={pngs}", "--clip_model={no_weights}", "--captions={captions}"],
     "--clip_model .* has no weights: looked for model.safetensors"),
    (["--images={pngs}", "--clip_model={text_encoder}", "--captions={captions}"],
     "--clip_model .*config.json: Unsupported CLIPModel model_type 'clip_text_model'"),
    (["--images={pngs}", "--clip_model={model}", "--clip_tokenizer={pngs}",
      "--captions={captions}"], "--clip_tokenizer .* has no vocab.json and no merges.txt"),
    (["--images={pngs}", "--clip_model={model}", "--clip_tokenizer={root}/nope",
      "--captions={captions}"], "--clip_tokenizer .*nope' is not a directory"),
    (["--images={pngs}", "--clip_model={model}", "--captions={root}/missing.txt"],
     "--captions .*missing.txt' does not exist"),
    (["--images={pngs}", "--clip_model={model}", "--captions={empty}"],
     "--captions .* holds no captions"),
    (["--images={pngs}", "--clip_model={model}", "--captions={captions}",
      "--clip_protocol=clipscore"], "--clip_protocol='clipscore': expected sid-lsg"),
    (["--npz={npz}", "--clip_model={model}", "--captions={captions}", "--num=4", "--seeds=0-3"],
     "belongs to caption line 3, but --captions .* holds 3 captions"),
    (["--npz={npz}", "--clip_model={model}", "--captions={captions}", "--num=5"],
     "--num=5, but .* holds 4 images"),
])
def test_evaluate_cli_clip_errors(monkeypatch, clip_cli_files, text_models, args, pattern):
  def heavy(*unused_args, **unused_kw):
    raise AssertionError("loaded weights before checking the flags")

  # Every error comes before any weights are read or any checkpoint restored.
  monkeypatch.setattr(clip_params, "load_clip_model", heavy)
  monkeypatch.setattr(clip_score, "load_scorer", heavy)
  monkeypatch.setattr(evaluate, "restore_generator", heavy)
  paths = dict(clip_cli_files, text_encoder=text_models["gelu"][1])
  argv = ["sid_jax.evaluate", "--metrics=clip", "--batch=8"] + [a.format(**paths) for a in args]
  with pytest.raises(evaluate.EvaluationError, match=pattern):
    evaluate.run(argv)


def test_evaluate_cli_clip_flags_need_the_clip_metric(clip_cli_files):
  with pytest.raises(evaluate.EvaluationError,
                     match="--clip_model, --captions only serve --metrics clip; add clip to "
                           "--metrics=is"):
    evaluate.run(["sid_jax.evaluate", f"--npz={clip_cli_files['npz']}", "--metrics=is",
                  f"--clip_model={clip_cli_files['model']}",
                  f"--captions={clip_cli_files['captions']}"])


def test_evaluate_cli_clip_with_an_inception_metric(tmp_path, capsys, clip_flax, clip_cli_files):
  """clip combines with the Inception metrics: one image source, one result per metric."""
  from tests.test_metrics import _random_inception_state_dict  # pylint: disable=g-import-not-at-top
  files = clip_cli_files
  inception = tmp_path / "inception.npz"
  np.savez(inception, **_random_inception_state_dict(seed=1))
  record = evaluate.run(["sid_jax.evaluate", f"--images={files['pngs']}", "--metrics=is,clip",
                         "--is_splits=1", f"--inception={inception}", "--batch=8",
                         f"--clip_model={files['model']}", f"--captions={files['captions']}",
                         "--clip_protocol=plain", "--seeds=0-2"])
  table = capsys.readouterr().out
  is_result, clip_result = record["results"]
  assert is_result["metric"] == "is" and is_result["protocol"] == "is50k[n=3,splits=1]"
  assert np.isfinite(is_result["is_mean"])
  scorer = clip_score.CLIPScorer(*clip_flax, clip_score.load_tokenizer(files["model"]),
                                 protocol="plain", batch_size=8)
  expected = scorer.score(files["images"][:3], CLI_CAPTIONS)["mean"]
  assert clip_result["protocol"] == "clip-plain[n=3]"
  np.testing.assert_allclose(clip_result["clip_score"], expected, rtol=1e-6)
  assert "| is | " in table and "| clip | clip_score=" in table
