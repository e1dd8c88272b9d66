"""Plan before you launch: compile a run's iteration for a target and print what it needs.

  python -m sid_jax.plan --config=configs/sid_lsg.py:teacher=sd15,kappa=1.5 \
      --target=tpu:v5e:2x4 [--config.mesh.fsdp=4] [--device_memory_gib=16] [--json=plan.json]

The iteration (`run.lower_train_step`: the production shardings and donation) is lowered from
shapes only -- `jax.ShapeDtypeStruct`s with their shardings, no weights, no data -- and compiled by
XLA for the target's devices. Per device it reports the bytes of the generator, its EMA, the fake
score, the optimiser states and the frozen teacher (from the shardings), XLA's memory analysis
(arguments, outputs, temporaries) and its cost analysis (FLOPs, the cost model's time), and
whether the total fits the device's memory.

Targets:
* `local`: this machine's devices (`jax.devices()`).
* `tpu:TOPOLOGY`, e.g. `tpu:v5e:1x1` (one chip), `tpu:v5e:2x4` (v5e-8), `tpu:v5p:2x2x1`
  (v5p-8), `tpu:v4:2x2x1` (v4-8):
  abstract TPU devices from `jax.experimental.topologies`, which needs libtpu
  (`pip install -e .[tpu]`) but no TPU: the compile runs on this host's CPUs.
GPU targets: jax 0.10.2 offers no deviceless GPU compilation here (it needs a CUDA device to
describe the target); plan on a GPU host with `--target=local` instead.

Real-size Stable Diffusion plans take many minutes of CPU per compile; keep them out of CI.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any

from absl import app, flags
import jax
import numpy as np
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags

from sid_jax import cli, sharding, steps
from sid_jax import run as run_lib

FLAGS = flags.FlagValues()
config_flags.DEFINE_config_file("config", None, "Config file to plan (configs/NAME.py[:ARG]).",
                                flag_values=FLAGS, lock_config=True)
flags.DEFINE_string("target", "local", "local | tpu:TOPOLOGY (e.g. tpu:v5e:2x4, tpu:v5p:2x2x1).",
                    flag_values=FLAGS)
flags.DEFINE_float("device_memory_gib", None, "Memory per device (GiB); default: what the device "
                   "reports, or the chip's HBM for TPU targets.", flag_values=FLAGS)
flags.DEFINE_string("json", "", "Also write the plan as JSON here.", flag_values=FLAGS)
flags.DEFINE_bool("parts", False, "Compile the fake-score and generator updates apart, one "
                  "micro-batch each (real-size Stable Diffusion: the whole iteration takes too "
                  "long to compile on a small host).", flag_values=FLAGS)
flags.DEFINE_bool("shapes_only", False, "Compile nothing: the sharded state and teacher bytes "
                  "only (a lower bound on memory), in seconds.", flag_values=FLAGS)

GIB = 2**30
# High-bandwidth memory per chip (GiB), by the `device_kind` JAX reports.
DEVICE_MEMORY_GIB = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5e": 16, "TPU v5": 95,
                     "TPU v5p": 95, "TPU v6 lite": 32, "TPU v6e": 32}
STATE_PARTS = ("generator", "generator_ema", "fake_score", "generator_opt", "fake_opt")


def target_devices(target: str) -> list:
  """The devices of a target: 'local' or 'tpu:TOPOLOGY' (abstract TPU devices)."""
  if target == "local":
    return list(jax.devices())
  kind, _, topology = target.partition(":")
  if kind != "tpu" or not topology:
    raise ValueError(f"--target={target!r}: expected 'local' or 'tpu:TOPOLOGY' (e.g. "
                     "tpu:v5e:2x4, tpu:v5p:2x2x1, tpu:v4:2x2x1). GPU targets cannot be compiled "
                     "without a GPU in jax 0.10.2: run the plan on a GPU host with --target=local.")
  # Plans compile on the host: several processes may load libtpu at once (e.g. parallel plans);
  # without this, libtpu's lock file lets only one process in.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    import libtpu  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise RuntimeError("TPU plans need libtpu: pip install -e .[tpu] (jax[tpu]==0.10.2). "
                       "No TPU is needed.") from e
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  options = {}
  dims = topology.rpartition(":")[2].split("x")
  if all(d.isdigit() for d in dims) and int(np.prod([int(d) for d in dims])) < 4:
    # Fewer chips than one host's default 2x2x1 (e.g. v5e:1x1, a single chip): one smaller host.
    options["chips_per_host_bounds"] = tuple(int(d) for d in dims) + (1,) * (3 - len(dims))
  if topology.startswith("v4"):
    # JAX runs v4 chips in megacore mode (one device per chip, both TensorCores); libtpu's default
    # description has one device per core, which JAX cannot lay out as a mesh.
    options["chip_config_name"] = "megacore"
  try:
    return list(topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                             **options).devices)
  except Exception as e:  # libtpu's own errors are long: keep their first line
    raise ValueError(f"--target={target!r}: libtpu could not describe the topology {topology!r} "
                     f"({type(e).__name__}: {str(e).splitlines()[0][:300]}). Names look like "
                     "v5e:2x2, v5e:2x4, v5p:2x2x1, v4:2x2x1.") from e


def device_memory_bytes(device) -> int | None:
  """The memory of one device: what the runtime reports, else the table above, else None."""
  stats = None
  try:
    stats = device.memory_stats()
  except Exception:  # abstract devices and some backends have none
    pass
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  gib = DEVICE_MEMORY_GIB.get(getattr(device, "device_kind", ""))
  return None if gib is None else int(gib * GIB)


def _per_device_bytes(tree) -> int:
  """Bytes on the most loaded device of a tree of ShapeDtypeStructs with shardings."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += int(np.prod(shard, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
  return total


