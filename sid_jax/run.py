"""One run builder: config -> networks, losses, shardings, setup, initial state, compiled step,
generator and fixed evaluation inputs -- for SiD and SiD-LSG alike.

A method contributes a `methods.Assembly` (what is specific to it: teacher, student denoiser,
losses, guidance, conditioning, prompt feed, how to sample and export; `sid_jax/methods/`);
everything else is shared. The jobs (`train`, `evaluate`, `bench`) import this module, never
each other.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sid_jax import generators, host_memory, images, methods, models, optim, sharding, steps
from sid_jax.data import digits as digits_data
from sid_jax.evaluation import in_loop

METHODS = tuple(methods.ASSEMBLERS)


# ---------------------------------------------------------------------------------------------
# Config checks: everything that can be wrong is reported before anything is compiled.
# ---------------------------------------------------------------------------------------------


def check_config(config: ml_collections.ConfigDict, num_devices: int,
                 abstract: bool = False) -> None:
  """Raises a ValueError naming the setting for anything wrong (`abstract`: a plan's config,
  whose weight and data files need not exist)."""
  t, o, d = config.training, config.optim, config.data
  shards = int(np.prod(sharding.mesh_shape(dict(config.mesh), num_devices)))
  sharding.fsdp_min_size(config.mesh)
  if config.method not in METHODS:
    raise ValueError(f"config.method={config.method!r} is not supported; expected one of "
                     f"{', '.join(METHODS)}.")
  if config.method in methods.CHECKS:
    methods.CHECKS[config.method](config, abstract)
  for name in ("global_batch", "micro_batch", "num_steps"):
    if int(t[name]) <= 0:
      raise ValueError(f"config.training.{name} must be positive, got {t[name]}.")
  if int(t.max_nonfinite_steps) < 0:
    raise ValueError("config.training.max_nonfinite_steps must be >= 0 (0 = never stop), got "
                     f"{t.max_nonfinite_steps}.")
  if t.global_batch % t.micro_batch:
    raise ValueError(f"config.training.global_batch={t.global_batch} is not a multiple of "
                     f"config.training.micro_batch={t.micro_batch}.")
  if t.micro_batch % shards:
    raise ValueError(
        f"config.training.micro_batch={t.micro_batch} (global_batch={t.global_batch}) is not "
        f"divisible by the {shards} batch shards of config.mesh={dict(config.mesh)}.")
  for name in ("fake_lr", "gen_lr", "eps"):
    if not o[name] > 0:
      raise ValueError(f"config.optim.{name} must be positive, got {o[name]}.")
  for name in ("fake_b1", "gen_b1", "b2"):
    if not 0 <= o[name] < 1:
      raise ValueError(f"config.optim.{name} must lie in [0, 1), got {o[name]}.")
  if d.resolution <= 0 or d.channels <= 0 or d.label_dim < 0:
    raise ValueError(f"config.data must have positive resolution/channels and label_dim >= 0, "
                     f"got {d.to_dict()}.")
  if config.sid.sigma_init <= 0 or not 0 < config.sid.tmax <= 1000:
    raise ValueError(f"config.sid.sigma_init must be > 0 and tmax in (0, 1000], got "
                     f"{config.sid.sigma_init}, {config.sid.tmax}.")
  if config.ema.halflife_kimg <= 0:
    raise ValueError(f"config.ema.halflife_kimg must be positive, got {config.ema.halflife_kimg}.")
  for section, name in (("checkpoint", "every_steps"), ("checkpoint", "keep"),
                        ("log", "every_steps"), ("log", "sample_every_steps"),
                        ("eval", "every_steps"), ("eval", "batch")):
    if int(config[section][name]) <= 0:
      raise ValueError(f"config.{section}.{name} must be positive, got {config[section][name]}.")
  if config.eval.batch % shards:
    raise ValueError(f"config.eval.batch={config.eval.batch} is not divisible by the {shards} "
                     "batch shards of the mesh.")
  if config.eval.num_samples < 2:
    raise ValueError(f"config.eval.num_samples must be at least 2, got {config.eval.num_samples}.")
  in_loop.check_config(config)


# ---------------------------------------------------------------------------------------------
# What a method contributes, and the run built from it.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
  """Everything built from a config, before any step is compiled."""
  config: ml_collections.ConfigDict
  mesh: Any
  teacher: models.Teacher
  setup: steps.SiDSetup
  student_spec: dict
  init_params: Any
  state_shardings: Any
  teacher_shardings: Any
  generator: generators.Generator
  sampling_params: Callable[[Any, Any], Any]
  export: Callable[[Any, str, int], None]
  # SiD-LSG: the prompt feed (lsg.PromptFeed); SiDA: real data (sida.PairFeed); SiD with
  # config.data: the data's labels (real.LabelFeed).
  feed: Any = None
  generator_init_params: Any = None  # SiD²A: the generator's own start (None: init_params)


def build_run(config: ml_collections.ConfigDict, devices=None, *, abstract: bool = False) -> Run:
  """The run of `config` on `devices` (default: all). With `abstract`, every network parameter is
  a shape (`jax.ShapeDtypeStruct`) and no weight or data file is read: enough to lower and
  compile the iteration for a target (`sid_jax.plan`), not to run it. `devices` may then be
  abstract TPU devices (`jax.experimental.topologies`)."""
  devices = list(jax.devices() if devices is None else devices)
  check_config(config, len(devices), abstract)
  mesh = sharding.make_mesh(dict(config.mesh), devices)
  min_size = sharding.fsdp_min_size(config.mesh)
  a = methods.ASSEMBLERS[config.method](config, abstract=abstract)
  d = config.data
  if (d.resolution, d.resolution, d.channels) != tuple(a.image_shape):
    raise ValueError(f"config.data (resolution={d.resolution}, channels={d.channels}) does not "
                     f"match the networks' images {tuple(a.image_shape)}.")
  o = config.optim
  setup = steps.SiDSetup(
      teacher=a.teacher.denoiser, fake_score=a.student,
      generate=generators.one_step(a.student, a.sigma_init),
      fake_loss=a.fake_loss, generator_loss=a.generator_loss,
      image_shape=tuple(a.image_shape), label_dim=a.label_dim,
      global_batch=config.training.global_batch, micro_batch=config.training.micro_batch,
      generator_tx=optim.adam(o.gen_lr, o.gen_b1, o.b2, o.eps, clip_value=o.gen_clip_value),
      fake_tx=optim.adam(o.fake_lr, o.fake_b1, o.b2, o.eps, clip_value=o.fake_clip_value),
      hyper=a.hyper, project=a.project, project_fake=a.project_fake,
      draw_sharding=sharding.batch_sharding(mesh, 1), augment=a.augment,
      # XLA:CPU runs convolutions in a loop body ~25x slower: unroll there. Decided by the
      # devices the step runs on (a TPU plan compiled on a CPU host keeps its loop).
      unroll_micro=devices[0].platform == "cpu", conditioning=a.conditioning)
  teacher, init_params = a.teacher, a.init_params
  if not abstract:
    # Host (NumPy) copies: nothing unsharded stays on a device once the sharded state and the
    # teacher on the mesh exist (`initial_state`, `teacher_on_mesh` place them from here). A
    # generator initialised from the teacher shares the teacher's host arrays.
    same = init_params is teacher.params
    teacher = dataclasses.replace(teacher, params=jax.device_get(teacher.params))
    init_params = teacher.params if same else jax.device_get(init_params)
  abstract_state = jax.eval_shape(lambda p: steps.init_state(setup, p, p), init_params)
  feed = None
  if a.make_feed:
    feed = a.make_feed(mesh, setup.num_micro, setup.micro_batch, abstract=abstract)
  elif config.data.get("source", ""):
    # SiD on a labelled dataset: the generator's classes follow the data's (ImageNet's are not
    # uniform); drawn uniformly only without data.
    from sid_jax.data import real  # pylint: disable=g-import-not-at-top
    feed = real.make_label_feed(config, mesh, setup.num_micro, setup.micro_batch, abstract)
  return Run(config=config, mesh=mesh, teacher=teacher, setup=setup, student_spec=a.spec,
             init_params=init_params,
             state_shardings=sharding.param_shardings(mesh, abstract_state, min_size),
             teacher_shardings=sharding.param_shardings(mesh, teacher.params, min_size),
             generator=a.make_generator(mesh), sampling_params=a.sampling_params,
             export=a.export, feed=feed, generator_init_params=a.generator_init_params)


# ---------------------------------------------------------------------------------------------
# State, checkpoints, the compiled iteration.
# ---------------------------------------------------------------------------------------------


def initial_state(run: Run) -> steps.SiDState:
  """The step-0 state on the mesh, built from the host's initial parameters placed straight into
  the generator's shardings (no whole copy on any one device)."""
  fn = jax.jit(lambda g, f: steps.init_state(run.setup, g, f), out_shardings=run.state_shardings)
  params = jax.device_put(run.init_params, run.state_shardings.generator)
  gen = params
  if run.generator_init_params is not None:  # SiD²A: the generator starts from a SiD generator
    gen = jax.device_put(run.generator_init_params, run.state_shardings.generator)
  with jax.set_mesh(run.mesh):
    return fn(gen, params)


