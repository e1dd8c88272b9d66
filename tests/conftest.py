"""Test setup: 8 fake CPU devices, so sharding is exercised without accelerators.

The flag must be set before jax initialises its backends, i.e. before any test module imports jax.
"""
import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)
# Tests compile the same tiny programs many times (e.g. a run, then its resumption): share them.
jax.config.update("jax_compilation_cache_dir",
                  os.path.join(tempfile.gettempdir(), "sid_jax_test_compilation_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

# The slowest files first: with `pytest -n 2 --dist loadfile` (make test) workers take files in
# collection order, so a long file collected last would run alone at the end.
_SLOW_FILES = ("test_resume.py", "test_sida.py", "test_multiprocess.py", "test_digits.py",
               "test_lsg_run.py", "test_sida_configs.py", "test_train.py", "test_install.py",
               "test_nonfinite.py", "test_evaluate.py", "test_gmm_distill.py",
               "test_paper_configs.py", "test_cli.py", "test_data_real.py", "test_steps.py",
               "test_lsg_step.py", "test_lsg.py", "test_nets_edm.py", "test_sample_t2i.py",
               "test_fid_protocols.py", "test_scale.py", "test_plan.py", "test_precision.py")


def pytest_collection_modifyitems(items):
  def rank(item):
    name = os.path.basename(str(item.fspath))
    return _SLOW_FILES.index(name) if name in _SLOW_FILES else len(_SLOW_FILES)

  items.sort(key=rank)  # stable: the order within a file is kept