def unsharded_leaves(tree, mesh, min_size: int) -> dict[str, Any]:
  """Why leaves stay whole on every device: below the FSDP threshold, scalars (step counters),
  or no dimension divisible by the `fsdp` axis (each such leaf named with its shape)."""
  fsdp = mesh.shape["fsdp"]
  small = {"count": 0, "bytes": 0}
  scalars = 0
  indivisible = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if leaf.sharding.spec != P() and any(s is not None for s in leaf.sharding.spec):
      continue
    nbytes = int(np.prod(leaf.shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    if fsdp == 1:
      continue  # nothing is split without an fsdp axis; reported once as the mesh
    if not leaf.shape:
      scalars += 1
    elif int(np.prod(leaf.shape, dtype=np.int64)) < min_size:
      small["count"] += 1
      small["bytes"] += nbytes
    else:
      indivisible.append({"leaf": jax.tree_util.keystr(path), "shape": list(leaf.shape),
                          "bytes": nbytes})
  return {"below_fsdp_min_size": small, "scalars": scalars,
          "no_dimension_divisible_by_fsdp": indivisible}


@dataclasses.dataclass
class Plan:
  """One compiled plan: all numbers are bytes or FLOPs per device unless named otherwise."""
  target: str
  device_kind: str
  num_devices: int
  mesh: dict
  global_batch: int
  micro_batch: int
  num_micro: int
  state: dict  # per part of the training state, bytes per device
  teacher: int
  xla: dict | None  # memory_analysis: argument, output, alias, temp, generated code
  total: int  # argument + output - alias + temp + generated code
  device_memory: int | None
  fits: bool | None
  flops: float | None
  bytes_accessed: float | None
  seconds: float | None  # XLA's cost-model time of one iteration
  flops_per_image: float | None
  images_per_second_per_chip: float | None
  unsharded: dict
  compile_seconds: float
  # 'iteration': the production iteration compiled whole. 'shapes': nothing compiled, `total` is
  # the sharded state and teacher only (a lower bound; `fits` is then only ever False). 'parts': the fake-score and generator
  # updates compiled apart with global batch = micro-batch (for real-size models whose whole
  # iteration takes too long to compile here); `total` is then the larger part plus, with
  # accumulation, one float32 gradient tree of the trained network (the loop's carry).
  method: str = "iteration"
  parts: dict | None = None

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX returned one dict per program
    cost = cost[0] if cost else {}
  return dict(cost or {})


def _compile(config, devices):
  run = run_lib.build_run(config, devices, abstract=True)
  abstract = run_lib.abstract_checkpoint(run)["state"]
  teacher = run_lib.abstract_teacher(run)
  t0 = time.time()
  compiled = run_lib.lower_train_step(run, abstract, teacher, run_lib.abstract_key(run)).compile()
  return run, abstract, teacher, compiled, time.time() - t0


def _xla_memory(compiled) -> dict:
  mem = compiled.memory_analysis()
  return {name: int(getattr(mem, f"{name}_size_in_bytes", 0) or 0)
          for name in ("argument", "output", "alias", "temp", "generated_code")}


def _xla_total(xla: dict) -> int:
  return xla["argument"] + xla["output"] - xla["alias"] + xla["temp"] + xla["generated_code"]


def _micro_config(config, micro_batch: int):
  micro = config.copy_and_resolve_references()
  with micro.unlocked():
    micro.training.global_batch = micro_batch
  return micro


def _compile_parts(config, devices) -> dict:
  """The fake-score update and the generator update, each compiled on its own (production
  shardings and donation) for one micro-batch."""
  run = run_lib.build_run(config, devices, abstract=True)
  state = run_lib.abstract_checkpoint(run)["state"]
  teacher = run_lib.abstract_teacher(run)
  key = run_lib.abstract_key(run)
  batch = run.feed.abstract() if run.feed is not None else None
  repl = sharding.replicated(run.mesh)
  in_sh = (run.state_shardings, run.teacher_shardings, repl,
           jax.tree.map(lambda a: a.sharding, batch))
  parts = {
      "fake_score_update": lambda st, tp, k, b: steps.fake_score_step(run.setup, st, k, tp, b),
      "generator_update": lambda st, tp, k, b: steps.generator_step(run.setup, st, tp, k, b),
  }
  out = {}
  for name, fn in parts.items():
    t0 = time.time()
    jitted = jax.jit(fn, in_shardings=in_sh, out_shardings=(run.state_shardings, repl),
                     donate_argnums=0)
    with jax.set_mesh(run.mesh):
      compiled = jitted.lower(state, teacher, key, batch).compile()
    out[name] = {"xla": _xla_memory(compiled), "cost": _cost(compiled),
                 "compile_seconds": time.time() - t0}
  return out


def traced_flops_per_image(config) -> float | None:
  """FLOPs per generated-and-trained image from the *unoptimised* program: the one-micro-batch
  iteration lowered (traced, not compiled) for one local device, XLA's cost analysis of it,
  divided by the micro-batch. Independent of the target; seconds even for real-size models."""
  micro = _micro_config(config, int(config.training.micro_batch))
  with micro.unlocked():
    micro.mesh.data, micro.mesh.fsdp = 1, 1
  run = run_lib.build_run(micro, jax.local_devices()[:1], abstract=True)
  lowered = run_lib.lower_train_step(run, run_lib.abstract_checkpoint(run)["state"],
                                     run_lib.abstract_teacher(run), run_lib.abstract_key(run))
  cost = lowered.cost_analysis() or {}
  flops = cost.get("flops")
  return None if not flops else float(flops) / run.setup.global_batch


def make_plan(config, devices, *, target: str = "local", device_memory: int | None = None,
              parts: bool = False, shapes_only: bool = False) -> Plan:
  """Compiles `config`'s iteration for `devices` from shapes only and reads XLA's analyses.

  Memory comes from the production iteration. XLA's cost analysis counts a loop body once, so
  with gradient accumulation (num_micro > 1) FLOPs and the cost-model time come from a second
  compile of the same iteration with global batch = micro-batch, times num_micro (the optimiser
  and EMA updates, a small part, are then counted num_micro times). With `parts`, see
  `Plan.method`. With `shapes_only` nothing is compiled: `total` is the sharded state and
  teacher alone, a lower bound, and FLOPs come from the traced program
  (`traced_flops_per_image`); seconds instead of many minutes for real-size models.
  """
  run = run_lib.build_run(config, devices, abstract=True)
  abstract = run_lib.abstract_checkpoint(run)["state"]
  teacher = run_lib.abstract_teacher(run)
  num_micro = run.setup.num_micro
  micro_config = _micro_config(config, run.setup.micro_batch)
  part_info = None
  cost = {}
  if shapes_only:
    xla = None
    compile_s = 0.0
    total = _per_device_bytes(abstract) + _per_device_bytes(teacher)
    per_image = traced_flops_per_image(config)
    if per_image is not None:  # as if compiled: FLOPs of one micro-batch iteration, per device
      cost = {"flops": per_image * run.setup.micro_batch / run.mesh.size}
  elif parts:
    part_info = _compile_parts(micro_config, devices)
    xla = {name: max(p["xla"][name] for p in part_info.values())
           for name in next(iter(part_info.values()))["xla"]}
    carry = _per_device_bytes(abstract.generator) if num_micro > 1 else 0
    total = max(_xla_total(p["xla"]) for p in part_info.values()) + carry
    compile_s = sum(p["compile_seconds"] for p in part_info.values())
    costs = [p["cost"] for p in part_info.values()]
    cost = {k: sum(float(c.get(k) or 0) for c in costs) or None
            for k in ("flops", "bytes accessed", "optimal_seconds")}
  else:
    run, abstract, teacher, compiled, compile_s = _compile(config, devices)
    xla = _xla_memory(compiled)
    total = _xla_total(xla)
    if num_micro > 1:
      _, _, _, micro_compiled, micro_s = _compile(micro_config, devices)
      compile_s += micro_s
      cost = _cost(micro_compiled)
    else:
      cost = _cost(compiled)
  flops = cost.get("flops")
  flops = None if flops is None else float(flops) * num_micro
  seconds = cost.get("optimal_seconds")
  seconds = None if seconds is None or seconds <= 0 else float(seconds) * num_micro
  n = run.mesh.size
  batch = run.setup.global_batch
  if device_memory is None:
    device_memory = device_memory_bytes(devices[0])
  min_size = sharding.fsdp_min_size(config.mesh)
  return Plan(
      target=target, device_kind=getattr(devices[0], "device_kind", devices[0].platform),
      num_devices=n, mesh=dict(run.mesh.shape), global_batch=batch,
      micro_batch=run.setup.micro_batch, num_micro=num_micro,
      state={part: _per_device_bytes(getattr(abstract, part)) for part in STATE_PARTS},
      teacher=_per_device_bytes(teacher), xla=xla, total=total, device_memory=device_memory,
      fits=(None if device_memory is None or (shapes_only and total <= device_memory)
            else total <= device_memory),
      flops=flops,
      bytes_accessed=None if cost.get("bytes accessed") is None else float(
          cost["bytes accessed"]) * num_micro,
      seconds=seconds,
      flops_per_image=None if flops is None else flops * n / batch,
      images_per_second_per_chip=None if seconds is None else batch / n / seconds,
      unsharded={"state": unsharded_leaves(abstract, run.mesh, min_size),
                 "teacher": unsharded_leaves(teacher, run.mesh, min_size)},
      compile_seconds=compile_s,
      method="shapes" if shapes_only else "parts" if parts else "iteration",
      parts=None if part_info is None else {
          k: {"xla": v["xla"], "total": _xla_total(v["xla"]),
              "flops": v["cost"].get("flops"), "compile_seconds": v["compile_seconds"]}
          for k, v in part_info.items()})


def _gib(x) -> str:
  if x is None:
    return "-"
  return f"{x / GIB:.2f} GiB" if x >= GIB / 10 else f"{x / 2**20:.2f} MiB"


def format_plan(p: Plan) -> str:
  lines = [f"Plan for {p.target}: {p.num_devices} x {p.device_kind}, mesh {p.mesh}, global batch "
           f"{p.global_batch} = {p.num_micro} x micro-batch {p.micro_batch} "
           f"({p.method}; compiled in {p.compile_seconds:.1f} s).",
           "Per device:"]
  names = {"generator": "generator", "generator_ema": "generator EMA",
           "fake_score": "fake score", "generator_opt": "generator Adam state",
           "fake_opt": "fake score Adam state"}
  for part, label in names.items():
    lines.append(f"  {label:<28}{_gib(p.state[part])}")
  lines.append(f"  {'frozen teacher':<28}{_gib(p.teacher)}")
  if p.xla is None:
    lines.append("  (not compiled: --shapes_only; the total below is a lower bound, FLOPs are "
                 "the traced program's)")
  elif p.parts:
    lines.append("  (compiled as parts, one micro-batch each; XLA numbers per part)")
    for part, info in p.parts.items():
      x = info["xla"]
      lines.append(f"  {part.replace('_', ' '):<28}argument {_gib(x['argument'])}, temp "
                   f"{_gib(x['temp'])}, total {_gib(info['total'])}")
    if p.num_micro > 1:
      lines.append(f"  {'accumulated gradient':<28}{_gib(p.state['generator'])} (from shapes)")
  else:
    for name in ("argument", "output", "alias", "temp", "generated_code"):
      lines.append(f"  {'XLA ' + name.replace('_', ' '):<28}{_gib(p.xla[name])}")
  fits = {None: "unknown" + (" (pass --device_memory_gib)" if p.device_memory is None else ""),
          True: "yes", False: "NO"}[p.fits]
  lines.append(f"  {'total':<28}{_gib(p.total)} of {_gib(p.device_memory)}: fits {fits}")
  if p.flops is not None:
    lines.append(f"  {'FLOPs per iteration':<28}{p.flops:.4g}")
    lines.append(f"  {'FLOPs per image':<28}{p.flops_per_image:.4g} (all devices / global batch)")
  if p.seconds is not None:
    lines.append(f"  {'cost-model time':<28}{p.seconds:.4g} s per iteration, "
                 f"{p.images_per_second_per_chip:.4g} images/s per chip")
  for what in ("state", "teacher"):
    u = p.unsharded[what]
    small, odd = u["below_fsdp_min_size"], u["no_dimension_divisible_by_fsdp"]
    if p.mesh.get("fsdp", 1) == 1:
      continue
    lines.append(f"Unsplit {what} leaves: {small['count']} below config.mesh.fsdp_min_size "
                 f"({_gib(small['bytes'])} in all); {u['scalars']} scalars; {len(odd)} with no "
                 "dimension divisible by "
                 f"fsdp={p.mesh['fsdp']}" + (":" if odd else "."))
    lines.extend(f"  {o['leaf']} {tuple(o['shape'])}" for o in odd[:20])
    if len(odd) > 20:
      lines.append(f"  ... and {len(odd) - 20} more")
  if p.mesh.get("fsdp", 1) == 1:
    lines.append("Every parameter and optimiser leaf is replicated (config.mesh.fsdp=1).")
  return "\n".join(lines)


def run(config, target: str = "local", device_memory_gib: float | None = None,
        json_path: str = "", parts: bool = False, shapes_only: bool = False) -> Plan:
  """Plans `config` for `target`, prints the table and optionally writes JSON (in-process use)."""
  if device_memory_gib is not None and device_memory_gib <= 0:
    raise ValueError(f"--device_memory_gib must be positive, got {device_memory_gib}.")
  devices = target_devices(target)
  memory = None if device_memory_gib is None else int(device_memory_gib * GIB)
  if parts and shapes_only:
    raise ValueError("--parts and --shapes_only exclude each other.")
  plan = make_plan(config, devices, target=target, device_memory=memory, parts=parts,
                   shapes_only=shapes_only)
  print(format_plan(plan))
  if json_path:
    with open(json_path, "w") as out:
      json.dump(plan.to_json(), out, indent=2, sort_keys=True)
  return plan


def main(argv) -> None:
  def plan():
    if len(argv) > 1:
      raise ValueError(f"Unexpected arguments {argv[1:]}.")
    if FLAGS.config is None:
      raise ValueError("--config is required (configs/NAME.py[:ARG]).")
    return run(cli.loaded_config(lambda: FLAGS.config), FLAGS.target, FLAGS.device_memory_gib,
               FLAGS.json, FLAGS.parts, FLAGS.shapes_only)

  plan = cli.report_errors("sid_jax.plan", plan,
                           errors=(ValueError, FileNotFoundError, RuntimeError))
  if plan.fits is False:
    sys.exit(3)  # a launch script can stop here


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parser(FLAGS, __doc__, "sid_jax.plan"))
