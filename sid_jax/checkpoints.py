"""Every checkpoint sid_jax reads or writes goes through this module (Orbax V0 API).

Two kinds:
* **Training checkpoints** (`Checkpointer`): one Orbax `CheckpointManager` in `WORKDIR/checkpoints`
  whose steps hold the item `state` (generator, its EMA, fake score, both optimiser states, step,
  the run's base RNG key) and the item `meta` (JSON: config, teacher path and hash, versions).
  The teacher's weights are never stored there.
* **Network checkpoints** (`save_network` / `load_network`): a directory with `network.json`
  (architecture: which module, preconditioning, constructor kwargs) and `params/` (Orbax). A
  converted EDM teacher, a trained digits teacher and an exported generator all use it.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

NETWORK_SPEC = "network.json"
NETWORK_PARAMS = "params"


class CheckpointMismatchError(ValueError):
  """A checkpoint exists but does not fit the current configuration."""


# ---------------------------------------------------------------------------------------------
# Hashing, for recording which teacher a run used.
# ---------------------------------------------------------------------------------------------


def hash_path(path: str) -> str:
  """sha256 over a file, or over every file below a directory (relative names and bytes)."""
  h = hashlib.sha256()
  if os.path.isfile(path):
    files = [(os.path.basename(path), path)]
  else:
    files = []
    for root, _, names in os.walk(path):
      for name in names:
        full = os.path.join(root, name)
        files.append((os.path.relpath(full, path), full))
    files.sort()
  for rel, full in files:
    h.update(rel.encode())
    with open(full, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
  return h.hexdigest()


def hash_tree(tree: Any) -> str:
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Network checkpoints.
# ---------------------------------------------------------------------------------------------


def save_network(directory: str, params: Any, spec: dict) -> None:
  """Writes params (numpy or jax arrays, sharded ones included: a collective) and the spec."""
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(directory, NETWORK_PARAMS), params, force=True)
  if jax.process_index() == 0:
    with open(os.path.join(directory, NETWORK_SPEC), "w") as f:
      json.dump(spec, f, indent=2, sort_keys=True)


def load_network_spec(directory: str) -> dict:
  path = os.path.join(directory, NETWORK_SPEC)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"{directory!r} is not a network checkpoint: {NETWORK_SPEC} is missing. Create one with "
        "`python -m sid_jax.convert` or by training a teacher.")
  with open(path, encoding="utf-8") as f:
    try:
      spec = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{path} is not valid JSON ({e}); the checkpoint's {NETWORK_SPEC} is "
                       "corrupted: convert or export the network again.") from None
  if not isinstance(spec, dict):
    raise ValueError(f"{path} is not a network spec: it holds a {type(spec).__name__}, not an "
                     "object.")
  return spec


def load_network_params(directory: str, abstract_params: Any = None) -> Any:
  """Restores params; with `abstract_params` the tree, shapes and shardings are checked/applied."""
  path = os.path.abspath(os.path.join(directory, NETWORK_PARAMS))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"Network parameters not found at {path!r}.")
  with ocp.StandardCheckpointer() as ckptr:
    if abstract_params is None:
      return ckptr.restore(path)
    stored = ckptr.metadata(path)
    stored = getattr(stored, "item_metadata", stored)
    check_tree_matches(stored, abstract_params, what=f"network checkpoint {directory!r}")
    return ckptr.restore(path, abstract_params)


# ---------------------------------------------------------------------------------------------
# Tree comparison with messages that name the keys.
# ---------------------------------------------------------------------------------------------


def _shapes(tree: Any) -> dict[str, tuple]:
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                    for k in path)
    out[name] = tuple(getattr(leaf, "shape", ()))
  return out


def tree_differences(stored: Any, expected: Any) -> list[str]:
  a, b = _shapes(stored), _shapes(expected)
  problems = [f"missing from checkpoint: {k} {b[k]}" for k in sorted(set(b) - set(a))]
  problems += [f"unexpected in checkpoint: {k} {a[k]}" for k in sorted(set(a) - set(b))]
  problems += [f"shape mismatch at {k}: checkpoint {a[k]} vs expected {b[k]}"
               for k in sorted(set(a) & set(b)) if a[k] != b[k]]
  return problems


def check_tree_matches(stored: Any, expected: Any, what: str) -> None:
  problems = tree_differences(stored, expected)
  if problems:
    shown = "\n  ".join(problems[:40])
    more = f"\n  ... and {len(problems) - 40} more" if len(problems) > 40 else ""
    raise CheckpointMismatchError(f"{what} does not match the configured model:\n  {shown}{more}")


# ---------------------------------------------------------------------------------------------
# Training checkpoints.
# ---------------------------------------------------------------------------------------------

# What a resumed run may change. Everything else in the config must agree with the checkpoint's:
# it defines the run (method, data, networks, teacher, losses, optimisers, EMA, batch, seed), so a
# different value would continue the stored state under another meaning -- another teacher, batch
# or EMA ramp -- or change the random draws (`seed` makes the run's base key, which is stored and
# restored, so a new seed would be silently ignored). May change: the run length, the non-finite
# guard and this override; logging, evaluation, sample-grid and checkpoint cadence; the device
# layout (`mesh`, tested to give the same numbers); memory-only settings of SiD-LSG (`lsg.remat`,
# `lsg.attention_chunk`, equal values to float rounding) and its grid prompts; the prompt list's
# location (`lsg.prompts`, `lsg.prompts_data_dir`: its content is checked by the prompt feed's
# fingerprint on resume); how latents are decoded for grids, evaluation and export (`decoder`,
# which training never reads); names used only in messages (`teacher.official_*`, `teacher.architecture`
# for `plan`); and `teacher.checkpoint`, whose directory is compared through the teacher's
# absolute path and sha256 instead (`teacher_differences`). A teacher-training job may also change
# its length and export directory.
RESUMABLE_CHANGES = (
    "training.num_steps", "training.max_nonfinite_steps", "training.resume_allow_changes",
    "log", "eval", "checkpoint", "mesh", "decoder",
    "lsg.remat", "lsg.attention_chunk", "lsg.grid_prompts", "lsg.prompts", "lsg.prompts_data_dir",
    "teacher.checkpoint", "teacher.official_name", "teacher.official_url", "teacher.architecture",
    "teacher_training.num_steps", "teacher_training.export_dir",
    # The dataset's location and read-ahead (its content is checked by the feed's state).
    "data.path", "data.data_dir", "data.read_threads", "data.prefetch", "data.official_name",
    "sida.official_init",
)

_ABSENT = "<absent>"


def flatten_config(d: Any, prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}; lists and scalars are leaves."""
  if not isinstance(d, dict):
    return {prefix: d}
  out = {}
  for key, value in d.items():
    name = f"{prefix}.{key}" if prefix else str(key)
    if isinstance(value, dict) and value:
      out.update(flatten_config(value, name))
    else:
      out[name] = value
  return out


