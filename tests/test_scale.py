"""Scale-out on 8 fake CPU devices: the production compiled iteration (`run.compile_train_step`,
with its in/out shardings and donation) on meshes 1x1, 8x1, 1x8 and 2x4, with every parameter,
EMA and optimiser leaf that can be split really split over `fsdp` (`config.mesh.fsdp_min_size=0`).

The runs use `optim.eps = 1e-3` instead of the config's 1e-8. Adam's update g / (sqrt(v) + eps)
is then a Lipschitz function of the gradient (constant about lr / eps), so gradient sums taken in
another order on another layout move parameters by a rounding-level amount. With eps = 1e-8 and
beta1 = 0 the first update is lr * sign(g) for any |g| >> 1e-8, and an entry whose gradient is a
cancellation at rounding level (e.g. in the zero-initialised output layers) can flip sign, i.e.
differ by 2 lr between two correct layouts: measured ~1e-5 against ~1e-7 with eps = 1e-3.
"""

import os
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sid_jax import run as run_lib
from sid_jax import checkpoints, sharding, train
from tests import configs_util

MESHES = {"1x1": (1, 1), "8x1": (8, 1), "1x8": (1, 8), "2x4": (2, 4)}
NUM_STEPS = 3


def _config(data, fsdp):
  return configs_util.load("gmm_sid.py", "tiny", **{"mesh.data": data, "mesh.fsdp": fsdp,
                                                    "mesh.fsdp_min_size": 0, "optim.eps": 1e-3})


def _iterate(data, fsdp):
  devices = jax.devices()[:data * fsdp]
  run = run_lib.build_run(_config(data, fsdp), devices)
  state = run_lib.initial_state(run)
  teacher = run_lib.teacher_on_mesh(run)
  key = jax.random.key(0)
  compiled = run_lib.compile_train_step(run, state, teacher, key)
  flops = float(compiled.cost_analysis()["flops"]) * data * fsdp  # per device -> all devices
  initial = jax.device_get(state.generator)
  losses = []
  for _ in range(NUM_STEPS):  # the AOT-compiled step: a changed layout would fail, not recompile
    state, metrics = compiled(state, teacher, key, None)
    losses.append((float(metrics["fake_loss"]), float(metrics["gen_loss"])))
  # The step's out_shardings are its in_shardings: the state can go round the loop unchanged.
  for leaf, want in zip(jax.tree.leaves(state), jax.tree.leaves(run.state_shardings)):
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim)
  return run, state, losses, initial, flops


@pytest.fixture(scope="module")
def results():
  return {name: _iterate(*shape) for name, shape in MESHES.items()}


def test_every_splittable_leaf_is_sharded_over_fsdp(results):
  run, state, _, _, _ = results["1x8"]
  split = kept = 0
  for leaf in jax.tree.leaves(state):
    spec = leaf.sharding.spec
    if any(d % 8 == 0 for d in leaf.shape):
      assert "fsdp" in tuple(spec), (leaf.shape, spec)
      assert leaf.addressable_shards[0].data.size == leaf.size // 8
      split += 1
    else:  # nothing divides: stays whole on every device
      assert all(s is None for s in tuple(spec)), (leaf.shape, spec)
      kept += 1
  assert split > 20 and kept > 0  # the test networks really exercise both cases
  # The default threshold keeps these small networks replicated.
  default = sharding.param_shardings(run.mesh, state)
  assert all(s.spec == P() for s in jax.tree.leaves(default))


@pytest.mark.parametrize("name", ["8x1", "1x8", "2x4"])
def test_meshes_give_the_same_losses_and_parameters(results, name):
  """Losses of every iteration, generator, EMA, fake score and both Adam states agree across
  layouts to float32 rounding, after parameters really moved."""
  _, ref_state, ref_losses, initial, _ = results["1x1"]
  _, state, losses, _, _ = results[name]
  assert int(state.step) == int(ref_state.step) == NUM_STEPS
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-5)
  assert len({round(l, 3) for l, _ in ref_losses}) == NUM_STEPS  # the iterations really differ
  ref, got = jax.device_get(ref_state), jax.device_get(state)
  for field in ("generator", "generator_ema", "fake_score", "generator_opt", "fake_opt"):
    for a, b in zip(jax.tree.leaves(getattr(got, field)), jax.tree.leaves(getattr(ref, field))):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=field)
  moved = max(float(np.max(np.abs(a - b))) for a, b in
              zip(jax.tree.leaves(ref.generator), jax.tree.leaves(initial)))
  assert moved > 100 * 1e-6  # the tolerance is far below how far the parameters moved


