"""Which caption each text-to-image sample was generated from (the CLIP score's pairing).

A CLIP score is only meaningful when every image meets the caption it was generated from. The
official generation (and `sid_jax.sample`) gives the image of seed s caption line s, so pairing
the i-th image with the i-th line is wrong as soon as the seeds do not start at 0 (seeds
1000-1999 evaluated with `--num 1000` would meet lines 0-999). `caption_pairs` therefore pairs by
what the samples record, and otherwise by the seeds the user names:

  * an .npz written by `sid_jax.sample --npz` holds `prompts` (and `seeds`, `prompt_lines`);
  * a folder written by `sid_jax.sample` holds generation.json, whose "images" list gives each
    file's seed, prompt line and prompt;
  * anything else needs `--seeds` (sample's syntax, e.g. 1000-1999): the i-th image has the i-th
    listed seed s and meets caption line s.

Recorded prompts are checked against `--captions`: a line that differs is refused, naming the
image, the line and both texts. Problems raise `SourceError` naming the flag or file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import numpy as np

from sid_jax.evaluation.sources import ImageSource, SourceError

GENERATION_RECORD = "generation.json"  # sid_jax.sample.GENERATION_RECORD


@dataclasses.dataclass
class Recorded:
  """What a sample set records about its prompts, one entry per image in reading order.

  Attributes:
    origin: the file the record was read from.
    names: how each image is named in messages (file name or array index).
    seeds: each image's seed (None where not recorded).
    lines: each image's prompt line in the prompt file.
    prompts: each image's prompt.
  """
  origin: str
  names: list[str]
  seeds: list[int] | None
  lines: list[int]
  prompts: list[str]


def _from_npz(source: ImageSource) -> Recorded | None:
  with np.load(source.path, allow_pickle=False) as z:
    if "prompts" not in z.files:
      return None
    n = source.num
    prompts = [str(p) for p in z["prompts"][:n]]
    seeds = [int(s) for s in z["seeds"][:n]] if "seeds" in z.files else None
    if "prompt_lines" in z.files:
      lines = [int(i) for i in z["prompt_lines"][:n]]
    elif seeds is not None:  # older files: the default seeding rule, checked against the text
      lines = list(seeds)
    else:
      raise SourceError(f"--npz {source.path} records 'prompts' but neither 'prompt_lines' nor "
                        "'seeds': it does not say which caption line each image comes from.")
  if len(prompts) != n or len(lines) != n:
    raise SourceError(f"--npz {source.path} records prompts for {len(prompts)} of its {n} "
                      "images.")
  return Recorded(source.path, [f"image {i}" for i in range(n)], seeds, lines, prompts)


def _from_folder(source: ImageSource) -> Recorded | None:
  path = os.path.join(source.path, GENERATION_RECORD)
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      record = json.load(f)
  except (OSError, ValueError) as e:
    raise SourceError(f"{path}: not a readable generation record ({e}).") from None
  if not isinstance(record, dict) or record.get("kind") != "text-to-image" or (
      "images" not in record):
    return None
  try:
    by_file = {entry["file"]: entry for entry in record["images"]}
  except (TypeError, KeyError):
    raise SourceError(f"{path}: \"images\" must be a list of {{file, seed, prompt_line, "
                      "prompt}} entries.") from None
  entries = []
  for name in source.files or []:
    if name not in by_file:
      raise SourceError(f"--images {source.path}: {name} is not listed in {path}, so its prompt "
                        "is unknown (remove foreign files, or evaluate the folder sample wrote).")
    entries.append(by_file[name])
  try:
    return Recorded(path, list(source.files), [int(e["seed"]) for e in entries],
                    [int(e["prompt_line"]) for e in entries], [str(e["prompt"]) for e in entries])
  except (TypeError, KeyError, ValueError):
    raise SourceError(f"{path}: every \"images\" entry needs file, seed, prompt_line and "
                      "prompt.") from None


def recorded_prompts(source: ImageSource) -> Recorded | None:
  """The prompts `source` records (an .npz or folder from `sid_jax.sample`), or None."""
  if source.kind == "npz":
    return _from_npz(source)
  if source.kind == "images":
    return _from_folder(source)
  return None


def caption_pairs(captions: Sequence[str], captions_path: str, source: ImageSource,
                  seeds: Sequence[int] | None, num_given: bool) -> tuple[list[str], str]:
  """The caption of each of `source`'s images, and a note saying how they were paired.

  Args:
    captions: the lines of `--captions`.
    captions_path: its path (for messages).
    source: the images (their first `source.num`, in reading order).
    seeds: `--seeds`, the seeds of the source's images in reading order, or None.
    num_given: whether `--num` limited the images (then `seeds` may list more).

  Raises:
    SourceError: nothing says which caption an image belongs to, the seeds do not fit the
      images, a caption line is missing, or a recorded prompt differs from its caption line.
  """
  n = source.num
  recorded = recorded_prompts(source)
  if seeds is not None:
    seeds = list(seeds)
    if len(seeds) < n or (not num_given and len(seeds) != n):
      raise SourceError(f"--seeds lists {len(seeds)} seeds, but --{source.kind} {source.path} "
                        f"holds {n} images: one seed per image, in reading order.")
    seeds = seeds[:n]
  if recorded is None:
    if seeds is None:
      raise SourceError(
          f"--metrics clip: --{source.kind} {source.path} does not record its prompts, so pass "
          "--seeds (e.g. --seeds=0-29999, as given to the generator): the image of seed s is "
          "paired with caption line s. (Pairing by position would give seeds 1000-1999 the "
          "captions of lines 0-999.)")
    lines, names, how = seeds, [f"image {i} (seed {s})" for i, s in enumerate(seeds)], (
        f"--seeds: the image of seed s meets --captions line s (seeds {seeds[0]}..{seeds[-1]})"
        if seeds == list(range(seeds[0], seeds[0] + n)) else
        "--seeds: the image of seed s meets --captions line s")
  else:
    if seeds is not None and recorded.seeds is not None and seeds != recorded.seeds:
      i = next(i for i, (a, b) in enumerate(zip(seeds, recorded.seeds)) if a != b)
      raise SourceError(f"--seeds gives {recorded.names[i]} seed {seeds[i]}, but "
                        f"{recorded.origin} records seed {recorded.seeds[i]}.")
    lines, names = recorded.lines, recorded.names
    how = f"the prompt line of every image as recorded in {recorded.origin}"
  for i, line in enumerate(lines):
    if not 0 <= line < len(captions):
      raise SourceError(f"{names[i]} belongs to caption line {line}, but --captions "
                        f"{captions_path} holds {len(captions)} captions (lines 0.."
                        f"{len(captions) - 1}).")
  paired = [captions[line] for line in lines]
  if recorded is not None:
    for i, (caption, prompt) in enumerate(zip(paired, recorded.prompts)):
      if caption != prompt:
        raise SourceError(f"{names[i]} was generated from prompt {prompt!r} (line {lines[i]}, "
                          f"{recorded.origin}), but --captions {captions_path} line {lines[i]} "
                          f"is {caption!r}: not the captions these images were made from.")
  return paired, "captions paired by " + how