def _may_change(key: str, allowed) -> bool:
  return any(key == a or key.startswith(a + ".") for a in allowed)


def _same(a, b) -> bool:
  return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def config_differences(stored: dict, current: dict, allowed=RESUMABLE_CHANGES) -> list[str]:
  """One line per config key (dotted) outside `allowed` whose value differs, old and new."""
  a, b = flatten_config(stored), flatten_config(current)
  problems = []
  for key in sorted(set(a) | set(b)):
    if _may_change(key, allowed):
      continue
    old, new = a.get(key, _ABSENT), b.get(key, _ABSENT)
    if not _same(old, new):
      problems.append(f"config.{key}: checkpoint has {old!r}, this run has {new!r}")
  return problems


def teacher_differences(stored: dict, current: dict) -> list[str]:
  """One line per field of the teacher's record (type, absolute path, sha256, seed) that differs:
  a different teacher of the same architecture passes every shape check, so only this shows it."""
  problems = []
  for key in sorted(set(stored) | set(current)):
    old, new = stored.get(key, _ABSENT), current.get(key, _ABSENT)
    if not _same(old, new):
      problems.append(f"teacher {key}: checkpoint has {old!r}, this run has {new!r}")
  return problems


class Checkpointer:
  """Saves and restores the training state of one run (one Orbax CheckpointManager).

  With `best_metric`, the manager keeps the `keep` checkpoints with the lowest (`best_mode`
  'min') or highest ('max') value of that metric instead of the latest ones (Orbax `best_fn`);
  every save must then pass `metrics` containing it. The training loop uses one of each:
  `WORKDIR/checkpoints` (latest) and `WORKDIR/checkpoints_best` (best evaluation).

  With `provisional`, a saved step counts towards `keep` only once `confirm`ed; until then it is
  kept beside the `keep` confirmed ones, and `discard` deletes it. The training loop saves a
  state, then confirms it when the next iteration (the first computed from it) is finite, or
  discards it: an update can leave finite but exploded weights whose losses are non-finite only
  from the next iteration on, and such a state must not become the "last good" checkpoint, nor
  push a good one out.
  """

  def __init__(self, directory: str, *, every_steps: int, keep: int | None,
               async_save: bool = True, best_metric: str | None = None,
               best_mode: str = "min", provisional: bool = False):
    self.directory = os.path.abspath(directory)
    self.best_metric = best_metric
    self.keep = keep
    self.provisional = provisional
    self._unconfirmed: int | None = None
    if provisional and best_metric is not None:
      raise ValueError("A best-metric checkpointer cannot be provisional.")
    best = {}
    if best_metric is not None:
      if best_mode not in ("min", "max"):
        raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}.")
      best = dict(best_fn=lambda metrics: float(metrics[best_metric]), best_mode=best_mode,
                  keep_checkpoints_without_metrics=False)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if provisional else keep,  # provisional: `_prune` keeps `keep`
        save_interval_steps=every_steps,
        create=True,
        enable_async_checkpointing=async_save,
        **best,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))

  def best_step(self) -> int | None:
    """The kept step with the best metric (None without `best_metric` or checkpoints)."""
    return self.manager.best_step() if self.best_metric is not None else None

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, meta: dict, *, force: bool = False,
           metrics: dict[str, float] | None = None) -> bool:
    if self.best_metric is not None and (metrics is None or self.best_metric not in metrics):
      raise ValueError(f"This checkpointer keeps the best {self.best_metric!r}; save() needs "
                       f"metrics containing it, got {metrics}.")
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    saved = self.manager.save(step, args=args, force=force, metrics=metrics)
    if saved and self.provisional:
      self._unconfirmed = step  # an older one never judged counts as confirmed from now on
      self._prune()
    return saved

  @property
  def unconfirmed_step(self) -> int | None:
    """The provisional step saved last and neither confirmed nor discarded (None if none)."""
    return self._unconfirmed

  def confirm(self, step: int) -> None:
    """Counts the provisional `step` as good; the oldest steps beyond `keep` are deleted."""
    if self._unconfirmed == step:
      self._unconfirmed = None
      self._prune()

  def discard(self, step: int) -> None:
    """Deletes the provisional `step` (waits for its save to finish first)."""
    if self._unconfirmed == step:
      self._unconfirmed = None
    self.manager.wait_until_finished()
    if step in self.manager.all_steps():
      self.manager.delete(step)

  def _prune(self) -> None:
    if self.keep is None:
      return
    confirmed = sorted(s for s in self.manager.all_steps() if s != self._unconfirmed)
    excess = confirmed[:max(0, len(confirmed) - self.keep)]
    if excess:
      self.manager.wait_until_finished()
      for step in excess:
        self.manager.delete(step)

  def read_meta(self, step: int) -> dict:
    out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return out["meta"]

  def restore(self, step: int, abstract_state: Any, current_config: dict, *,
              teacher: dict | None = None, allow_changes: bool = False) -> tuple[Any, dict]:
    """Restores `step` into the shardings of `abstract_state`, after checking it fits.

    The stored config must agree with `current_config` outside `RESUMABLE_CHANGES`, and with
    `teacher` (the run's teacher record: type, path, sha256) the stored teacher record too; every
    difference is named in one CheckpointMismatchError. `allow_changes` (the user's deliberate
    `config.training.resume_allow_changes`) logs the differences as a warning and restores
    anyway. The tree must match `abstract_state` in any case.
    """
    meta = self.read_meta(step)
    where = f"Checkpoint {os.path.join(self.directory, str(step))}"
    problems = config_differences(meta.get("config", {}), current_config)
    if teacher is not None:
      problems += teacher_differences(meta.get("teacher", {}), teacher)
    if problems and not allow_changes:
      raise CheckpointMismatchError(
          f"{where} was written by a different run:\n  " + "\n  ".join(problems) +
          "\nUse a fresh --workdir, restore the original settings, or resume with these changes "
          "deliberately with --config.training.resume_allow_changes=True.")
    if problems:
      logging.warning("Resuming %s with changes (config.training.resume_allow_changes=True):\n  %s",
                      where, "\n  ".join(problems))
    stored = self.manager.item_metadata(step)["state"]
    stored = getattr(stored, "item_metadata", stored)
    if stored is not None:
      check_tree_matches(stored, abstract_state, what=where)
    out = self.manager.restore(step,
                               args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    return out["state"], meta

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
