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
  with open(path) as f:
    return json.load(f)


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

# Config entries that must agree between a checkpoint and the run that resumes it.
CRITICAL_CONFIG_KEYS = ("method", "data", "model", "teacher.type", "teacher.gmm",
                        "teacher.random_seed",
                        "sid.use_logvar", "optim.fake_b1", "optim.gen_b1", "lsg.init_timestep",
                        "lsg.tiny_sd2")


def _lookup(d: dict, dotted: str):
  for part in dotted.split("."):
    if not isinstance(d, dict) or part not in d:
      return "<absent>"
    d = d[part]
  return d


def config_differences(stored: dict, current: dict, keys=CRITICAL_CONFIG_KEYS) -> list[str]:
  problems = []
  for key in keys:
    a, b = _lookup(stored, key), _lookup(current, key)
    if json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
      problems.append(f"config.{key}: checkpoint has {a!r}, this run has {b!r}")
  return problems


class Checkpointer:
  """Saves and restores the training state of one run (one Orbax CheckpointManager).

  With `best_metric`, the manager keeps the `keep` checkpoints with the lowest (`best_mode`
  'min') or highest ('max') value of that metric instead of the latest ones (Orbax `best_fn`);
  every save must then pass `metrics` containing it. The training loop uses one of each:
  `WORKDIR/checkpoints` (latest) and `WORKDIR/checkpoints_best` (best evaluation).
  """

  def __init__(self, directory: str, *, every_steps: int, keep: int | None,
               async_save: bool = True, best_metric: str | None = None,
               best_mode: str = "min"):
    self.directory = os.path.abspath(directory)
    self.best_metric = best_metric
    best = {}
    if best_metric is not None:
      if best_mode not in ("min", "max"):
        raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}.")
      best = dict(best_fn=lambda metrics: float(metrics[best_metric]), best_mode=best_mode,
                  keep_checkpoints_without_metrics=False)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
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
    return self.manager.save(step, args=args, force=force, metrics=metrics)

  def read_meta(self, step: int) -> dict:
    out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return out["meta"]

  def restore(self, step: int, abstract_state: Any, current_config: dict) -> tuple[Any, dict]:
    """Restores `step` into the shardings of `abstract_state`, after checking it fits."""
    meta = self.read_meta(step)
    where = f"Checkpoint {os.path.join(self.directory, str(step))}"
    problems = config_differences(meta.get("config", {}), current_config)
    if problems:
      raise CheckpointMismatchError(
          f"{where} was written by a run with a different configuration:\n  " +
          "\n  ".join(problems) +
          "\nUse a fresh --workdir, or restore the original settings.")
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
