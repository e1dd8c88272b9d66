"""Non-finite iterations: the official nan_to_num, NaN made inside the generator, what is logged,
and that no non-finite state is ever saved or exported (tiny GMM runs)."""

import json
import os

import jax
import numpy as np
import pytest
import torch

from sid_jax import checkpoints, optim, train
from sid_jax import run as run_lib
from tests import configs_util

ONE_DEVICE = jax.devices()[:1]


def _records(workdir, kind):
  return [r for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))
          if r["kind"] == kind]


def _config(**overrides):
  """The tiny GMM run with a generator learning rate of 1e30, three logged and checkpointed
  iterations, synchronous saves. Both runs below use it (one compiled program)."""
  return configs_util.load("gmm_sid.py", "tiny", **{
      "optim.gen_lr": 1e30, "training.num_steps": 3, "checkpoint.every_steps": 1,
      "checkpoint.keep": 10, "log.every_steps": 1, "eval.kind": "none",
      "checkpoint.async_save": False, **overrides})


def _step_dirs(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def test_nan_to_num_bounds_are_the_official_ones():
  """The official loop: torch.nan_to_num(grad, nan=0, posinf=1e5, neginf=-1e5) on every gradient
  before Adam. Finite values beyond 1e5 pass unchanged (it is not a clip)."""
  g = np.asarray([np.nan, np.inf, -np.inf, 3e6, -2.5e5, 0.5], np.float32)
  want = torch.nan_to_num(torch.as_tensor(g), nan=0.0, posinf=1e5, neginf=-1e5).numpy()
  np.testing.assert_array_equal(want, [0.0, 1e5, -1e5, 3e6, -2.5e5, 0.5])
  tx = optim.nan_to_num_grads()
  fixed, _ = tx.update({"w": g}, tx.init({"w": g}))
  np.testing.assert_array_equal(np.asarray(fixed["w"]), want)
  # The optimisers a run builds apply it: Adam's second moment after one step is (1 - b2) g^2.
  run = run_lib.build_run(configs_util.load("gmm_sid.py", "tiny"), ONE_DEVICE)
  for tx in (run.setup.generator_tx, run.setup.fake_tx):
    params = {"w": np.zeros_like(g)}
    _, state = tx.update({"w": g}, tx.init(params), params)
    (nu,) = [np.asarray(x) for x in jax.tree.leaves(state) if np.shape(x) == g.shape]
    np.testing.assert_allclose(nu, (1 - 0.999) * want.astype(np.float64)**2, rtol=1e-6)


def test_provisional_checkpoints_count_only_once_confirmed(tmp_path):
  ckpt = checkpoints.Checkpointer(str(tmp_path), every_steps=1, keep=2, async_save=False,
                                  provisional=True)
  tree = {"w": np.zeros(3, np.float32)}
  for step in (1, 2):
    ckpt.save(step, tree, {})
    ckpt.confirm(step)
  ckpt.save(3, tree, {})  # kept beside the two confirmed ones until judged
  assert ckpt.all_steps() == [1, 2, 3] and ckpt.unconfirmed_step == 3
  ckpt.discard(3)
  assert ckpt.all_steps() == [1, 2] and ckpt.latest_step() == 2
  ckpt.save(4, tree, {})
  ckpt.confirm(4)
  assert ckpt.all_steps() == [2, 4]
  ckpt.close()


def _poison_generator(monkeypatch):
  """Sets one weight of the generator's first convolution to NaN in the run's initial state: NaN
  is then made inside the generator's forward pass, for every sample."""
  original = run_lib.initial_state

  def poisoned(run):
    state = original(run)
    paths = jax.tree_util.tree_flatten_with_path(state.generator)[0]
    path, kernel = next((p, x) for p, x in paths if x.ndim == 4)
    bad = kernel.at[(0,) * 4].set(np.nan)
    generator = jax.tree_util.tree_map_with_path(lambda p, x: bad if p == path else x,
                                                 state.generator)
    return state.replace(generator=generator)

  monkeypatch.setattr(run_lib, "initial_state", poisoned)


def test_nan_made_inside_the_generator_is_masked_logged_and_never_saved_or_exported(
    tmp_path, monkeypatch, caplog):
  """(The learning rate plays no part here: no generator gradient is finite.)"""
  _poison_generator(monkeypatch)
  config = _config(**{"training.max_nonfinite_steps": 0})
  with pytest.raises(train.NonFiniteLossError,
                     match="ended at step 3 but iteration 3 was non-finite.*nothing was saved"):
    train.distill(config, str(tmp_path), devices=ONE_DEVICE)
  # 0 = never stop: all three iterations ran, each is logged and recorded.
  bad = _records(str(tmp_path), "nonfinite")
  assert [r["step"] for r in bad] == [1, 2, 3]
  assert [r["nonfinite_streak"] for r in bad] == [1, 2, 3]
  for r in bad:
    # The fake-score loss masks every generated sample (all NaN) and stays finite: 0 / B.
    assert r["fake_valid_fraction"] == 0 and r["fake_loss"] == 0
    assert r["gen_valid_fraction"] == 0
  for step in (1, 2, 3):
    assert f"Iteration {step} was non-finite ({step} in a row)" in caplog.text
    assert f"Skipped the checkpoint of step {step}: iteration {step} was non-finite" in caplog.text
  assert [r["step"] for r in _records(str(tmp_path), "checkpoint_skipped")] == [1, 2, 3]
  assert _step_dirs(str(tmp_path)) == []
  assert not os.path.exists(tmp_path / "generator")  # nothing exported


def test_exploding_update_is_not_kept_as_last_good_checkpoint(tmp_path, caplog):
  """A generator learning rate of 1e30: iteration 1 is finite but its update blows the weights
  up, so iteration 2 (the first computed from step 1's state) is not. Step 1's checkpoint is
  deleted again, and the guard stops the run with nothing saved."""
  config = _config(**{"training.max_nonfinite_steps": 2, "training.num_steps": 6})
  with pytest.raises(train.NonFiniteLossError,
                     match=r"non-finite for 2 consecutive iterations, up to iteration 3 \(config"
                     r"\.training\.max_nonfinite_steps=2; 0 never stops\)\. No checkpoint "
                     r"was kept"):
    train.distill(config, str(tmp_path), devices=ONE_DEVICE)
  train_records = _records(str(tmp_path), "train")
  assert train_records[0]["step"] == 1 and train_records[0]["nonfinite_streak"] == 0
  assert [r["step"] for r in _records(str(tmp_path), "nonfinite")] == [2, 3]
  skipped = _records(str(tmp_path), "checkpoint_skipped")
  assert skipped[0] == {"step": 1, "kind": "checkpoint_skipped",
                        "reason": "iteration 2, the first from this state, was non-finite"}
  assert "Deleted checkpoint 1: the first iteration computed from it (2) was non-finite" in (
      caplog.text)
  assert _step_dirs(str(tmp_path)) == []
  assert not os.path.exists(tmp_path / "generator")


def test_max_nonfinite_steps_must_not_be_negative():
  config = configs_util.load("gmm_sid.py", "tiny", **{"training.max_nonfinite_steps": -1})
  with pytest.raises(ValueError, match=r"config\.training\.max_nonfinite_steps must be >= 0"):
    run_lib.build_run(config, ONE_DEVICE)
