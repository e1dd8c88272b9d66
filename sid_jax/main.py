"""The single entry point: python -m sid_jax.main --config=configs/NAME.py[:ARG] --workdir=DIR.

Any setting can be overridden on the command line, e.g. --config.training.num_steps=100.
On multi-host runs set SID_JAX_DISTRIBUTED=1 (or launch under a cluster that jax.distributed
auto-detects: Cloud TPU, SLURM, Open MPI) so every process joins one jax.distributed job.
"""

import os
import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from sid_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py[:ARG]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.mark_flags_as_required(["config", "workdir"])

JOBS = ("distill", "train_teacher")
# The errors of checks a user can act on (settings, files); anything else keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, app.UsageError)


class _QuietLibraries:
  """Drops INFO records of chatty libraries (Orbax logs ~20 lines per checkpoint)."""
  NOISY = (os.sep + "orbax" + os.sep,)

  def filter(self, record):
    return record.levelno >= 30 or not any(n in record.pathname for n in self.NOISY)


# A cluster without auto-detection (plain hosts, or several processes on one machine): JAX reads
# JAX_COORDINATOR_ADDRESS itself, not the process count and id, which come from these two.
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"


def _env_int(name):
  value = os.environ.get(name)
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise app.UsageError(f"{name}={value!r} is not an integer.") from None


def _init_distributed():
  """Joins the jax.distributed job when SID_JAX_DISTRIBUTED=1: cluster auto-detection (Cloud TPU,
  SLURM, Open MPI, Kubernetes) or JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES and
  JAX_PROCESS_ID. On CPU, cross-process collectives also need
  JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo."""
  import jax  # pylint: disable=g-import-not-at-top
  if os.environ.get("SID_JAX_DISTRIBUTED", "0") != "1":
    return
  num, pid = _env_int(NUM_PROCESSES_ENV), _env_int(PROCESS_ID_ENV)
  if (num is None) != (pid is None):
    raise app.UsageError(f"Set both {NUM_PROCESSES_ENV} and {PROCESS_ID_ENV}, or neither.")
  jax.distributed.initialize(num_processes=num, process_id=pid)
  logging.info("jax.distributed: process %d of %d, %d local of %d devices.", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def main(argv):
  """Runs the job; a user error (a bad setting, a missing file) is one line and exit status 2."""
  cli.report_errors("sid_jax.main", lambda: _main(argv), USER_ERRORS)


def _main(argv):
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraries())
  config = cli.loaded_config(lambda: _CONFIG.value)
  if config.job not in JOBS:
    raise app.UsageError(f"config.job={config.job!r} is not one of {JOBS}.")
  _init_distributed()
  if config.job == "train_teacher":
    from sid_jax import train_teacher  # pylint: disable=g-import-not-at-top
    summary = train_teacher.train_teacher(config, _WORKDIR.value)
    print(f"[sid_jax] teacher trained for {summary['step']} steps; network checkpoint "
          f"{summary['export_dir']}")
    return
  from sid_jax import train  # pylint: disable=g-import-not-at-top
  summary = train.distill(config, _WORKDIR.value)
  print(f"[sid_jax] {summary['status']} at step {summary['step']}; workdir {summary['workdir']}")
  for key in ("initial_eval", "final_eval"):
    if summary.get(key):
      print(f"[sid_jax] {key}: " + ", ".join(f"{k}={v:.4g}" for k, v in summary[key].items()))
  if summary["status"] == "preempted":
    # Saved, not finished: exit non-zero (128 + the signal, as the shell reports a job killed by
    # it) so a scheduler requeues the job; the next launch resumes from the checkpoint.
    sys.exit(128 + int(summary.get("signal") or signal.SIGTERM))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parser(None, __doc__, "sid_jax.main"))
