"""Prompts tokenised as SiD-LSG trained: the slow CLIPTokenizer's ftfy text cleaning.

The official code tokenised with transformers 4's slow `CLIPTokenizer` (`use_fast=False`) and
ftfy installed; transformers 5 has only the fast tokenizer, which skips ftfy. The reference here
is a transcription of the slow tokenizer (text cleaning, word pattern, byte symbols, BPE, start /
end tokens, truncation, padding) on the tiny byte-level vocabulary of `tests/tiny_tokenizer.py`
(no hub downloads). Its BPE is the identity there (no merges), so every id stands for one
character and the expected cleaned texts can be read off the ids.
"""

import json
import os

import numpy as np
import pytest
import regex

from sid_jax.models import stable_diffusion
from tests import tiny_tokenizer

# (prompt, the text the slow tokenizer splits into words, whether the fast tokenizer alone gives
# other ids: whitespace runs and NFC it handles itself; quotes, mojibake, width, ligatures and
# HTML entities only ftfy fixes).
CASES = [
    ("\u201cCurly\u201d quotes, it\u2019s \u2018fine\u2019", "\"curly\" quotes, it's 'fine'", True),
    ("caf\u00c3\u00a9 cr\u00c3\u00a8me br\u00c3\u00bbl\u00c3\u00a9e",
     "caf\u00e9 cr\u00e8me br\u00fbl\u00e9e", True),
    ("\uff26\uff35\uff2c\uff2c\uff0d\uff37\uff29\uff24\uff34\uff28 "
     "\uff54\uff45\uff58\uff54 \uff11\uff12", "full-width text 12", True),
    ("\ufb01sh &amp; chips", "fish & chips", True),
    ("  tabs\tand\r\nnew   lines\u00a0here  ", "tabs and new lines here", False),
    ("e\u0301toile", "\u00e9toile", False),  # a decomposed accent -> NFC
]
WORD = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|"""
                     r"""[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)


def _byte_symbols():
  """byte -> its symbol in CLIP's byte-level BPE: printable Latin-1 bytes stand for themselves,
  the others (controls, space, ...) for chr(256), chr(257), ... in byte order."""
  keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
  others = [b for b in range(256) if b not in keep]
  return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def _slow_clip_ids(folder, text, length=77):
  """transformers 4's slow CLIPTokenizer with ftfy, transcribed: fix_text, whitespace runs to one
  space, strip, lower; words by CLIP's pattern; UTF-8 bytes -> byte symbols; BPE (no merges in
  this vocabulary: the last symbol of a word takes `</w>`); start + first length-2 + end token;
  padding with the pad token."""
  import ftfy  # pylint: disable=g-import-not-at-top
  with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
    vocab = json.load(f)
  with open(os.path.join(folder, "special_tokens_map.json"), encoding="utf-8") as f:
    pad = json.load(f)["pad_token"]
  text = regex.sub(r"\s+", " ", ftfy.fix_text(text)).strip().lower()
  symbols = _byte_symbols()
  ids = []
  for word in WORD.findall(text):
    pieces = [symbols[b] for b in word.encode("utf-8")]
    pieces[-1] += "</w>"
    ids += [vocab.get(p, vocab[tiny_tokenizer.EOS]) for p in pieces]
  ids = [tiny_tokenizer.BOS_ID] + ids[:length - 2] + [tiny_tokenizer.EOS_ID]
  return ids + [vocab[pad]] * (length - len(ids))


@pytest.fixture(scope="module", params=[False, True], ids=["sd1", "sd2"])
def sd(request):
  spec = stable_diffusion.tiny_spec(sd2=request.param)
  folder = stable_diffusion.tiny_tokenizer_dir(spec)
  return stable_diffusion.build(spec, folder), folder


def _chars(folder, ids):
  """The text of ids from the byte-level vocabulary (one character per id, `</w>` -> space)."""
  with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
    inverse = {i: t for t, i in json.load(f).items()}
  table = {s: b for b, s in _byte_symbols().items()}
  data = bytearray()
  for i in ids:
    if i == tiny_tokenizer.BOS_ID:
      continue
    if i == tiny_tokenizer.EOS_ID:
      break
    token = inverse[i]
    data.append(table[token.removesuffix("</w>")])
    if token.endswith("</w>"):
      data += b" "
  return data.decode("utf-8").strip()


@pytest.mark.parametrize("prompt,cleaned,fast_differs", CASES)
def test_prompts_get_the_slow_tokenizers_ids(sd, prompt, cleaned, fast_differs):
  model, folder = sd
  ids = model.tokenize([prompt])
  assert ids.shape == (1, 77) and ids.dtype == np.int32
  expected = _slow_clip_ids(folder, prompt)
  assert ids[0].tolist() == expected
  assert stable_diffusion.clean_prompt(prompt) == cleaned
  # Words come apart at punctuation: compare the characters, not the spacing.
  assert _chars(folder, expected).replace(" ", "") == cleaned.replace(" ", "")
  # transformers 5's fast tokenizer alone (no ftfy) gives other ids where only ftfy fixes a text.
  raw = model.tokenizer([prompt], padding="max_length", max_length=77, truncation=True)
  assert (raw["input_ids"][0] != expected) == fast_differs


def test_batches_truncation_and_the_empty_prompt(sd):
  model, folder = sd
  long = "\u201cquoted\u201d " * 30  # > 75 tokens after cleaning
  prompts = [c[0] for c in CASES] + [long, "", "plain words"]
  ids = model.tokenize(prompts)
  assert ids.tolist() == [_slow_clip_ids(folder, p) for p in prompts]
  assert ids[-3, 0] == tiny_tokenizer.BOS_ID and ids[-3, 76] == tiny_tokenizer.EOS_ID
  assert ids[-2, :2].tolist() == [tiny_tokenizer.BOS_ID, tiny_tokenizer.EOS_ID]
  assert model.tokenize([]).shape == (0, 77)


def test_non_text_prompt_is_refused(sd):
  with pytest.raises(TypeError, match="A prompt must be a str, got bytes"):
    sd[0].tokenize([b"a cat"])