def abstract_checkpoint(run: Run) -> dict[str, Any]:
  """The shapes, dtypes and target shardings of a training checkpoint's 'state' and 'rng'."""
  state = jax.eval_shape(lambda p: steps.init_state(run.setup, p, p), run.init_params)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state,
                       run.state_shardings)
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sharding.replicated(run.mesh))
  return {"state": state, "rng": rng}


def teacher_on_mesh(run: Run):
  return jax.device_put(run.teacher.params, run.teacher_shardings)


def abstract_key(run: Run) -> jax.ShapeDtypeStruct:
  """The shape of the run's base RNG key (a typed threefry key), replicated."""
  return jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding.replicated(run.mesh))


def abstract_teacher(run: Run):
  """The teacher's parameters as shapes with their shardings on the run's mesh."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      run.teacher.params, run.teacher_shardings)


def lower_train_step(run: Run, state, teacher_params, key):
  """The iteration `(state, teacher_params, key, batch) -> (state, metrics)` lowered with the
  production in/out shardings and donation; arguments may be arrays or `ShapeDtypeStruct`s.
  `batch` is None for SiD and the prompt feed's token ids for SiD-LSG."""
  repl = sharding.replicated(run.mesh)
  batch = run.feed.abstract() if run.feed is not None else None
  batch_sh = jax.tree.map(lambda a: a.sharding, batch)
  fn = jax.jit(functools.partial(steps.train_step, run.setup),
               in_shardings=(run.state_shardings, run.teacher_shardings, repl, batch_sh),
               out_shardings=(run.state_shardings, repl), donate_argnums=0)
  with jax.set_mesh(run.mesh):
    return fn.lower(state, teacher_params, key, batch)


