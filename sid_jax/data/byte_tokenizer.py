"""A byte-level CLIP tokenizer folder (no BPE merges) for tiny configs and offline tests.

The vocabulary has the layout of OpenAI's CLIP vocabulary without any BPE merge: the 256
byte-level symbols (ids 0-255), the same symbols with the end-of-word suffix `</w>` (ids 256-511),
then `<|startoftext|>` (512) and `<|endoftext|>` (513). Every word is therefore split into single
characters, the last one carrying `</w>`. As in the real vocabulary, `!` has id 0 and the end of
text token has the largest id.
"""

from __future__ import annotations

import json
import os

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
VOCAB_SIZE = 514
BOS_ID = 512
EOS_ID = 513


def byte_symbols() -> list[str]:
  """The 256 unicode symbols standing for bytes, in the order of the CLIP / GPT-2 vocabulary.

  Printable Latin-1 bytes stand for themselves; the remaining bytes (controls, space, ...) are
  given the code points 256, 257, ... in increasing byte order and come after the printable ones.
  """
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) +
               list(range(ord("®"), ord("ÿ") + 1)))
  others = [b for b in range(256) if b not in set(printable)]
  return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def write_tiny_clip_tokenizer(directory: str | os.PathLike, pad_token: str = EOS) -> str:
  """Writes a `CLIPTokenizer` folder (vocab.json, merges.txt, configs) and returns its path.

  Args:
    directory: the folder to write into (created if needed).
    pad_token: `<|endoftext|>` (Stable Diffusion 1.x, OpenAI CLIP) or `!` (Stable Diffusion 2.x,
      OpenCLIP, id 0).

  Returns:
    The folder as a string, for `CLIPTokenizer.from_pretrained(folder, local_files_only=True)`.
  """
  symbols = byte_symbols()
  tokens = symbols + [s + "</w>" for s in symbols] + [BOS, EOS]
  if pad_token not in tokens:
    raise ValueError(f"pad_token {pad_token!r} is not in the tiny vocabulary.")
  vocab = {token: i for i, token in enumerate(tokens)}
  assert len(vocab) == VOCAB_SIZE
  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump(vocab, f, ensure_ascii=False)
  with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n")
  special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
  with open(os.path.join(directory, "special_tokens_map.json"), "w", encoding="utf-8") as f:
    json.dump(special, f)
  config = dict(special, tokenizer_class="CLIPTokenizer", model_max_length=77,
                do_lower_case=True, errors="replace")
  with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f)
  return directory