@pytest.mark.parametrize("name", ["8x1", "1x8", "2x4"])
def test_no_work_is_repeated_across_devices(results, name):
  """The devices of a mesh together do the one-device iteration's work, not a multiple of it:
  activations stay split over the batch (`sharding.split_batch` in the networks), so no
  convolution runs on a whole `data` group's batch on every `fsdp` device. Measured 1.00-1.05x of
  one device's FLOPs; splitting the convolutions over output channels instead gave 1.25x."""
  one = results["1x1"][4]
  assert results[name][4] == pytest.approx(one, rel=0.1)


def test_bad_fsdp_min_size_is_refused():
  with pytest.raises(ValueError, match="config.mesh.fsdp_min_size"):
    run_lib.build_run(configs_util.load("gmm_sid.py", "tiny", **{"mesh.fsdp_min_size": -1}))


# ---------------------------------------------------------------------------------------------
# Resume on another layout: a checkpoint written on 2x4 continues on 1 device and on 1x8.
# ---------------------------------------------------------------------------------------------


def layout_config(data, fsdp, num_steps):
  return configs_util.load("gmm_sid.py", "tiny", **{
      "mesh.data": data, "mesh.fsdp": fsdp, "mesh.fsdp_min_size": 0, "optim.eps": 1e-3,
      "training.num_steps": num_steps, "checkpoint.every_steps": 2, "eval.kind": "none"})


def final_checkpoint(workdir, step):
  """The whole training checkpoint of `step` (state and RNG), restored on one device."""
  config = layout_config(1, 1, step)
  run = run_lib.build_run(config, jax.devices()[:1])
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=1, keep=10)
  restored, _ = ckpt.restore(step, run_lib.abstract_checkpoint(run), config.to_dict())
  ckpt.close()
  return jax.device_get(restored)


def test_checkpoint_from_2x4_resumes_on_one_device_and_on_1x8(tmp_path):
  full = train.distill(layout_config(2, 4, 4), str(tmp_path / "full"),
                       devices=jax.devices()[:8])
  assert full["checkpoint_steps"] == [2, 4]
  part = tmp_path / "part"
  first = train.distill(layout_config(2, 4, 2), str(part), devices=jax.devices()[:8])
  assert first["checkpoint_steps"] == [2]
  reference = final_checkpoint(str(tmp_path / "full"), 4)
  for name, (data, fsdp) in {"1x1": (1, 1), "1x8": (1, 8)}.items():
    workdir = tmp_path / name
    shutil.copytree(part, workdir)
    resumed = train.distill(layout_config(data, fsdp, 4), str(workdir),
                            devices=jax.devices()[:data * fsdp])
    assert resumed["start_step"] == 2 and resumed["status"] == "done"
    assert resumed["checkpoint_steps"] == [2, 4]
    got = final_checkpoint(str(workdir), 4)
    assert int(got["state"].step) == 4
    np.testing.assert_array_equal(got["rng"], reference["rng"])
    for a, b in zip(jax.tree.leaves(got["state"]), jax.tree.leaves(reference["state"])):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=name)


def test_whole_parameter_trees_stay_on_the_host(results):
  """The run's unsharded initial parameters and teacher are NumPy: on devices there are only the
  sharded state and the teacher on the mesh."""
  run, state, _, _, _ = results["1x8"]
  for tree in (run.init_params, run.teacher.params):
    assert all(isinstance(leaf, np.ndarray) for leaf in jax.tree.leaves(tree))
  assert all(len(leaf.sharding.device_set) == 8 for leaf in jax.tree.leaves(state))