def compile_train_step(run: Run, state, teacher_params, key):
  """The compiled iteration (see `lower_train_step`). The compiler's freed heap goes back to the
  system afterwards (`host_memory.release`)."""
  compiled = lower_train_step(run, state, teacher_params, key).compile()
  host_memory.release()
  return compiled


# ---------------------------------------------------------------------------------------------
# Evaluation inputs, evaluation and sample grids: images from seeds, through run.generator.
# ---------------------------------------------------------------------------------------------


def eval_kind(config) -> str:
  """The in-loop evaluation kind ('auto' resolved): gmm | digits | fid | none."""
  return in_loop.resolve_kind(config)


def eval_every_steps(config) -> int:
  """Steps between evaluations: `config.eval.every_kimg` (if > 0) or `config.eval.every_steps`."""
  kimg = config.eval.get("every_kimg", 0.0)
  if kimg and kimg > 0:
    return max(1, round(kimg * 1000 / config.training.global_batch))
  return int(config.eval.every_steps)


def eval_seeds(seed: int, num: int) -> np.ndarray:
  """The seeds of an evaluation: seed, seed + 1, ..., seed + num - 1."""
  return np.arange(seed, seed + num, dtype=np.int64)


def eval_inputs(run: Run) -> tuple[np.ndarray, np.ndarray | None]:
  """Fixed (seeds, class ids or None) for evaluation: the same at every evaluation."""
  ev = run.config.eval
  if eval_kind(run.config) == "digits":
    # As many samples as the held-out real half, with the same labels, so that the rows of the
    # metric table are comparable.
    _, (_, yb) = digits_data.split_halves()
    return eval_seeds(ev.seed, len(yb)), np.asarray(yb, np.int32)
  seeds = eval_seeds(ev.seed, ev.num_samples)
  return seeds, None


def build_scorer(run: Run) -> in_loop.Scorer:
  return in_loop.build_scorer(run.config, mesh=run.mesh, teacher=run.teacher)


def evaluate(run: Run, params, teacher_params=None, scorer: in_loop.Scorer | None = None
             ) -> dict[str, float]:
  """Metrics of the given generator params with fixed seeds (comparable across steps)."""
  scorer = scorer or build_scorer(run)
  if scorer.kind == "none":
    return {}
  seeds, classes = eval_inputs(run)
  gen = run.generator
  x = gen.generate(seeds, classes, params=run.sampling_params(params, teacher_params),
                   batch=run.config.eval.batch)
  labels = gen.labels(seeds, classes) if isinstance(gen, generators.ClassGenerator) else None
  out = scorer.score(x, labels)
  out.pop("protocol", None)
  return {k: float(v) for k, v in out.items()}


def grid_inputs(run: Run) -> tuple[np.ndarray, Any, int, int]:
  """(seeds, conditions, rows, cols) of the sample grids: seeds 0..n-1 (the images
  `python -m sid_jax.sample --seeds 0-(n-1)` gives with the same classes or prompts); one row
  per class (the first 10 classes), 4 rows when unconditional, the grid prompts when
  text-to-image."""
  cols = run.config.log.grid_columns
  if run.setup.conditioning is not None:  # text-to-image (a real-data feed gives no prompts)
    prompts = list(run.config.lsg.grid_prompts)
    rows = max(1, math.ceil(len(prompts) / cols))
    n = rows * cols
    return np.arange(n), [prompts[i % len(prompts)] for i in range(n)], rows, cols
  rows = min(run.setup.label_dim, 10) or 4
  classes = np.repeat(np.arange(rows), cols).astype(np.int32) if run.setup.label_dim else None
  return np.arange(rows * cols), classes, rows, cols


def sample_grid(run: Run, params, teacher_params=None) -> np.ndarray:
  seeds, conditions, rows, cols = grid_inputs(run)
  x = run.generator.generate(seeds, conditions, params=run.sampling_params(params, teacher_params),
                             batch=run.config.eval.batch)
  return images.make_grid(images.to_uint8(x), rows, cols)
